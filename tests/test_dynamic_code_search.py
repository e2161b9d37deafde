"""Under a dynamic output scale, long rows find their codes by a threshold search built per call.

Rules under test (``glue.epilogue``'s ``dynamic_search``): once the scale pass knows ``S'``, each
row (one channel) estimates its staircase's thresholds, proves each by three exact codes and
fits a fixed-point line to them (exact, or within one code and finished by one probe), else
searches them; the codes equal the float chain's bit for bit in every code layout, storage and
activation, on every path; rows the proof refuses (values past int16 in int32 storage, a zero
``mult``, a staircase flattened by a clip below zero) run the chain, and the other rows nearly
all take a line.
Compiled models take it on rows of at least ``DYNAMIC_SEARCH_MIN_ROW`` elements and verify exactly.
"""
import contextlib

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from cpus import needs_avx512
from csqc import runtime
from csqc.targets.llvm import glue
from csqc.verify import verify
from test_glue_llvm import run_kernel

F32 = np.float32
IN_SCALE, IN_LEVELS = 0.7, 15


def _rows_without_the_chain(build):
    """``build()`` with each row's float-chain fallback left out: rows that fall back leave
    their codes unwritten (``run_kernel`` zeroes its outputs), rows that search do not."""
    spans = glue.common._vector_span
    users = [m for m in (glue.common, glue.code_search, glue.epilogues) if m._vector_span is spans]

    def no_chain_rows(emit, *args):
        if emit.__name__ != "line_of":  # the rows' chain (the channels' lines are needed)
            return None
        return spans(emit, *args)

    for module in users:
        module._vector_span = no_chain_rows
    try:
        return build()
    finally:
        for module in users:
            module._vector_span = spans


def _stored(rng, shape, storage: str) -> np.ndarray:
    """Per channel a centre and a spread of its own: rows crossing few or many codes."""
    channels = shape[1]
    centre = rng.integers(-6000, 6000, channels)[None, :, None, None]
    spread = rng.integers(1, 6000, channels)[None, :, None, None]
    stored = centre + np.rint((rng.random(shape) * 2 - 1) * spread).astype(np.int64)
    return np.clip(stored, -32766, 32766).astype(storage)


CASES = [  # act, lo, hi, out_bits, signed, offset (output layout), input offset, row (h, w)
    ("clip", 0.0, 6.0, 4, False, False, True, (16, 32)),  # MobileNetV2's relu6 after an expansion
    ("clip", 0.0, 6.0, 4, False, False, False, (23, 23)),  # 529: the last vector overlaps
    ("none", 0.0, 0.0, 4, True, True, True, (32, 16)),  # a projection: offset codes, 30 levels
    ("relu", 0.0, 0.0, 4, True, False, False, (16, 33)),  # sign parts of values >= 0: 15 levels
    ("none", 0.0, 0.0, 3, True, False, True, (16, 32)),  # sign parts, 14 levels
    ("clip", -0.5, 0.75, 3, True, False, False, (16, 32)),
    ("none", 0.0, 0.0, 5, False, False, False, (24, 24)),  # 31 levels: a whole table
]


@pytest.mark.parametrize("storage", ["int16", "int32"])
@pytest.mark.parametrize("act,lo,hi,out_bits,signed,offset,input_offset,hw", CASES)
@needs_avx512
def test_searched_rows_equal_the_float_chain(storage, act, lo, hi, out_bits, signed, offset, input_offset, hw):
    rng = np.random.default_rng(sum(hw) + out_bits)
    channels = 20
    shape = (1, channels) + hw
    mult = (rng.standard_normal(channels) * 0.004).astype(F32)
    mult[:4] = [-0.003, 1e-7, -1e-7, 0.2]  # flipped, flat either way, several codes an accumulator
    add = (rng.standard_normal(channels) * 0.5).astype(F32)
    stored = _stored(rng, shape, storage)
    stored[0, 4, 0, 0] = 0  # a row of one value
    stored[0, 4] = 17
    off = rng.integers(-3000, 3000, channels).astype(np.int32) if input_offset else None
    inputs = [stored] + ([off] if input_offset else []) + [np.array([F32(IN_SCALE)]), mult, add]
    outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if signed and not offset else [])
    options = dict(has_offset=input_offset, out_bits=out_bits, out_scale=0.0, out_signed=signed, out_offset=offset,
                   **({"acc_storage": "int16"} if storage == "int16" else {}))

    def epilogue(**extra):
        return glue.epilogue(shape, 1, IN_LEVELS, act, lo, hi, True, **options, **extra)

    chain = run_kernel(epilogue(), *inputs, outputs=outputs)
    searched = run_kernel(epilogue(dynamic_search=True), *inputs, outputs=outputs)
    for got, want in zip(searched, chain):
        np.testing.assert_array_equal(got, want)
    # the rows' lines wrote them, not the search or the chain (a clip below zero flattens rows: some fall back)
    alone = run_kernel(_rows_without_the_chain(lambda: _without_the_search(lambda: epilogue(dynamic_search=True))),
                       *inputs, outputs=outputs)
    assert _rows_equal(alone, chain).mean() >= (0.5 if lo < 0 else 0.9), _rows_equal(alone, chain)
    # and the search alone, which rows whose line does not hold take, gives them too
    with _line_kinds(()):
        for got, want in zip(run_kernel(epilogue(dynamic_search=True), *inputs, outputs=outputs), chain):
            np.testing.assert_array_equal(got, want)


def _rows_equal(got, want) -> np.ndarray:
    """Per row (channel) of the codes, whether ``got`` equals ``want`` (outputs after the scale)."""
    channels = want[1].shape[1]
    return np.all([(a == b).reshape(channels, -1).all(axis=1) for a, b in zip(got[1:], want[1:])], axis=0)


def _without_the_search(build):
    """``build()`` with the rows that take the threshold search left out (unwritten, as
    :func:`_rows_without_the_chain` leaves the chain's)."""
    searched_rows = glue.code_search.searched_rows
    glue.code_search.searched_rows = lambda *_: None
    try:
        return build()
    finally:
        glue.code_search.searched_rows = searched_rows


@contextlib.contextmanager
def _line_kinds(kinds):
    """Kernels built inside try only these kinds of line per row (() : every row searches)."""
    saved = glue.code_search.LINE_KINDS
    glue.code_search.LINE_KINDS = kinds
    try:
        yield
    finally:
        glue.code_search.LINE_KINDS = saved


@pytest.mark.parametrize("act,lo,hi,out_bits,signed,offset,input_offset,hw", [CASES[0], CASES[2], CASES[4], CASES[6]])
@needs_avx512
def test_rows_whose_line_is_within_one_code_give_the_chains_codes(act, lo, hi, out_bits, signed, offset, input_offset,
                                                                  hw):
    """Lines only within one code of the staircase (one probe of the row's steps finishes each
    code) are what rows of wide steps take: forced on every row here, they give the chain's codes."""
    rng = np.random.default_rng(sum(hw) * 3 + out_bits)
    channels = 12
    shape = (1, channels) + hw
    mult = (rng.standard_normal(channels) * 0.003).astype(F32)
    mult[:2] = [-0.002, 0.3]
    add = (rng.standard_normal(channels) * 0.5).astype(F32)
    stored = _stored(rng, shape, "int16")
    off = rng.integers(-3000, 3000, channels).astype(np.int32) if input_offset else None
    inputs = [stored] + ([off] if input_offset else []) + [np.array([F32(IN_SCALE)]), mult, add]
    outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if signed and not offset else [])
    options = dict(has_offset=input_offset, out_bits=out_bits, out_scale=0.0, out_signed=signed, out_offset=offset,
                   acc_storage="int16")

    def epilogue(**extra):
        return glue.epilogue(shape, 1, IN_LEVELS, act, lo, hi, True, **options, **extra)

    chain = run_kernel(epilogue(), *inputs, outputs=outputs)
    with _line_kinds((glue.code_search._WITHIN_ONE,)):
        for got, want in zip(run_kernel(epilogue(dynamic_search=True), *inputs, outputs=outputs), chain):
            np.testing.assert_array_equal(got, want)
        alone = run_kernel(_rows_without_the_chain(lambda: _without_the_search(lambda: epilogue(dynamic_search=True))),
                           *inputs, outputs=outputs)
    assert _rows_equal(alone, chain).mean() >= 0.9, _rows_equal(alone, chain)


@needs_avx512
def test_rows_past_int16_and_constant_channels_run_the_float_chain():
    """int32 rows with values past int16 (the search compares them saturated) or down to -32768
    (a threshold below every value would be -32769) and a channel whose
    mult is zero (constant codes: its estimate is NaN) are refused by the proof, run the chain,
    and still give the chain's codes; the rows around them search."""
    rng = np.random.default_rng(3)
    channels, shape = 6, (1, 6, 16, 32)
    mult = np.array([0.004, 0.0, -0.004, 0.003, 0.002, -0.001], F32)
    add = np.array([0.1, 0.7, -0.2, 0.0, 0.3, 0.05], F32)
    stored = _stored(rng, shape, "int32")
    stored[0, 3, 5, 5] = 40000
    stored[0, 4, 2, 2] = -(2**15)  # a level every element reaches sits at -32769, past int16: refused too
    stored[0, 5, 0, 0] = -(2**31) + 5
    options = dict(out_bits=4, out_scale=0.0, out_signed=True, out_offset=True)
    inputs = [stored, np.array([F32(IN_SCALE)]), mult, add]
    outputs = [((1,), "float32"), (shape, "uint8")]

    def epilogue(**extra):
        return glue.epilogue(shape, 1, IN_LEVELS, "none", 0.0, 0.0, True, **options, **extra)

    chain = run_kernel(epilogue(), *inputs, outputs=outputs)
    searched = run_kernel(epilogue(dynamic_search=True), *inputs, outputs=outputs)
    for got, want in zip(searched, chain):
        np.testing.assert_array_equal(got, want)
    alone = run_kernel(_rows_without_the_chain(lambda: epilogue(dynamic_search=True)), *inputs, outputs=outputs)
    searched_rows = (alone[1] == chain[1]).reshape(channels, -1).all(axis=1)
    assert searched_rows.tolist() == [True, False, True, False, False, False]


def test_dynamic_search_needs_what_it_relies_on():
    shape = (1, 8, 16, 32)
    ok = dict(out_bits=4, out_scale=0.0, acc_storage="int16")
    glue.epilogue(shape, 1, IN_LEVELS, "relu", 0.0, 0.0, False, dynamic_search=True, **ok)
    for bad in (dict(ok, out_scale=1.5), dict(ok, acc_storage=None, acc_dtype="int64"), dict(ok, has_neg=True),
                dict(ok, keep_y=True), dict(ok, out_bits=8)):
        with pytest.raises(ValueError, match="dynamic_search"):
            glue.epilogue(shape, 1, IN_LEVELS, "relu", 0.0, 0.0, False, dynamic_search=True, **bad)
    with pytest.raises(ValueError, match="dynamic_search"):  # rows too short to pay
        glue.epilogue((1, 8, 8, 8), 1, IN_LEVELS, "relu", 0.0, 0.0, False, dynamic_search=True, **ok)
    assert not glue.dynamic_search_fits(shape, 1, None, 4, 0.0, False, "int16", False, False, False)


@pytest.fixture(scope="module")
def inverted_residual(tmp_path_factory):
    """MobileNetV2-like blocks at 24x24 (rows of 576: searched) and 12x12 (rows of 144: the chain)."""
    torch.manual_seed(7)

    def block(c, e, stride):
        return [nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.ReLU6(), nn.Conv2d(e, e, 3, stride, 1, groups=e),
                nn.BatchNorm2d(e), nn.ReLU6(), nn.Conv2d(e, c, 1), nn.BatchNorm2d(c)]

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), *block(8, 24, 1), *block(8, 24, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("dsearch")
    model = csqc.finalize(csqc.convert(net, n_bits=3, act_bits=4))
    path = csqc.save(model, folder / "m.pt", torch.rand(1, 3, 24, 24))
    return csqc.load(path), csqc.compile(csqc.load(path), "llvm", folder / "m.so").output


@needs_avx512
def test_models_search_long_rows_under_dynamic_scales_and_verify_exactly(inverted_residual):
    model, art = inverted_residual
    m = runtime.load(art)
    searched = [name for name, info in m.layers.items() if info.get("codes", "").startswith("fixed-point line per row, found per call")]
    assert len(searched) >= 2, {k: v.get("codes") for k, v in m.layers.items()}
    assert all(m.layers[name]["tensors"]["acc"] for name in searched)
    report = verify(model, samples=4, artifact=str(art), per_layer=True)
    assert report.accumulators_exact, report.to_json()
    rows = [r for r in report.layers if r["runtime"].startswith("artifact:") and r["checked"].get("xq")]
    assert rows and all(r["mismatched"]["xq"] == 0 for r in rows), rows
    x = np.random.default_rng(1).random(m.inputs[0]["shape"], dtype=np.float32)
    graph = csqc.optimize(model)
    for skip in (1, 2):  # fewer planes: other accumulators, other scales, the interpreter's codes still
        record, golden = {}, {}
        y = m(x, skip_planes=skip, record=record)
        kept = {n: m._kept_planes(n, skip) for n in m.layers}
        (expected,) = csqc.interpreter.run(graph, [x], record=golden, planes_used=kept)
        offsets = {info["tensors"].get("xq"): info["tensors"].get("xq_offset", 0) for info in m.layers.values()}
        for step in (s for s in m.plan["steps"] if s.get("layer") in searched and "scale_arg" in s):
            scale, codes = step["args"][step["scale_arg"]], step["args"][step["scale_arg"] + 1]
            np.testing.assert_array_equal(record[scale].reshape(-1), np.reshape(golden[scale], -1))
            np.testing.assert_array_equal(record[codes].astype(np.int64) - offsets[codes], golden[codes],
                                          err_msg=f"{step['layer']} at skip {skip}")
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@needs_avx512
def test_asymmetric_input_codes_search_too():
    """A zero point moves each row's accumulators by ``zero_point * weight sums`` (``acc_offset``):
    the thresholds are found in the stored values' own terms, so rows search and give the chain's codes."""
    rng = np.random.default_rng(11)
    channels, shape = 12, (1, 12, 16, 32)
    mult = (rng.standard_normal(channels) * 0.004).astype(F32)
    add = (rng.standard_normal(channels) * 0.5).astype(F32)
    stored = _stored(rng, shape, "int32")
    sums = rng.integers(-300, 300, channels).astype(np.int32)
    options = dict(has_offset=True, has_zero_point=True, out_bits=4, out_scale=0.0, out_signed=True, out_offset=True)
    inputs = [stored, sums, np.array([F32(IN_SCALE)]), np.array([9], np.int32), mult, add]
    outputs = [((1,), "float32"), (shape, "uint8")]

    def epilogue(**extra):
        return glue.epilogue(shape, 1, IN_LEVELS, "none", 0.0, 0.0, True, **options, **extra)

    chain = run_kernel(epilogue(), *inputs, outputs=outputs)
    for got, want in zip(run_kernel(epilogue(dynamic_search=True), *inputs, outputs=outputs), chain):
        np.testing.assert_array_equal(got, want)
    alone = run_kernel(_rows_without_the_chain(lambda: epilogue(dynamic_search=True)), *inputs, outputs=outputs)
    assert (alone[1] == chain[1]).reshape(channels, -1).all(axis=1).all()
