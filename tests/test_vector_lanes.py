"""Vectorized loops as wide as a model's sizes (``targets/tvm/vector_lanes.py``): TVM 0.27 keeps a
vector's lanes in 16 bits, so past 32,767 it aborts LLVM or stores a wrapped count. Kernels whose
extents follow the model switch to serial loops past ``MAX_VECTOR_LANES``, and every build
refuses a loop TVM would miscompile."""
import pytest
import torch
from click.testing import CliRunner
from tvm.script import tirx as T

import csqc
from csqc.cli import cli
from csqc.errors import CompileError
from csqc.targets.tvm.vector_lanes import TVM_MAX_LANES, check_vector_widths, widest_vector_loop

F = torch.nn.functional


def _fill(lanes: int, inner: int):
    @T.prim_func
    def main(a: T.Buffer((4, lanes), "uint8")):
        for i in T.parallel(4):
            if i > 1:
                for j in T.vectorized(lanes):
                    a[i, j] = T.uint8(3)
            else:
                for k in range(lanes // inner):
                    for j in T.vectorized(inner):
                        a[i, k * inner + j] = T.uint8(1)
    return main


def test_the_widest_vectorized_loop_is_found_inside_branches_and_loops():
    assert widest_vector_loop(_fill(64, 16)) == 64
    assert widest_vector_loop(_fill(40000, 50000 // 2)) == 40000


def test_a_kernel_tvm_would_miscompile_is_refused_by_name():
    check_vector_widths({"fits": _fill(TVM_MAX_LANES - 7, 8)})
    with pytest.raises(CompileError, match=r"k3_wide \(70,000 lanes\)"):
        check_vector_widths({"fits": _fill(64, 16), "k3_wide": _fill(70000, 8)})


class _DilatedHead(torch.nn.Module):
    """An ASPP branch of DeepLab v3 at a small input: a 3x3 conv of dilation 24 over 1,024
    channels of a 7x7 map, its padded rows 55 x 1,024 bytes (TVM aborted LLVM on them)."""

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Conv2d(3, 1024, 1)
        self.aspp = torch.nn.Conv2d(1024, 64, 3, padding=24, dilation=24)

    def forward(self, x):
        return self.aspp(F.relu(self.expand(x)))


class _LongSignal(torch.nn.Module):
    """Strided, dilated and depthwise 1-D convs over 150,001 samples, quantized from the input:
    rows of 75,001 codes (TVM stored 9,465 of them, or aborted)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv1d(2, 8, 7, stride=2, padding=3)
        self.b = torch.nn.Conv1d(8, 8, 3, padding=2, dilation=2)
        self.c = torch.nn.Conv1d(8, 8, 5, stride=2, padding=2, groups=8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(self.c(F.relu(self.b(x)) + x))
        return self.head(x.amax(-1))


@pytest.mark.parametrize("factory, shape, act_bits", [
    (_DilatedHead, (1, 3, 7, 7), 4),
    (_LongSignal, (1, 2, 150001), 4),
    (_LongSignal, (1, 2, 150001), 8),
], ids=["dilated-1024-channels", "long-signal-a4", "long-signal-a8"])
def test_models_with_rows_wider_than_tvms_vectors_compile_and_verify_exactly(factory, shape, act_bits, tmp_path):
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(factory().eval(), n_bits=4, act_bits=act_bits, quantize_first_input=True))
    path = csqc.save(model, tmp_path / "model.pt", torch.rand(*shape) - 0.5)
    result = CliRunner().invoke(cli, ["compile", str(path), "--target", "llvm", "-o", str(tmp_path / "m.so")])
    assert result.exit_code == 0, result.output
    report = csqc.verify(path, samples=2, artifact=str(tmp_path / "m.so"))
    assert report.ok and report.accumulators_exact, report.notes
