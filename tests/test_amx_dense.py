"""Bit-parallel linear layers on Intel AMX tiles (targets/llvm/amx.py): exact, chosen where the
CPU has them, refused clearly where it does not. Runs where this machine has AMX-INT8 (the Intel
Xeon CI machines); elsewhere only the checks that need no tile instruction run."""
import json

import numpy as np
import pytest
import torch

import csqc
from csqc import runtime
from csqc.targets.llvm import amx, kernels
from csqc.targets.llvm.packing import pack_bitparallel_weight
from csqc.verify import verify

needs_amx = pytest.mark.skipif(not amx.host_has_amx(), reason="this CPU has no AMX-INT8 tiles")


@needs_amx
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (5, 64, 128), (16, 128, 64), (37, 192, 256), (64, 1024, 1024)])
def test_amx_dense_equals_the_integer_product(m, n, k):
    rng = np.random.default_rng(m)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    q = rng.integers(-128, 128, (n, k)).astype(np.int64)
    got = kernels.build(amx.amx_dense(m, n, k))(x, pack_bitparallel_weight(q))
    np.testing.assert_array_equal(got, x.astype(np.int64) @ q.T)


def test_amx_dense_refuses_partial_tiles():
    assert not amx.amx_dense_fits(8, 48, 64) and not amx.amx_dense_fits(8, 64, 96)
    with pytest.raises(ValueError, match="N % 64"):
        amx.amx_dense(8, 48, 64)


def test_only_cpus_with_tiles_get_them():
    assert amx.target_has_amx(kernels.cpu_target("sapphirerapids"))
    assert not amx.target_has_amx(kernels.cpu_target("znver4"))
    assert not amx.target_has_amx(kernels.cpu_target("icelake-server"))
    # the detected host target carries them exactly where the host has them
    assert amx.target_has_amx(kernels.cpu_target()) == amx.host_has_amx()


def _linear_batch(tmp_path, rows: int):
    torch.manual_seed(1)
    model = csqc.convert(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).eval(),
                         n_bits=3, act_bits=4, quantize_first_input=True)
    x = torch.rand(rows, 256)
    return csqc.load(csqc.save(csqc.finalize(model).eval(), tmp_path / "m.pt", x)), x


@needs_amx
def test_a_batch_of_rows_runs_on_tiles_and_verifies_exactly(tmp_path):
    """Batch 16: both linear layers take AMX tiles, verify exactly, and every plane setting
    matches the VNNI kernel's results (the runtime rebuilds the same int8 weights)."""
    model, x = _linear_batch(tmp_path, 16)
    tiles, vnni = tmp_path / "tiles.so", tmp_path / "vnni.so"
    csqc.compile(model, "llvm", tiles)
    csqc.compile(model, "llvm", vnni, mcpu="icelake-server")  # VNNI, no tiles: the same results
    m, reference = runtime.load(tiles), runtime.load(vnni)
    assert [info.get("tiles") for info in m.layers.values()] == ["amx", "amx"]
    assert [runtime._kernel_kind(s["func"]) for s in m.plan["steps"]].count("amxdense") == 2
    assert not any(info.get("tiles") for info in reference.layers.values())
    report = verify(model, inputs=[np.random.default_rng(2).random((32, 256), dtype=np.float32)],
                    artifact=str(tiles), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]
    for skip in (0, 1, 2):
        np.testing.assert_array_equal(m(x.numpy(), skip_planes=skip), reference(x.numpy(), skip_planes=skip))


def test_a_plan_with_unknown_tiles_is_refused(tmp_path):
    from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split

    model, _ = _linear_batch(tmp_path, 16)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, mcpu="sapphirerapids")  # tiles in the plan, whichever CPU this is
    library, members = _split(art)
    plan = json.loads(members[PLAN])
    assert [info.get("tiles") for info in plan["layers"].values() if info["kernel"] == "bitparallel"] == ["amx", "amx"]
    for layer, value in (("0", "tpu"), ("0", None)):
        plan["layers"][layer]["tiles"] = value
        bad = tmp_path / "bad.so"
        bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
        with pytest.raises(csqc.errors.CsqcError, match="tiles"):
            runtime.load(bad)


@pytest.mark.skipif(amx.host_has_amx(), reason="needs a CPU without AMX")
def test_a_tile_artifact_on_a_cpu_without_tiles_is_bad_input(tmp_path):
    model, _ = _linear_batch(tmp_path, 16)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, mcpu="sapphirerapids")
    with pytest.raises(csqc.errors.BadInput, match="AMX tiles"):
        runtime.load(art)
