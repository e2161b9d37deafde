"""Untrusted files cannot make csqc allocate what they claim: a few KB of IR file, reference
checkpoint, input array or folded constant must be refused with a one-line ``BadInput`` before
the gigabytes it asks for are allocated (model files and artifacts: test_modelfile_security,
test_artifact_integrity). Also: arrays are read by the name whose header was checked, and a
calibration file is read only as far as the samples it gives."""
import io
import zipfile

import numpy as np
import pytest
import torch

import csqc
from csqc.archive import npz_bytes
from csqc.arrayfile import array_headers, read_arrays
from csqc.capture import folding
from csqc.errors import BadInput
from csqc.ir import load_graph, save_graph


def _rezip(src, dst, compress=zipfile.ZIP_DEFLATED, replace=None):
    """A copy of zip ``src`` with every member written with ``compress`` (``replace``: name -> bytes)."""
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(dst, "w", compress) as z:
        for name, data in members:
            z.writestr(name, (replace or {}).get(name, data))
    return dst


def _deflated_npz(arrays) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, a)
            z.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


def test_an_ir_file_cannot_nest_a_zip_bomb(tiny_mlp, tmp_path):
    graph = csqc.capture(csqc.load(tiny_mlp))
    path = tmp_path / "m.csqcir"
    save_graph(graph, path)
    assert load_graph(path) == graph
    # params.npz deflated inside the deflated file: 2**24 zeros take a few KB on disk
    bomb = _rezip(path, tmp_path / "bomb.csqcir",
                  replace={"params.npz": _deflated_npz({"bomb": np.zeros(1 << 24, np.float32)})})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BadInput, match="'bomb' is compressed; csqc writes tensors uncompressed"):
        load_graph(bomb)


def test_an_ir_files_verifier_findings_are_one_line(tiny_mlp, tmp_path):
    graph = csqc.capture(csqc.load(tiny_mlp))
    path = tmp_path / "m.csqcir"
    save_graph(graph, path)
    params = {k: np.asarray(v) for k, v in graph.params.items()}
    first = sorted(params)[0]
    params[first] = np.zeros((3, 3, 3), params[first].dtype)  # a weight of the wrong shape
    edited = _rezip(path, tmp_path / "edited.csqcir", replace={"params.npz": npz_bytes(params)})
    with pytest.raises(BadInput) as e:
        load_graph(edited)
    assert "\n" not in str(e.value) and "IR verification failed" in str(e.value)


def test_ir_params_of_any_name_round_trip(tiny_mlp, tmp_path):
    """np.savez took names as keyword arguments: a param named ``file`` could not be written."""
    graph = csqc.capture(csqc.load(tiny_mlp))
    name = sorted(graph.params)[0]
    renamed = graph.replace(
        params={("file" if k == name else k): v for k, v in graph.params.items()},
        nodes=tuple(n.__class__(n.name, n.op, tuple("file" if i == name else i for i in n.inputs), n.type, n.attrs,
                                n.quant, n.source) for n in graph.nodes))
    save_graph(renamed, tmp_path / "file.csqcir")
    assert load_graph(tmp_path / "file.csqcir") == renamed


def test_a_reference_checkpoint_with_compressed_members_is_refused(tmp_path):
    from csqc.reference import _read_checkpoint

    torch.save({"model": {"w": torch.zeros(1 << 16)}}, tmp_path / "ok.pt")
    assert _read_checkpoint(tmp_path / "ok.pt")["w"].shape == (1 << 16,)
    bomb = _rezip(tmp_path / "ok.pt", tmp_path / "bomb.pt")
    assert bomb.stat().st_size < (tmp_path / "ok.pt").stat().st_size // 10
    with pytest.raises(BadInput, match="is compressed; torch.save stores checkpoint members uncompressed"):
        csqc.load(bomb, model_factory="csqc.models.reference:resnet20", input_shape=(1, 3, 32, 32))


def test_folding_stops_at_its_budget(monkeypatch, tmp_path):
    """A program that builds a constant larger than the budget is refused before it is evaluated."""
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            mask = torch.ones(64, 64).tril()[:1, :8]  # folded at capture
            return self.fc(x) * mask

    model = csqc.finalize(csqc.convert(Masked(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.zeros(1, 8)))
    csqc.capture(loaded)  # within the budget: folded
    monkeypatch.setattr(folding, "MAX_FOLDED_BYTES", 64 * 64 * 4 - 1)
    with pytest.raises(BadInput, match="builds constants of 16,384 bytes in one tensor at ones"):
        csqc.capture(loaded)
    monkeypatch.setattr(folding, "MAX_FOLDED_BYTES", 1 << 20)
    monkeypatch.setattr(folding, "MAX_FOLDED_TOTAL", 64 * 64 * 4 * 2 - 1)  # ones, then tril: the slice is a view
    with pytest.raises(BadInput, match="builds constants of 32,768 bytes in all at tril"):
        csqc.capture(loaded)


def test_views_of_a_mask_buffer_cost_the_folding_budget_nothing(monkeypatch, tmp_path):
    """nanoGPT slices its [1, 1, 2048, 2048] mask buffer in every layer: slices allocate nothing."""
    class Sliced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("mask", torch.ones(64, 64))

        def forward(self, x):
            for _ in range(20):
                x = self.fc(x) * self.mask[:48][:1, :8]  # a 12 KB view, then a small one
            return x

    model = csqc.finalize(csqc.convert(Sliced(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.zeros(1, 8)))
    monkeypatch.setattr(folding, "MAX_FOLDED_TOTAL", 64 * 64 * 4)  # less than 20 of the 12 KB slices
    csqc.capture(loaded)


def test_arrays_are_read_by_the_name_whose_header_was_checked(tmp_path):
    with zipfile.ZipFile(tmp_path / "two.npz", "w") as z:
        for member, width in (("x", 65), ("x.npy", 64)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.zeros((1, width), np.float32))
            z.writestr(member, buf.getvalue())
    with pytest.raises(BadInput, match="holds two arrays named 'x'"):
        array_headers(tmp_path / "two.npz")


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_calibration_file_is_read_only_as_far_as_its_samples(tmp_path, order):
    data = np.asfortranarray(np.arange(40 * 6, dtype=np.float32).reshape(40, 6)) if order == "F" else \
        np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    np.save(tmp_path / "x.npy", data)
    np.savez_compressed(tmp_path / "x.npz", input0=data)
    for path, names in ((tmp_path / "x.npy", [""]), (tmp_path / "x.npz", ["input0"])):
        (first,) = read_arrays(path, names, rows=5)
        assert np.array_equal(first, data[:5]) and first.flags.writeable
        (whole,) = read_arrays(path, names)
        assert np.array_equal(whole, data)
    # a truncated file says so when read whole; its first rows are all a calibration reads
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(raw[:-8])
    with pytest.raises(BadInput, match="ends before"):
        read_arrays(tmp_path / "short.npy", [""])
    if order == "C":
        (first,) = read_arrays(tmp_path / "short.npy", [""], rows=5)
        assert np.array_equal(first, data[:5])


def test_compile_calibrates_on_the_first_samples_of_a_larger_file(tiny_mlp, tmp_path):
    from csqc.compiler import calibration_arrays

    data = np.random.default_rng(0).random((1000, 8), dtype=np.float32)
    np.savez(tmp_path / "cal.npz", input0=data)
    (arrays,) = calibration_arrays(csqc.load(tiny_mlp), str(tmp_path / "cal.npz"), samples=256)
    assert np.array_equal(arrays, data[:256])
