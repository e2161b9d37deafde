"""Calibrated convs find their output codes by a binary search over integer thresholds.

Rules under test (csqc.targets.tvm.code_thresholds, glue.epilogue's ``code_search``): with static
input and output scales a channel's code is a staircase in its accumulator, and
``base + #{k : s > thresholds[k]}`` (``s = acc``, or ``~acc`` where ``mult < 0``) is that
staircase for every accumulator; the searched kernel writes the float chain's codes bit for bit
in every code layout, with and without the run-time offset of offset input codes, extremes of
int16 storage included; staircases longer than one table keep the float chain; compiled
calibrated models take the search where their planes are mostly whole vectors and verify
exactly.
"""
import dataclasses
import io

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from cpus import needs_avx512
from csqc import runtime
from csqc.interpreter import layer_output
from csqc.artifact import pack_conv_rows_weight
from csqc.targets.llvm import amx, glue, kernels
from csqc.targets.tvm.code_thresholds import (DOMAIN, NO_STEP, TABLE_ENTRIES, _channel_form, code_form, code_tables,
                                              form_codes, forms_in_range)
from csqc.verify import verify
from irbuild import Builder
from test_glue_llvm import run_kernel
from test_kernels_llvm import conv_reference, needs_vbmi

F32 = np.float32
IN_SCALE, IN_LEVELS = 0.7, 15


def _layer(rng, channels: int, act: str, lo: float, hi: float, out_bits: int, out_scale: float, out_signed: bool,
           shallow: float = 1e-9, steep: bool = False):
    """A 1x1 quantized conv node with a fused static output quantization (weights play no part);
    channel 3's ``mult`` is ``shallow``: a staircase whose steps are far apart; ``steep``: the
    other channels' ``|mult|`` at least 0.02 (every step within int16's range, as tables need)."""
    b = Builder()
    x = b.input("x", (1, channels, 4, 4))
    codes = b.quantize(x, 4, signed=True, static=IN_SCALE)
    mult = (rng.standard_normal(channels) * 0.05).astype(F32)
    if steep:
        mult = (np.sign(mult) * (np.abs(mult) + F32(0.02))).astype(F32)
    mult[:4] = [0.0, -0.0, -0.03, shallow]  # a constant channel either way, a flipped one, a shallow one
    add = (rng.standard_normal(channels) * 0.5).astype(F32)
    y = b.qconv2d("layer", codes, rng.integers(-3, 4, (channels, channels, 1, 1)), n_bits=2, active_bits=(1, 0),
                  mult=mult, add=add, act=act, out_bits=out_bits, out_scale=out_scale, out_signed=out_signed)
    g = b.build(y)
    n = g.node("layer")
    if act == "clip":
        n = n.replace(attrs={**n.attrs, "clip_lo": lo, "clip_hi": hi})
        g = g.replace(nodes=tuple(n if m.name == "layer" else m for m in g.nodes))
    return g, n, mult, add


def _codes(g, n, acc: np.ndarray) -> np.ndarray:
    """The interpreter's codes of accumulators ``acc`` (``[C, K]``) of each channel."""
    return layer_output(g, n, acc[None, :, :, None], IN_SCALE, IN_LEVELS).codes[0, :, :, 0]


@pytest.mark.parametrize("act,lo,hi,out_bits,out_scale,signed", [
    ("clip", 0.0, 6.0, 4, 1.3, False),  # MobileNetV2's relu6
    ("relu", 0.0, 0.0, 4, 0.2, True),  # steep: several codes per accumulator step
    ("none", 0.0, 0.0, 4, 3.0, True),
    ("clip", -0.5, 0.75, 3, 0.6, True),
    ("none", 0.0, 0.0, 5, 1.1, False),  # 31 thresholds: a whole table
])
def test_thresholds_are_the_staircase_of_every_accumulator(act, lo, hi, out_bits, out_scale, signed):
    g, n, mult, _ = _layer(np.random.default_rng(out_bits), 12, act, lo, hi, out_bits, out_scale, signed, steep=True)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS)
    assert tables is not None and 1 <= tables.steps <= 5
    assert tables.thresholds.shape == (12, 2**tables.steps - 1) and tables.thresholds.dtype == np.int16
    assert (np.diff(tables.thresholds.astype(np.int64), axis=1) >= 0).all()  # sorted: a binary search applies
    np.testing.assert_array_equal(tables.flip, np.where(np.signbit(mult) & (mult != 0), -1, 0))
    flat = tables.kernel_thresholds()  # a 32-lane load at the last channel's row stays inside
    assert flat.size == 11 * tables.thresholds.shape[1] + TABLE_ENTRIES
    acc = np.arange(-32767, 32767, dtype=np.int64)  # every value an int16-stored accumulator compares as
    expected = _codes(g, n, np.broadcast_to(acc, (12, acc.size)).copy())
    if not signed:
        expected = np.maximum(expected, 0)  # what unsigned codes store
    s = np.where(tables.flip[:, None] != 0, ~acc[None, :], acc[None, :])
    searched = tables.base[:, None] + (s[:, :, None] > tables.thresholds[:, None, :]).sum(-1)
    np.testing.assert_array_equal(searched, expected)


@pytest.mark.parametrize("act,lo,hi,out_bits,out_scale,signed", [
    ("clip", 0.0, 6.0, 4, 1.3, False), ("relu", 0.0, 0.0, 4, 0.2, True), ("none", 0.0, 0.0, 4, 3.0, True),
    ("clip", -0.5, 0.75, 3, 0.6, True), ("none", 0.0, 0.0, 5, 1.1, False), ("relu", 0.0, 0.0, 1, 0.9, False)])
def test_the_fixed_point_form_is_the_staircase_of_every_int16_value(act, lo, hi, out_bits, out_scale, signed):
    """code_form's proof checks a few points per channel; every int16 value agrees."""
    g, n, _, _ = _layer(np.random.default_rng(out_bits + 7), 40, act, lo, hi, out_bits, out_scale, signed,
                        steep=True)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS)
    s = np.arange(-32768, 32768, dtype=np.int64)
    formed = 0
    for c in range(40):  # channel by channel: one channel without a form leaves the layer without one
        form = code_form(dataclasses.replace(tables, thresholds=tables.thresholds[c:c + 1],
                                             base=tables.base[c:c + 1], flip=tables.flip[c:c + 1]))
        if form is None:
            continue
        assert form.shape == (1, 8) and form.dtype == np.int16
        searched = (s[:, None] > tables.thresholds[c][None, :]).sum(-1)
        np.testing.assert_array_equal(form_codes(s, form[0]), searched)
        lo_c, hi_c, q, m, b, r = (int(v) for v in form[0, :6])
        assert (hi_c - lo_c) << q < 2**15 and 0 <= m < 2**15 and -(2**14) <= b < 2**14 and 0 <= r < 16
        formed += 1
    assert formed >= (18 if out_scale == 3.0 else 39)  # 4,000-wide 30-step staircases: about half
    assert (code_form(tables) is None) == (formed < 40)


def test_staircases_with_no_fixed_point_form_keep_the_search():
    """Steps one accumulator apart then far apart: no one slope fits, so no form (the search stays)."""
    from csqc.targets.tvm.code_thresholds import CodeTables

    thresholds = np.array([[0, 1, 2, 200, 201, 202, 400]], np.int16)
    tables = CodeTables(thresholds, np.zeros(1, np.int8), np.zeros(1, np.int8), 3)
    assert code_form(tables) is None
    even = CodeTables(np.array([[0, 10, 20, 30, 40, 50, 60]], np.int16), np.zeros(1, np.int8), np.zeros(1, np.int8), 3)
    assert code_form(even) is not None


def test_staircases_longer_than_a_table_keep_the_float_chain():
    g, n, _, _ = _layer(np.random.default_rng(0), 8, "none", 0.0, 0.0, 5, 0.4, True)  # 62 thresholds
    assert code_tables(g, n, IN_SCALE, IN_LEVELS) is None
    assert code_tables(g, n, 0.0, IN_LEVELS) is None  # a dynamic input scale


def test_steps_outside_int16_keep_the_float_chain():
    """Tables hold int16 thresholds; saturating int32 accumulators to int16 keeps the comparisons
    only where the staircase is flat beyond int16's range: a channel whose codes still move
    there keeps the float chain."""
    g, n, _, _ = _layer(np.random.default_rng(0), 8, "none", 0.0, 0.0, 4, 3.0, True, shallow=0.05)
    assert code_tables(g, n, IN_SCALE, IN_LEVELS, wide=True) is not None
    g, n, _, _ = _layer(np.random.default_rng(0), 8, "none", 0.0, 0.0, 4, 3.0, True, shallow=1e-9)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS)
    assert tables is not None and (tables.thresholds[3] == NO_STEP).all()  # flat within +-2**17: no step
    assert code_tables(g, n, IN_SCALE, IN_LEVELS, wide=True) is None  # its codes move near int32's ends
    g, n, _, _ = _layer(np.random.default_rng(0), 8, "none", 0.0, 0.0, 4, 3.0, True, shallow=1e-3)
    assert code_tables(g, n, IN_SCALE, IN_LEVELS) is None  # steps past -32767: no int16 table either
    assert code_tables(g, n, IN_SCALE, IN_LEVELS, wide=True) is None


CASES = [  # (planes: rows of whole vectors, or ending in one that overlaps the one before)
    ("clip", 0.0, 6.0, 4, 1.3, False, False, True, (35, 63)),  # MobileNetV2's relu6
    ("clip", 0.0, 6.0, 4, 1.3, False, False, False, (40, 56)),
    ("none", 0.0, 0.0, 4, 3.0, True, True, False, (30, 112)),  # offset output codes
    ("relu", 0.0, 0.0, 4, 0.2, True, False, True, (25, 91)),  # sign parts
    ("clip", -0.5, 0.75, 3, 0.6, True, False, True, (20, 56)),
    ("none", 0.0, 0.0, 5, 1.1, False, False, True, (7, 7)),  # five steps; 49: two vectors, overlapping
]


def _stored(rng, shape, storage: str) -> np.ndarray:
    """int16: every value of the storage rule's range (-32766..32766). int32: most around the
    thresholds, the rest out to int32's ends less any offset (saturated in the search)."""
    if storage == "int16":
        stored = rng.integers(-32766, 32767, shape)
        stored.reshape(shape[1], -1)[:, :4] = [-32766, 32766, 0, -1]
        return stored.astype(np.int16)
    near = rng.integers(-40000, 40001, shape)
    far = rng.integers(-(2**31) + 16000, 2**31 - 16000, shape)
    stored = np.where(rng.random(shape) < 0.7, near, far)
    stored.reshape(shape[1], -1)[:, :6] = [-(2**31) + 16000, 2**31 - 16001, 32767, -32768, 32766, -32767]
    return stored.astype(np.int32)


@pytest.mark.parametrize("storage", ["int16", "int32"])
@pytest.mark.parametrize("act,lo,hi,out_bits,out_scale,signed,offset,input_offset,hw", CASES)
@needs_avx512
def test_searched_and_formed_codes_equal_the_float_chain(storage, act, lo, hi, out_bits, out_scale, signed, offset,
                                              input_offset, hw):
    """Stored accumulators under random per-channel offsets: the searched kernel's codes and
    scale, and the fixed-point form's, equal the float-chain kernel's and the interpreter's, bit
    for bit."""
    rng = np.random.default_rng(sum(hw))
    channels = 24
    # (steps past int16's range keep the float chain, see above; int32: so would a flat channel)
    wide = storage == "int32"
    g, n, mult, add = _layer(rng, channels, act, lo, hi, out_bits, out_scale, signed, shallow=0.05 if wide else 1e-9,
                             steep=True)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS, wide=wide)
    shape = (1, channels) + hw
    stored = _stored(rng, shape, storage)
    off = rng.integers(-16000, 16000, channels).astype(np.int32) if input_offset else None
    inputs = [stored] + ([off] if input_offset else []) + [np.array([F32(IN_SCALE)]), mult, add]
    outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if signed and not offset else [])
    options = dict(has_offset=input_offset, out_bits=out_bits, out_scale=out_scale, out_signed=signed,
                   out_offset=offset, **({"acc_storage": "int16"} if storage == "int16" else {}))
    chain = run_kernel(glue.epilogue(shape, 1, IN_LEVELS, act, lo, hi, True, **options), *inputs, outputs=outputs)
    searched = run_kernel(glue.epilogue(shape, 1, IN_LEVELS, act, lo, hi, True, code_search=tables.steps, **options),
                          *inputs, tables.kernel_thresholds(), tables.base, tables.flip, outputs=outputs)
    for got, want in zip(searched, chain):
        np.testing.assert_array_equal(got, want)
    form = code_form(tables)
    assert (form is None) == (out_scale == 3.0 or out_bits == 5)  # steps too many and too wide for int16's precision
    if form is not None:
        formed = run_kernel(glue.epilogue(shape, 1, IN_LEVELS, act, lo, hi, True, code_form=True, **options),
                            *inputs, form.reshape(-1), tables.base, tables.flip, outputs=outputs)
        for got, want in zip(formed, chain):
            np.testing.assert_array_equal(got, want)
    acc = stored.reshape(channels, -1).astype(np.int64) - (off[:, None] if input_offset else 0)
    codes = _codes(g, n, acc).reshape(shape)
    levels = 2**out_bits - 1
    expected = codes + levels if offset else np.maximum(codes, 0)
    np.testing.assert_array_equal(searched[1], expected)
    if signed and not offset:
        np.testing.assert_array_equal(searched[2], np.maximum(-codes, 0))


@needs_avx512
def test_formed_codes_of_int16_accumulators_take_any_offset():
    """int16 accumulators less their offset saturate to int16 in the form's kernel where the
    offset fits int16 (the storage rule keeps it so); a row whose offset does not widens to
    int32 first. Both equal the float chain."""
    rng = np.random.default_rng(5)
    channels, shape = 8, (1, 8, 4, 16)
    g, n, mult, add = _layer(rng, channels, "clip", 0.0, 6.0, 4, 1.3, False, steep=True)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS)
    form = code_form(tables)
    stored = _stored(rng, shape, "int16")
    off = np.array([40000, -40000, 32767, -32767, 32768, -32768, 5, -70000], np.int32)
    options = dict(has_offset=True, out_bits=4, out_scale=1.3, acc_storage="int16")
    inputs = [stored, off, np.array([F32(IN_SCALE)]), mult, add]
    outputs = [((1,), "float32"), (shape, "uint8")]
    chain = run_kernel(glue.epilogue(shape, 1, IN_LEVELS, "clip", 0.0, 6.0, True, **options), *inputs, outputs=outputs)
    formed = run_kernel(glue.epilogue(shape, 1, IN_LEVELS, "clip", 0.0, 6.0, True, code_form=True, **options),
                        *inputs, form.reshape(-1), tables.base, tables.flip, outputs=outputs)
    np.testing.assert_array_equal(formed[1], chain[1])
    acc = stored.reshape(channels, -1).astype(np.int64) - off[:, None]
    np.testing.assert_array_equal(formed[1], np.maximum(_codes(g, n, acc), 0).reshape(shape))


def test_code_search_needs_what_it_relies_on():
    shape = (1, 8, 8, 8)
    with pytest.raises(ValueError, match="code_search"):
        glue.epilogue(shape, 1, 15, "relu", 0, 0, True, "int64", out_bits=4, out_scale=1.0, code_search=4)
    with pytest.raises(ValueError, match="code_search"):
        glue.epilogue(shape, 1, 15, "relu", 0, 0, True, out_bits=4, out_scale=0.0, acc_storage="int16",
                      code_search=4)  # a dynamic output scale
    with pytest.raises(ValueError, match="code_search"):
        glue.epilogue((1, 8, 4, 4), 1, 15, "relu", 0, 0, True, out_bits=4, out_scale=1.0, acc_storage="int16",
                      code_search=4)  # rows shorter than a vector
    with pytest.raises(ValueError, match="steps"):
        glue.epilogue(shape, 1, 15, "relu", 0, 0, True, out_bits=4, out_scale=1.0, acc_storage="int16", code_search=6)
    assert DOMAIN > 2 * 2**15  # every true accumulator of an int16-stored conv, offset included


def _cnn(tmp_path, size: int):
    torch.manual_seed(size)
    float_model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),  # a float-input stem: float chain
        nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6(),  # expansion
        nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU6(),  # depthwise
        nn.Conv2d(48, 24, 1),  # projection: no activation, signed codes
        nn.Conv2d(24, 32, 1), nn.ReLU(),  # reads them as offset codes
        nn.Conv2d(32, 32, 1),  # its float output goes to the pool: no codes to search
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=4, quantize_first_input=False))
    return csqc.load(csqc.save(model, tmp_path / f"m{size}.pt", torch.rand(1, 3, size, size)))


@pytest.mark.parametrize("size,searched", [(16, 4), (7, 4), (5, 0)])
@needs_avx512
def test_calibrated_convs_search_their_codes_and_verify_exactly(tmp_path, size, searched):
    """The four integer convs whose codes another conv reads take their fixed-point forms (one
    of them on offset input codes) where a channel's plane holds a 32-lane vector (7x7: two,
    overlapping); 5x5 planes keep the float chain. All verify exactly."""
    model = _cnn(tmp_path, size)
    calib = [np.random.default_rng(0).random((8, 3, size, size), dtype=np.float32)]
    art = tmp_path / f"m{size}.so"
    csqc.compile(model, "llvm", art, calibrate=calib)
    plan = runtime.load(art).plan
    tables = [name for name in plan["buffers"] if name.endswith((".code_thresholds", ".code_form"))]
    assert len(tables) == searched, tables
    forms = [name for name in tables if name.endswith(".code_form")]
    if searched:  # the relu6 and relu staircases are a few hundred accumulators wide: every channel has its form
        assert "10.acc_offset" in plan["buffers"] and {"3.code_form", "6.code_form", "10.code_form"} <= set(forms)
    assert sum(any(a in tables for a in step["args"]) for step in plan["steps"]) == searched
    assert sum(info.get("codes", "").startswith("fixed-point form") for info in plan["layers"].values()) == len(forms)
    assert sum(info.get("codes", "").startswith(("fixed-point form", "threshold search"))
               for info in plan["layers"].values()) == searched
    check = [np.random.default_rng(1).random((3, 3, size, size), dtype=np.float32) * 1.5]  # some codes clamp
    report = verify(model, inputs=check, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()


@needs_avx512
def test_a_calibrated_depthwise_conv_writes_its_codes_itself(tmp_path, monkeypatch):
    """The depthwise conv of a calibrated model, its channels' forms proved, runs as one call
    that writes its codes (kernels.bitparallel_depthwise_codes): no accumulator buffer, no
    epilogue step. verify checks it by its codes, exactly; with fewer planes it gives the
    codes (and outputs) of the int16 kernel and code_form epilogue it replaces, bit for bit."""
    from csqc.targets.llvm.backend import CpuBackend

    model = _cnn(tmp_path, 16)
    calib = [np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)]
    art, unfused = tmp_path / "dw.so", tmp_path / "epilogue.so"
    csqc.compile(model, "llvm", art, calibrate=calib)
    compiled = runtime.load(art)
    plan = compiled.plan
    steps = [step for step in plan["steps"] if step.get("layer") == "6"]
    assert len(steps) == 1 and "6.code_form" in steps[0]["args"] and "6.codes" in steps[0]["args"]
    assert "6.acc" not in plan["buffers"] and plan["layers"]["6"]["codes"] == "fixed-point form, in the conv"
    x = np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32) * 1.5
    report = verify(model, inputs=[x], artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    monkeypatch.setattr(CpuBackend, "depthwise_codes", False)
    csqc.compile(model, "llvm", unfused, calibrate=calib)
    reference = runtime.load(unfused)
    assert "6.acc" in reference.plan["buffers"]
    for skip in (0, 1, 2):
        got, want = {}, {}
        np.testing.assert_array_equal(compiled(x[:1], skip_planes=skip, record=got),
                                      reference(x[:1], skip_planes=skip, record=want))
        np.testing.assert_array_equal(got["6.codes"], want["6.codes"], err_msg=f"skip {skip}")


DEPTHWISE_CODE_CASES = [  # (input shape, stride): planes of pieces and of flat rows, two batches, stride 2
    ((1, 6, 14, 14), 1),
    ((2, 5, 20, 70), 1),  # rows of two pieces
    ((1, 8, 56, 56), 2),
    ((1, 4, 7, 9), 1),  # 63 codes a plane: two vectors, overlapping
]


@needs_avx512
@pytest.mark.parametrize("tap_pairs", [False, pytest.param(True, marks=needs_vbmi)])
@pytest.mark.parametrize("shape,stride", DEPTHWISE_CODE_CASES)
def test_depthwise_codes_kernel_equals_the_forms_of_its_accumulators(shape, stride, tap_pairs):
    """Each output channel's codes are its fixed-point form of ``acc ^ flip``, plus its base, as
    glue.epilogue's code_form pass computes them from stored int16 accumulators: random forms
    (from random staircases over each channel's range), flips and bases."""
    rng = np.random.default_rng(sum(shape) + stride)
    weight_shape = (shape[1], 1, 3, 3)
    q = rng.integers(-7, 8, weight_shape)
    x = rng.integers(0, 16, shape)
    acc = conv_reference(x, q, (stride, stride), (1, 1), (1, 1), shape[1])
    forms, bases, flips = [], rng.integers(0, 3, shape[1]).astype(np.int8), rng.choice([0, -1], shape[1]).astype(np.int8)
    for c in range(shape[1]):
        s = acc[:, c] ^ int(flips[c])  # a staircase of 15 evenly spaced steps across the channel's values
        spacing = rng.uniform(1.0, max(1.5, (int(s.max()) - int(s.min())) / 12))
        steps = int(s.min()) + int(rng.integers(-4, 5)) + np.floor(np.arange(15) * spacing).astype(np.int64)
        forms.append(_channel_form(steps))
    assert all(f is not None for f in forms)
    form = np.stack(forms).astype(np.int16)
    expected = np.stack([form_codes(acc[:, c] ^ int(flips[c]), form[c]) + int(bases[c]) for c in range(shape[1])], 1)
    with kernels.cpu_target():
        prim = kernels.bitparallel_depthwise_codes(shape, weight_shape, stride, 1, 1, 0.25, tap_pairs)
    kernel = kernels.build(prim, kernels.cpu_target())
    codes = kernel(x.astype(np.uint8), q.reshape(shape[1], -1).astype(np.int32), form.reshape(-1), bases, flips,
                   np.zeros(1, np.float32))
    np.testing.assert_array_equal(codes, expected.astype(np.uint8))
    with pytest.raises(ValueError, match="32 to"):  # a plane shorter than one vector
        kernels.bitparallel_depthwise_codes((1, 4, 5, 5), (4, 1, 3, 3), 1, 1, 1, 0.25)


@needs_avx512
def test_an_artifact_with_forms_out_of_range_is_refused(tmp_path):
    """The forms are read back from the artifact: a tampered (re-sealed) one whose shifts or
    products leave int16's rules never reaches the kernels."""
    from csqc.archive import npz_bytes
    from csqc.artifact import PLAN, WEIGHTS
    from csqc.errors import BadInput
    from test_artifact_integrity import _resealed, _split, _weights

    model = _cnn(tmp_path, 7)
    art = tmp_path / "m7.so"
    csqc.compile(model, "llvm", art, calibrate=[np.random.default_rng(0).random((8, 3, 7, 7), dtype=np.float32)])
    library, members = _split(art)
    weights = _weights(members)
    name = next(k for k in weights if k.endswith(".code_form"))
    assert forms_in_range(weights[name])
    for field, value in [(2, 16), (5, 20), (3, -1), (4, 2**14)]:  # q, r past 15; a negative M; B overflowing
        bad = dict(weights)
        bad[name] = weights[name].copy()
        bad[name][field] = value
        assert not forms_in_range(bad[name])
        path = tmp_path / f"bad{field}.so"
        path.write_bytes(_resealed(library, members[PLAN], npz_bytes(bad)))
        with pytest.raises(BadInput, match="code forms out of range"):
            runtime.load(path)


# -- codes straight from AMX tiles (amx.amx_pointwise_codes) ------------------------------------
needs_amx = pytest.mark.skipif(not amx.host_has_amx(), reason="this CPU has no AMX-INT8 tiles")

TILE_CASES = [  # (batch, C, O, H, W): whole and overlapping 32-pixel blocks, 16- and 32-channel blocks
    (1, 64, 96, 8, 8),
    (2, 96, 48, 7, 7),  # 24 groups: two K tiles of 12; 49 pixels: two blocks, overlapping
    (1, 160, 32, 5, 9),  # 40 groups: four K tiles of 10
    (1, 32, 256, 12, 12),  # 36 K codes: tasks on both threads; 5 blocks, the last overlapping
]


def _check_written_codes(kernel_of, inputs, tables, form, codes, out_bits, out_scale, offset, two_parts, outputs):
    """A codes-writing conv kernel (``kernel_of(steps)``, run on ``inputs`` then the tables) gives
    ``codes`` (the interpreter's, signed) in its layout, by the search and, where the layer has
    one, by the fixed-point form; and stores the static scale."""
    for steps, table in [(tables.steps, tables.kernel_thresholds())] + ([(0, form.reshape(-1))] if form is not None
                                                                        else []):
        got = run_kernel(kernel_of(steps), *inputs, table, tables.base, tables.flip, outputs=outputs)
        assert got[0][0] == F32(out_scale)
        np.testing.assert_array_equal(got[1], codes + 2**out_bits - 1 if offset else np.maximum(codes, 0))
        if two_parts:
            np.testing.assert_array_equal(got[2], np.maximum(-codes, 0))


@needs_amx
@pytest.mark.parametrize("act,lo,hi,out_bits,out_scale,signed,offset,input_offset,_hw", CASES)
@pytest.mark.parametrize("batch,c,o,h,w", TILE_CASES)
def test_tile_codes_equal_the_interpreter(batch, c, o, h, w, act, lo, hi, out_bits, out_scale, signed, offset,
                                          input_offset, _hw):
    """The conv's codes straight from its tiles: the interpreter's codes of its integer product
    (less the offset of offset input codes), bit for bit, in every code layout."""
    rng = np.random.default_rng(c + o + out_bits)
    g, n, _, _ = _layer(rng, o, act, lo, hi, out_bits, out_scale, signed, shallow=0.05, steep=True)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS, wide=True)
    x = rng.integers(0, 256, (batch, c, h, w)).astype(np.uint8)
    q = rng.integers(-128, 128, (o, c, 1, 1))
    off = rng.integers(-16000, 16000, o).astype(np.int32) if input_offset else None
    two_parts = signed and not offset
    shape = (batch, o, h, w)
    outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if two_parts else [])
    form = code_form(tables)
    acc = np.einsum("bchw,oc->obhw", x.astype(np.int64), q[:, :, 0, 0]).reshape(o, -1)
    codes = _codes(g, n, acc - (off[:, None] if input_offset else 0)).reshape(o, batch, h, w).transpose(1, 0, 2, 3)
    _check_written_codes(lambda steps: amx.amx_pointwise_codes(x.shape, o, steps, 2**out_bits - 1, out_scale, offset,
                                                               two_parts, input_offset),
                         [x, pack_conv_rows_weight(q)] + ([off] if input_offset else []), tables, form, codes,
                         out_bits, out_scale, offset, two_parts, outputs)


def test_tile_codes_take_only_pointwise_convs_of_whole_tiles():
    from csqc.targets.tvm.geometry import conv_geometry

    assert amx.amx_pointwise_codes_fits(conv_geometry((1, 64, 7, 7), (96, 64, 1, 1), 1, 0, 1, 1))
    assert not amx.amx_pointwise_codes_fits(conv_geometry((1, 64, 5, 5), (96, 64, 1, 1), 1, 0, 1, 1))  # 25 pixels
    assert not amx.amx_pointwise_codes_fits(conv_geometry((1, 64, 8, 8), (96, 64, 3, 3), 1, 1, 1, 1))  # 3x3
    assert not amx.amx_pointwise_codes_fits(conv_geometry((1, 64, 8, 8), (96, 64, 1, 1), 2, 0, 1, 1))  # stride 2
    assert not amx.amx_pointwise_codes_fits(conv_geometry((1, 64, 8, 8), (24, 64, 1, 1), 1, 0, 1, 1))  # 24 outputs
    with pytest.raises(ValueError, match="pointwise|1x1"):
        amx.amx_pointwise_codes((1, 64, 8, 8), 24, 4, 15, 1.0)


def _pointwise_cnn(tmp_path, size: int):
    torch.manual_seed(size + 1)
    float_model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU6(),  # float input: the float chain
        nn.Conv2d(64, 96, 1), nn.BatchNorm2d(96), nn.ReLU6(),  # codes from the tiles
        nn.Conv2d(96, 64, 1),  # no activation: signed codes, from the tiles
        nn.Conv2d(64, 32, 1), nn.ReLU(),  # reads them (offset codes where they fit), from the tiles
        nn.Conv2d(32, 32, 1),  # its float output goes to the pool: no codes
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=4, quantize_first_input=False))
    return csqc.load(csqc.save(model, tmp_path / f"p{size}.pt", torch.rand(1, 3, size, size)))


@needs_amx
@pytest.mark.parametrize("size", [8, 7])
def test_calibrated_pointwise_convs_write_codes_from_the_tiles_and_verify_exactly(tmp_path, size):
    """The three pointwise convs whose codes another conv reads write them from their tiles (no
    accumulator buffer), equal the VNNI artifact's at every plane setting, and verify exactly;
    a code base moved by one step in one channel is caught."""
    from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split

    model = _pointwise_cnn(tmp_path, size)
    calib = [np.random.default_rng(0).random((8, 3, size, size), dtype=np.float32)]
    art, vnni = tmp_path / "tiles.so", tmp_path / "vnni.so"
    csqc.compile(model, "llvm", art, calibrate=calib)
    csqc.compile(model, "llvm", vnni, calibrate=calib, mcpu="icelake-server")
    m = runtime.load(art)
    fused = sorted(name for name, info in m.layers.items() if str(info.get("codes", "")).endswith("in the conv"))
    assert fused == ["3", "6", "7"], {name: info.get("codes") for name, info in m.layers.items()}
    assert all(m.layers[name]["tensors"]["acc"] is None for name in fused)
    assert [runtime._kernel_kind(s["func"]) for s in m.plan["steps"]].count("amxcodes") == 3
    x = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
    for skip in (0, 1):
        np.testing.assert_array_equal(m(x, skip_planes=skip), runtime.load(vnni)(x, skip_planes=skip))
    inputs = [np.random.default_rng(2).random((4, 3, size, size), dtype=np.float32)]
    report = verify(model, inputs=inputs, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]

    library, members = _split(art)
    with np.load(io.BytesIO(members[WEIGHTS])) as stored:
        weights = dict(stored)
    weights["6.code_base"] = weights["6.code_base"].copy()
    weights["6.code_base"][5] += 1
    buffer = io.BytesIO()
    np.savez(buffer, **weights)
    bad = tmp_path / "bad.so"
    bad.write_bytes(_resealed(library, members[PLAN], buffer.getvalue()))
    report = verify(model, inputs=inputs, artifact=str(bad), per_layer=True)
    assert not report.ok and report.to_json()["first_divergence"]["tensor"] == "7.xq"  # the reader's codes


# -- codes from the VNNI pixel conv's stack tile (kernels.bitparallel_conv2d_codes) ---------------
CONV_CODE_CASES = [  # (batch, C, O, H, W, stride): every task's tile holds its channels' whole planes
    (1, 64, 96, 7, 7, 1),  # 49 positions: two vectors, overlapping; tiles of 8 channels x 2 vectors
    (2, 96, 40, 14, 14, 1),  # 196 positions, two images; 40 outputs: the weights' last tile partial
    (1, 20, 64, 5, 9, 1),  # 45 positions; 20 inputs: a partial channel group
    (1, 32, 64, 14, 14, 2),  # stride 2: 7x7 outputs, columns of one phase
]


@needs_avx512
@pytest.mark.parametrize("act,lo,hi,out_bits,out_scale,signed,offset,input_offset,_hw", CASES)
@pytest.mark.parametrize("batch,c,o,h,w,stride", CONV_CODE_CASES)
def test_conv_codes_equal_the_interpreter(batch, c, o, h, w, stride, act, lo, hi, out_bits, out_scale, signed,
                                          offset, input_offset, _hw):
    """The pixel conv's codes from its stack tile: the interpreter's codes of its integer product
    (less the offset of offset input codes), bit for bit, in every code layout, by the search and
    by the fixed-point form."""
    from csqc.artifact import pack_bitparallel_conv_weight

    rng = np.random.default_rng(c + o + out_bits + stride)
    g, n, _, _ = _layer(rng, o, act, lo, hi, out_bits, out_scale, signed, shallow=0.05, steep=True)
    tables = code_tables(g, n, IN_SCALE, IN_LEVELS, wide=True)
    x = rng.integers(0, 256, (batch, c, h, w)).astype(np.uint8)
    q = rng.integers(-128, 128, (o, c, 1, 1))
    off = rng.integers(-16000, 16000, o).astype(np.int32) if input_offset else None
    two_parts = signed and not offset
    oh, ow = -(-h // stride), -(-w // stride)
    shape = (batch, o, oh, ow)
    outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if two_parts else [])
    form = code_form(tables)
    acc = np.einsum("bchw,oc->obhw", x[:, :, ::stride, ::stride].astype(np.int64), q[:, :, 0, 0]).reshape(o, -1)
    codes = _codes(g, n, acc - (off[:, None] if input_offset else 0)).reshape(o, batch, oh, ow).transpose(1, 0, 2, 3)
    _check_written_codes(lambda steps: kernels.bitparallel_conv2d_codes(
        x.shape, q.shape, stride, 0, 1, kernels.ConvCodes(steps, 2**out_bits - 1, out_scale, offset, two_parts,
                                                          input_offset)),
                         [x, pack_bitparallel_conv_weight(q, 1)] + ([off] if input_offset else []), tables, form, codes,
                         out_bits, out_scale, offset, two_parts, outputs)


def test_conv_codes_take_only_convs_whose_tasks_hold_whole_planes():
    from csqc.targets.tvm.geometry import conv_geometry

    knobs = kernels.BitparallelKnobs()
    assert kernels.conv_codes_fit(conv_geometry((1, 960, 7, 7), (160, 960, 1, 1), 1, 0, 1, 1), knobs)
    assert kernels.conv_codes_fit(conv_geometry((1, 96, 14, 14), (576, 96, 1, 1), 1, 0, 1, 1), knobs)
    # 56x56: more than one row task a plane (and whole output rows: stored direct)
    assert not kernels.conv_codes_fit(conv_geometry((1, 144, 56, 56), (24, 144, 1, 1), 1, 0, 1, 1), knobs)
    assert not kernels.conv_codes_fit(conv_geometry((1, 64, 8, 8), (96, 64, 1, 1), 1, 0, 1, 1), knobs)  # direct
    assert not kernels.conv_codes_fit(conv_geometry((1, 64, 7, 7), (96, 64, 3, 3), 1, 1, 1, 1), knobs)  # padded
    assert not kernels.conv_codes_fit(conv_geometry((1, 64, 5, 5), (96, 64, 1, 1), 1, 0, 1, 1), knobs)  # 25 codes
    assert not kernels.conv_codes_fit(conv_geometry((1, 64, 7, 7), (96, 64, 1, 1), 1, 0, 1, 1),
                                      kernels.BitparallelKnobs(conv_form="channels"))
    with pytest.raises(ValueError, match="whole output planes"):
        kernels.bitparallel_conv2d_codes((1, 64, 8, 8), (96, 64, 1, 1), 1, 0, 1, kernels.ConvCodes(0, 15, 1.0))


@needs_avx512
def test_calibrated_small_plane_convs_write_their_codes_and_verify_exactly(tmp_path, monkeypatch):
    """At 7x7 the three pointwise convs whose codes another conv reads write them from the pixel
    conv's tile (one call each, no accumulator buffer), give the codes and outputs of the conv and
    epilogue they replace at every plane setting, and verify exactly."""
    from csqc.targets.llvm.backend import CpuBackend

    model = _pointwise_cnn(tmp_path, 7)
    calib = [np.random.default_rng(0).random((8, 3, 7, 7), dtype=np.float32)]
    art, unfused = tmp_path / "codes.so", tmp_path / "epilogue.so"
    csqc.compile(model, "llvm", art, calibrate=calib, mcpu="icelake-server")
    m = runtime.load(art)
    fused = sorted(name for name, info in m.layers.items() if str(info.get("codes", "")).endswith("in the conv"))
    assert fused == ["3", "6", "7"], {name: info.get("codes") for name, info in m.layers.items()}
    assert all(m.layers[name]["tensors"]["acc"] is None and f"{name}.acc" not in m.plan["buffers"] for name in fused)
    assert [runtime._kernel_kind(s["func"]) for s in m.plan["steps"]].count("convcodes") == 3
    monkeypatch.setattr(CpuBackend, "conv_codes", False)
    csqc.compile(model, "llvm", unfused, calibrate=calib, mcpu="icelake-server")
    reference = runtime.load(unfused)
    assert all(f"{name}.acc" in reference.plan["buffers"] for name in fused)
    x = np.random.default_rng(1).random((1, 3, 7, 7), dtype=np.float32) * 1.5
    for skip in (0, 1):
        got, want = {}, {}
        np.testing.assert_array_equal(m(x, skip_planes=skip, record=got), reference(x, skip_planes=skip, record=want))
        for name in fused:
            np.testing.assert_array_equal(got[f"{name}.codes"], want[f"{name}.codes"], err_msg=f"{name} skip {skip}")
    inputs = [np.random.default_rng(2).random((4, 3, 7, 7), dtype=np.float32)]
    report = verify(model, inputs=inputs, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]
