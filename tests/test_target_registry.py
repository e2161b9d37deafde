"""The target registry: compile() finds targets by name, each target's pre-flight runs first."""
import subprocess
import sys

import pytest

import csqc
from csqc.compiler import TARGETS
from csqc.errors import BadInput
from csqc.targets.registry import get_target, registered_targets


def test_every_builtin_target_is_registered_and_targets_derives_from_it():
    targets = registered_targets()
    assert list(targets) == ["llvm", "aarch64", "cuda", "onnx"]
    assert TARGETS == {name: (t.pipeline, t.description) for name, t in targets.items()}
    assert {name: t.suffix for name, t in targets.items()} == {"llvm": ".so", "aarch64": ".so", "cuda": ".so",
                                                                "onnx": ".onnx"}
    assert [name for name, t in targets.items() if t.needs_gpu] == ["cuda"]
    assert [name for name, t in targets.items() if t.emulated] == ["aarch64"]


def test_unknown_target_names_the_known_ones(tmp_path):
    with pytest.raises(BadInput, match="unknown target 'vulkan'; choose one of: llvm, aarch64, cuda, onnx"):
        get_target("vulkan")
    with pytest.raises(BadInput, match="unknown target 'vulkan'"):
        csqc.compile(tmp_path / "missing.pt", "vulkan", tmp_path / "m.so")


@pytest.mark.parametrize("options, message", [
    ({"onnx_form": "compact"}, "unknown --onnx-form 'compact'"),
    ({"onnx_form": "deploy"}, "--onnx-form deploy needs calibration inputs"),
])
def test_target_preflight_fails_before_the_model_is_read(tmp_path, options, message):
    # the model path does not exist: reaching it would be a different error
    with pytest.raises(BadInput, match=message):
        csqc.compile(tmp_path / "missing.pt", "onnx", tmp_path / "m.onnx", **options)
    assert list(tmp_path.iterdir()) == []


def test_looking_targets_up_imports_no_toolchain():
    """Entries stay cheap: TVM and ONNX load when a target compiles, not when the CLI starts."""
    code = ("import sys, csqc.compiler; csqc.compiler.TARGETS; "
            "print(sorted(m for m in ('tvm', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
