"""Lowering an optimized IR graph to one TVM module plus an execution plan (every TVM target).

Every IR node becomes one or more calls of scheduled TensorIR kernels built by the target's
backend (``csqc.targets.tvm.backend.TvmBackend``: ``kernels`` for the quantized layers, ``glue``
for everything else); identical kernels are built once. The plan
lists buffers (inputs, packed weights, intermediates) and the calls in order; the runtime
(``csqc.runtime``) executes it with numpy and the TVM runtime only.

Per quantized layer the backend picks a kernel (``TvmBackend.choose_kernel``):
  * ``bitserial``: AND + popcount over packed weight planes and activation bitplanes; work
    scales with planes x activation bits, so it wins for few rows (batch-1 matrix-vector);
  * ``bitparallel``: planes combined into int8 weights, VNNI int8 dot products; wins once many
    output rows share each weight load (convolutions with large outputs, batch >= 16);
  * ``lut`` (weight-only, linear layers with float input): table lookups of partial sums of
    four float activations indexed by nibbles of the packed weight planes (T-MAC style), so the
    weights stream at their plane count in bits instead of 32; wins for few rows;
  * ``float``: the layer's input is not quantized (e.g. a network's first layer), so it runs
    as a float convolution on the integer weights, then the same epilogue.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from csqc.artifact import float_layout_shape, float_layout_weight, pack_bitparallel_layout, prefix_weight_range
from csqc.errors import CompileError
from csqc.interpreter import decode_weight
from csqc.ir import Graph, Node
from csqc.optable import OP_TABLE
from csqc.targets.registry import describe_nodes
from csqc.bitplanes import unpack_planes
from csqc.passes.accumulator_width import INT32_LIMIT, accumulator_bound

from .backend import LayerChoice, TvmBackend
from .code_thresholds import TABLE_ENTRIES, code_form, code_tables, saturation_thresholds
from .geometry import conv_geometry, is_depthwise_layer

__all__ = ["Plan", "LayerChoice", "output_rows", "unsupported_ops", "lowerable_ops", "lower_graph"]

log = logging.getLogger(__name__)

_F32 = "float32"


def _given(**options) -> dict:
    """The keyword options that are set (a backend without a knob takes none)."""
    return {k: v for k, v in options.items() if v is not None}


def _float_layout(knobs) -> tuple[str | None, int]:
    """``(layout, block)`` of a float conv's weights for its schedule (``csqc.artifact.FLOAT_LAYOUTS``;
    None: as they are)."""
    if knobs is None:
        return None, 0
    if getattr(knobs, "winograd_block", 0):
        return "winograd", knobs.winograd_block
    return ("channel_lanes", 0) if knobs.row_block else (None, 0)


def _float_layout_entry(layout: str | None, block: int) -> dict:
    """A layer's plan keys for its float weights' layout (none where they are as they are)."""
    if layout is None:
        return {}
    return {"float_layout": layout, **({"float_block": block} if block else {})}


FORM = -1  # _code_tables' steps where the codes come from the fixed-point form, not a search


@dataclass
class Plan:
    """What the runtime executes: buffers, calls, and the PrimFuncs to build into one library."""

    funcs: dict[str, object] = field(default_factory=dict)  # global symbol -> PrimFunc
    buffers: dict[str, dict] = field(default_factory=dict)  # name -> {shape, dtype, kind[, alias]}
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    entry: dict | None = None  # the whole-model function's call, see whole_model.py
    # call-site symbol -> the kernel it calls: the whole-model function calls each step through a
    # symbol of its own, which the link defines as that kernel's (build.py)
    calls: dict[str, str] = field(default_factory=dict)
    pools: dict[str, int] = field(default_factory=dict)  # shared memory of temporary buffers (memory.py): name -> bytes
    _by_key: dict[str, str] = field(default_factory=dict)

    def func(self, key: str, build: Callable[[], object]) -> str:
        """Name of the kernel for ``key``, building its PrimFunc the first time."""
        if key not in self._by_key:
            name = f"k{len(self.funcs)}_{key.split('(')[0]}"
            self.funcs[name] = build()
            self._by_key[key] = name
        return self._by_key[key]

    def buffer(self, name: str, shape, dtype: str, kind: str = "temp", alias: str | None = None) -> str:
        entry = {"shape": [int(s) for s in shape], "dtype": dtype, "kind": kind}
        if alias:
            entry["alias"] = alias
        self.buffers[name] = entry
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.weights[name] = array
        return self.buffer(name, array.shape, str(array.dtype), "weight")

    def call(self, func: str, args: list, layer: str | None = None) -> None:
        self.steps.append({"func": func, "args": args, **({"layer": layer} if layer else {})})


@dataclass(frozen=True)
class _PendingEpilogue:
    """An integer layer's epilogue held back until the residual ``add`` that reads its output."""

    layer: Node
    key: str  # kernel key of the epilogue without its output options
    build: Callable[..., object]  # glue.epilogue with the layer's options bound; takes the output options
    args: list  # the layer's arguments (accumulators, scales, mult, add)


def output_rows(n: Node) -> int:
    """Output rows of a quantized layer: the M of its (implicit) GEMM, which the cost models weigh."""
    shape = n.type.shape
    if n.op == "qconv2d":
        return int(shape[0] * shape[2] * shape[3])
    return int(np.prod(shape[:-1]))


class _Lowerer:
    def __init__(self, g: Graph, backend: TvmBackend, force_kernel: str | None = None,
                 on_layer: Callable[[str], None] | None = None):
        b = backend
        self.target_name = b.name
        self.glue, self.kernels, self.packing, self.choose_kernel = b.glue, b.kernels, b.packing, b.choose_kernel
        # whether the backend's bit-parallel kernel is exact for a layer (--kernel bitparallel
        # keeps the chosen kernel where it is not); default: int8 weights
        self.bitparallel_exact = getattr(b, "bitparallel_exact", None)
        # a backend may tune the bit-serial knobs to its CPU (the llvm one: table lookups)
        self.bitserial_knobs = getattr(b, "bitserial_knobs", self.kernels.BitserialKnobs)
        # a backend may store 4-bit linear weights as nibbles (the llvm one: kernels.nibble_dense)
        self.backend_nibble_high = getattr(b, "nibble_high", None)
        self.nibble_highs: dict[str, int | None] = {}  # linear layer -> its nibble layout (None: int8)
        # a backend may run bit-parallel layers on matrix tiles (the llvm one: AMX, kernels.amx_dense / amx_conv2d)
        self.backend_tile_dense = getattr(b, "tile_dense", None)
        # and take both sign parts of signed codes in one pass (the llvm one at few rows: AVX-512, AVX2 within int16)
        self.backend_signed_dense = getattr(b, "signed_dense", None)
        self.signed_dense_layers: dict[str, bool] = {}  # linear layer -> whether it takes both sign parts in one pass
        # and, in its small dense kernel, in one dot product (the llvm one: AVX-512, AVX2 within int16)
        self.backend_small_dense_one_product = getattr(b, "small_dense_one_product", None)
        self.backend_tile_conv = getattr(b, "tile_conv", None)
        # and write a calibrated conv's codes straight from the tiles (amx_pointwise_codes), or a
        # linear layer's float output (amx_dense_epilogue)
        self.backend_tile_codes = getattr(b, "tile_codes", None)
        self.backend_tile_dense_epilogue = getattr(b, "tile_dense_epilogue", None)
        # a backend may pick bit-parallel schedules per shape (the llvm one: csqc compile --tune)
        self.backend_conv_knobs = getattr(b, "conv_knobs", None)
        self.backend_dense_knobs = getattr(b, "dense_knobs", None)
        # channel groups of a bit-parallel conv whose dot products add before widening (llvm's AVX2 tier)
        self.backend_conv_int16_groups = getattr(b, "conv_int16_groups", None)
        self.backend_bitserial_dense_knobs = getattr(b, "bitserial_dense_knobs", None)
        # float lanes of the dequantizing weight-only kernel (the llvm one: 8 on AVX2)
        self.dequant_lanes = getattr(b, "dequant_lanes", None) or getattr(self.kernels, "LUT_LANES", 16)
        self.g = g
        self.plan = Plan()
        self.force = force_kernel
        self.on_layer = on_layer
        self.producers = g.producers()
        self.quant_parts: dict[str, tuple[str, str | None, str]] = {}  # quantize node -> (pos, neg, scale)
        self.offset_codes = b.offset_codes
        self.fused_requant = b.fused_requant
        self.int16_depthwise = b.int16_depthwise
        # shapes whose depthwise int16 accumulation loses on this backend (llvm's AVX2 tier)
        self.backend_depthwise_int16_pays = getattr(b, "depthwise_int16_pays", None)
        # ... two taps a multiply (byte pairs of int8 weights and codes), where the backend has them
        self.depthwise_tap_pairs = bool(getattr(b, "depthwise_tap_pairs", False))
        self.int16_conv_outputs = b.int16_conv_outputs
        # a calibrated conv's codes by a search over integer thresholds (the llvm glue's code_search)
        self.code_search = bool(getattr(b, "code_search", False))
        # ... or by each channel's proved fixed-point form, where every channel has one
        self.code_form = bool(getattr(b, "code_form", False))
        # ... and a depthwise conv writes those codes itself (kernels.bitparallel_depthwise_codes)
        self.depthwise_codes = self.code_form and bool(getattr(b, "depthwise_codes", False))
        # a depthwise conv between two clipped dynamic scales (ReLU6) tries its codes at the clips'
        # bounds first (kernels.bitparallel_depthwise_saturated_codes)
        self.saturated_scales = self.depthwise_codes and self.code_search and bool(getattr(b, "saturated_scales", False))
        self.code_offset: dict[str, int] = {}  # quantize node -> L, when its codes are offset codes
        # asymmetric quantize node -> its int32 zero-point buffer, when its codes are the unsigned u
        self.zero_points: dict[str, str] = {}
        self.users = g.users()
        self.fused_quantize: set[str] = set()  # dynamic quantize nodes their producer's epilogue computes
        # runs of elementwise nodes become one kernel (a backend whose glue has elementwise_chain)
        self.fuse_elementwise = bool(getattr(b, "fuse_elementwise", False)) and hasattr(b.glue, "elementwise_chain")
        # residual blocks: an integer layer's epilogue waits for the add that reads its output
        # (the other operand may come later in the plan, e.g. a downsample), then computes the
        # add, the activation after it and its quantization in the same kernel
        self.fused_residual = b.fused_residual and b.fused_requant
        self.pending_epilogues: dict[str, _PendingEpilogue] = {}  # add node -> its layer's epilogue
        self.lowered_by_producer: set[str] = set()  # activations a fused residual epilogue computed

    # -- helpers -----------------------------------------------------------------------------
    def ref(self, value: str) -> str:
        """Buffer name of an IR value (parameters become weight buffers on first use)."""
        if value in self.plan.buffers:
            return value
        if value in self.g.params:
            arr = self.g.params[value]
            return self.plan.weight(value, arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
        raise CompileError(f"value %{value} has no buffer (internal planner error)")

    def out(self, n: Node, dtype: str = _F32) -> str:
        return self.plan.buffer(n.name, n.type.shape, dtype)

    # -- node kinds --------------------------------------------------------------------------
    def lower(self) -> Plan:
        for v in self.g.inputs:
            self.plan.buffer(v.name, v.type.shape, v.type.dtype, "input")
            self.plan.inputs.append({"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype})
        run: list[Node] = []  # consecutive elementwise nodes (and quantizers) for one fused kernel
        for n in self.g.nodes:
            if n.name in self.lowered_by_producer:  # (a relu a residual epilogue computed)
                if self.on_layer:
                    self.on_layer(n.name)
                continue
            if self._chain_member(n, run):
                run.append(n)
                if n.op == "quantize" and not float(n.attr("static_scale", 0.0)) > 0:
                    run = self._lower_chain(run)  # the runtime checks one dynamic scale per call
                continue
            run = self._lower_chain(run)
            self._lower_node(n)
        self._lower_chain(run)
        for o in self.g.outputs:
            buf = self.plan.buffers.get(o)
            if buf is None or o in self.quant_parts:
                raise CompileError(f"output %{o} must be a float tensor")
            self.plan.outputs.append({"name": o, "shape": buf["shape"], "dtype": buf["dtype"],
                                      **self._finite_output_bound(o)})
        self._drop_unread_views()
        return self.plan

    def _finite_output_bound(self, o: str) -> dict:
        """``{"finite_below": ...}`` where output ``o`` is a quantized layer's float ``y`` (empty
        otherwise): ``|y|`` and every value its epilogue forms stay below ``S * per_scale + plus``
        (``S`` the input scale, in buffer ``scale``), from the accumulator bound. Where that is
        below 2^120 the runtime need not scan the output for NaN or infinity."""
        n = self.producers.get(o)
        info = self.plan.layers.get(n.name, {}) if n is not None else {}
        if n is None or n.op not in ("qlinear", "qconv2d") or n.quant.act_bits is None or n.quant.out_bits is not None \
                or info.get("tensors", {}).get("out") != o or n.inputs[0] not in self.quant_parts:
            return {}
        if not all(v in self.g.params for v in n.inputs[2:]):
            return {}
        levels = 2**n.quant.act_bits - 1
        mult = float(np.abs(self.g.params[n.inputs[2]]).max(initial=0.0))
        plus = float(np.abs(self.g.params[n.inputs[3]]).max(initial=0.0)) if len(n.inputs) == 4 else 0.0
        # float(acc) * S, / L, * mult: the largest of them, with room for each step's rounding
        per_scale = accumulator_bound(self.g, n) * max(1.0, mult / levels) * (1 + 2.0**-20)
        if not (np.isfinite(per_scale) and np.isfinite(plus)):
            return {}
        return {"finite_below": {"scale": self.quant_parts[n.inputs[0]][2], "per_scale": per_scale,
                                 "plus": plus * (1 + 2.0**-20)}}

    def _lower_node(self, n: Node) -> None:
        getattr(self, f"lower_{OP_TABLE[n.op].tvm}")(n)  # lower_graph checked coverage up front
        if self.on_layer:
            self.on_layer(n.name)

    # -- elementwise chains ------------------------------------------------------------------
    def _chain_member(self, n: Node, run: list[Node]) -> bool:
        """Whether ``n`` can join ``run``, a stretch of consecutive nodes (in graph order, so the
        stretch runs as one call where its last node would: every input it reads is ready, every
        outside reader comes later) computed by one ``glue.elementwise_chain`` kernel."""
        if not self.fuse_elementwise or n.name in self.pending_epilogues:  # (a residual epilogue's add)
            return False
        if n.op == "quantize":  # quantizers run last in the kernel, from a materialized buffer
            return n.name not in self.fused_quantize and n.type.qbits <= 8
        if n.op not in self.glue.CHAIN_OPS or n.type.dtype != _F32:
            return False
        return all(self.g.type_of(v).dtype == _F32 for v in n.inputs)

    def _lower_chain(self, run: list[Node]) -> list[Node]:
        """Lower ``run`` as one fused kernel (a single node as usual); returns an empty run."""
        if len(run) == 1:
            self._lower_node(run[0])
        elif run:
            self._fused_chain(run)
            for n in run:
                if self.on_layer:
                    self.on_layer(n.name)
        return []

    def _fused_chain(self, run: list[Node]) -> None:
        """One ``elementwise_chain`` call for ``run``: values read outside it (graph outputs,
        later nodes, its quantizers) get buffers, the others stay in registers. Values get
        positional names in the kernel, so equal chains (an LSTM stack's layers) share a kernel."""
        ops = [n for n in run if n.op != "quantize"]
        members = {n.name for n in ops}
        outputs = [n.name for n in ops if n.name in self.g.outputs
                   or any(u.name not in members for u in self.users.get(n.name, []))]
        inputs = list(dict.fromkeys(v for n in run for v in n.inputs if v not in members))
        local = {v: f"x{i}" for i, v in enumerate(inputs)} | {n.name: f"t{i}" for i, n in enumerate(ops)}
        in_bufs = [self.ref(v) for v in inputs]
        chain_ops = tuple(self.glue.ChainOp(local[n.name], n.op, tuple(n.type.shape),
                                            tuple(local[v] for v in n.inputs), self._chain_attrs(n)) for n in ops)
        out_bufs = [self.out(self.producers[o]) for o in outputs]
        quantizers, quant_bufs, dynamic = [], [], None
        for n in run:
            if n.op == "quantize":
                options, outs = self._quantize_outputs(n)
                if not options["static_scale"] > 0:
                    dynamic = (n, len(in_bufs) + len(out_bufs) + len(quant_bufs), 2**options["bits"] - 1)
                quantizers.append(self.glue.ChainQuantize(local[n.inputs[0]], **options))
                quant_bufs += outs
        spec = (tuple((local[v], tuple(self.plan.buffers[b]["shape"])) for v, b in zip(inputs, in_bufs)),
                chain_ops, tuple(local[o] for o in outputs), tuple(quantizers))
        f = self.plan.func(f"chain({spec!r})", lambda: self.glue.elementwise_chain(*spec))
        self.plan.call(f, in_bufs + out_bufs + quant_bufs, run[-1].name)
        if dynamic is not None:  # the runtime checks the dynamic scale like a quantize step's
            n, scale_arg, levels = dynamic
            self.plan.steps[-1].update(levels=levels, scale_arg=scale_arg, quantizer=n.name)

    def _chain_attrs(self, n: Node) -> tuple:
        if n.op == "clip":
            return float(n.attr("lo")), float(n.attr("hi"))
        if n.op == "slice":
            return int(n.attr("axis")) % len(n.type.shape), int(n.attr("start"))
        return ()

    def _drop_unread_views(self) -> None:
        """Views nothing reads (a reshape whose consumer took its own 2-D view of the same data)."""
        plan = self.plan
        used = {a for step in plan.steps for a in step["args"] if isinstance(a, str)}
        used |= {s["name"] for s in plan.inputs + plan.outputs}
        used |= {t for info in plan.layers.values() for t in info.get("tensors", {}).values() if isinstance(t, str)}
        used |= {b["alias"] for b in plan.buffers.values() if "alias" in b}
        for name in [n for n, b in plan.buffers.items() if "alias" in b and n not in used]:
            del plan.buffers[name]

    def _offset_codes_fit(self, n: Node) -> bool:
        """Whether signed codes of quantize node ``n`` can be offset codes ``code + L`` (an
        asymmetric quantizer's: ``u - zp + L``, where its readers cannot take ``u`` itself).

        Offset codes are in ``[0, 2L]``: they fit uint8 up to 7 bits, and doubling the largest
        code doubles the accumulator bound, which must stay within every user's accumulator.
        Convolutions take them on the bit-parallel kernels, padded with ``L`` (the offset code of
        zero), or unpadded (MobileNetV2's expand convs read the signed residual stream, a U-Net's
        convs the concatenation of a signed upsampling and a skip, EfficientNet's depthwise convs
        SiLU's outputs: one pass instead of one per sign).
        """
        if not (self.offset_codes and (n.type.qsigned or n.attr("asymmetric", False)) and n.type.qbits <= 7):
            return False
        for user in self.users.get(n.name, []):
            if user.op == "dequantize":
                continue
            if user.inputs[0] != n.name or not (user.op == "qlinear" or self._conv_takes_offset_codes(user)):
                return False
            limit = INT32_LIMIT if user.quant.acc_dtype == "int32" else 2**63 - 1
            if 2 * accumulator_bound(self.g, user) > limit:
                return False
        return True

    def _zero_point_codes_fit(self, n: Node) -> bool:
        """Whether asymmetric quantize node ``n`` can hand its unsigned codes ``u`` and zero point to
        its readers (``acc - zp * sum_k q[c, k]`` in the epilogue), on a backend with offset
        codes: linear layers, and bit-parallel convs that read a code at every tap (as for
        offset codes, :meth:`_conv_takes_offset_codes`), where padding reads as ``zp``: a static
        zero point (calibrated) pads with itself, a dynamic one only unpadded convs."""
        if not self.offset_codes:
            return False
        static = float(n.attr("static_scale", 0.0)) > 0
        for u in self.users.get(n.name, []):
            if u.inputs[0] != n.name:
                return False
            padded = u.op == "qconv2d" and any(int(p) for p in u.attr("padding"))
            if not (u.op == "qlinear" or (self._conv_takes_offset_codes(u) and (static or not padded))):
                return False
        return True

    def _quantize_outputs(self, n: Node) -> tuple[dict, list[str]]:
        """The options (``glue.ChainQuantize``'s fields) and output buffers of quantize node ``n``
        (scale[, zero point], codes[, negative codes]); registers its codes for their readers."""
        bits, static, shape = n.attr("bits"), float(n.attr("static_scale", 0.0)), n.type.shape
        scale = self.plan.buffer(f"{n.name}.scale", (1,), _F32)
        if n.attr("asymmetric", False):
            by_zero_point = self._zero_point_codes_fit(n)
            offset = not by_zero_point and self._offset_codes_fit(n)
            centered = not (by_zero_point or offset)
            zp = self.plan.buffer(f"{n.name}.zero_point", (1,), "int32")
            pos = self.plan.buffer(f"{n.name}.codes", shape, "uint8")
            neg = self.plan.buffer(f"{n.name}.codes_neg", shape, "uint8") if centered else None
            # centered: the sign parts of u - zp, read like signed symmetric codes; offset: u - zp + L
            self.quant_parts[n.name] = (pos, neg, scale)
            if by_zero_point:
                self.zero_points[n.name] = zp
            if offset:
                self.code_offset[n.name] = 2**bits - 1
            options = dict(bits=bits, static_scale=static, asymmetric=True, zero_point=int(n.attr("zero_point", 0)),
                           centered=centered, offset=offset)
            return options, [scale, zp, pos] + ([neg] if neg else [])
        signed, offset = bool(n.attr("signed")), self._offset_codes_fit(n)
        pos = self.plan.buffer(f"{n.name}.codes", shape, "uint8")
        neg = self.plan.buffer(f"{n.name}.codes_neg", shape, "uint8") if signed and not offset else None
        self.quant_parts[n.name] = (pos, neg, scale)
        if offset:
            self.code_offset[n.name] = 2**bits - 1
        return dict(bits=bits, static_scale=static, signed=signed, offset=offset), [scale, pos] + ([neg] if neg else [])

    def _conv_takes_offset_codes(self, n: Node) -> bool:
        """Whether quantized conv ``n`` runs on the bit-parallel kernel where every tap of every
        output reads a code plus ``L`` (``L * sum_k q[c, k]`` its exact offset): unpadded, or
        padded with ``L`` (:meth:`_pad_code`: the pixel, channel and depthwise kernels, not the
        AMX tile kernel)."""
        if n.op != "qconv2d" or self.force == "bitserial":
            return False
        if any(int(p) for p in n.attr("padding")) and self.backend_tile_conv is not None:
            geo = conv_geometry(self.g.type_of(n.inputs[0]).shape, n.attr("weight_shape"), n.attr("stride"),
                                n.attr("padding"), n.attr("dilation"), n.attr("groups"))
            if not is_depthwise_layer(n.op, n.attr("weight_shape")) and self.backend_tile_conv(geo):
                return False
        return self.choose_kernel(n, output_rows(n), decode_weight(self.g, n)).kernel == "bitparallel"

    def _pad_code(self, n: Node) -> int:
        """The code conv ``n``'s padding reads as: ``L`` where its input is offset codes, the
        static zero point where it is zero-point codes, else 0 (the code of zero each time)."""
        if not any(int(p) for p in n.attr("padding")):
            return 0
        if n.inputs[0] in self.zero_points:
            return int(self.producers[n.inputs[0]].attr("zero_point"))
        return self.code_offset.get(n.inputs[0], 0)

    def lower_quantize(self, n: Node) -> None:
        if n.name in self.fused_quantize:  # the producing layer's epilogue wrote its scale and codes
            return
        options, outs = self._quantize_outputs(n)
        shape, bits, static = n.type.shape, options["bits"], options["static_scale"]
        if options.get("asymmetric"):
            zero_point, centered, offset = options["zero_point"], options["centered"], options["offset"]
            key = f"quantize_asymmetric({shape},{bits},{static!r},{zero_point},{centered})" + (",offset" if offset else "")
            f = self.plan.func(key, lambda: self.glue.quantize_asymmetric(shape, bits, static, zero_point, centered,
                                                                          **({"offset": True} if offset else {})))
        else:
            signed, offset = options["signed"], options["offset"]
            key = f"quantize({shape},{bits},{static!r},{signed})" + (",offset" if offset else "")
            f = self.plan.func(key, lambda: self.glue.quantize(shape, bits, static, signed, offset) if offset
                               else self.glue.quantize(shape, bits, static, signed))
        self.plan.call(f, [self.ref(n.inputs[0])] + outs, n.name)
        if not static:  # the runtime checks this dynamic scale against float32's range after each run
            self.plan.steps[-1]["levels"] = 2**bits - 1

    def lower_dequantize(self, n: Node) -> None:
        pos, neg, scale = self.quant_parts[n.inputs[0]]
        bits = self.producers[n.inputs[0]].type.qbits  # a quantize node's or a fused layer's
        shape = n.type.shape
        if n.inputs[0] in self.code_offset:
            f = self.plan.func(f"dequantize({shape},{bits},True,offset)", lambda: self.glue.dequantize(shape, bits, True, True))
        else:
            f = self.plan.func(f"dequantize({shape},{bits},{neg is not None})", lambda: self.glue.dequantize(shape, bits, neg is not None))
        self.plan.call(f, [pos] + ([neg] if neg else []) + [scale, self.out(n)], n.name)

    def lower_quant_layer(self, n: Node) -> None:
        spec = n.quant
        g = self.g
        q = decode_weight(g, n)
        if not q.any():  # the default pipeline's fold_zero_layers replaces such layers by constants
            raise CompileError(f"{n.name}: layer has no nonzero weights; run the fold_zero_layers pass first")
        rows = output_rows(n)
        choice = self.choose_kernel(n, rows, q)
        if self.force and choice.kernel != "float" and spec.act_bits is not None:
            if self.force == "bitparallel" and (spec.acc_dtype == "int64" or np.abs(q).max(initial=0) > 127 or (
                    self.bitparallel_exact is not None and not self.bitparallel_exact(n, q))):
                pass  # keep the only kernel that is exact for this layer
            else:
                choice = LayerChoice(self.force, "forced")
        shape = n.type.shape
        axis = 1 if n.op == "qconv2d" else len(shape) - 1
        mult = self.ref(n.inputs[2])
        add = self.ref(n.inputs[3]) if len(n.inputs) == 4 else None
        act = n.attr("act", "none")
        lo, hi = float(n.attr("clip_lo", 0.0) or 0.0), float(n.attr("clip_hi", 0.0) or 0.0)
        info = {"kernel": choice.kernel, "reason": choice.reason, "planes": spec.num_planes,
                "plane_shifts": [int(shift) for shift, _ in spec.planes]}  # most significant first
        self.plan.layers[n.name] = info
        if choice.kernel in ("float", "lut", "dequant"):
            # (a constant input, an RNN's zero state, is not recorded by the runtime: no "in" to check)
            info["tensors"] = {"in": self.ref(n.inputs[0]) if n.inputs[0] not in self.g.params else None, "out": n.name}
            if choice.kernel == "float" and self._defer_float_residual(n, q, info, act, lo, hi, mult, add):
                return
            outs, fused, suffix = self._layer_output(n, info)
            tail_args = [mult] + ([add] if add else []) + outs
            if choice.kernel == "float" and n.op == "qconv2d" and hasattr(self.glue, "FloatTail") \
                    and fused.get("out_scale", 1.0) > 0:
                # the conv applies the epilogue while its sums are in registers (static codes or y)
                self._float_product(n, q.astype(np.float32), None, self.glue.FloatTail(
                    act, lo, hi, add is not None, **fused), tail_args, from_planes=True)
                self._requantize_after(n)
                return
            acc = self.plan.buffer(f"{n.name}.accf", shape, _F32)
            if choice.kernel in ("lut", "dequant"):
                self._weight_only_product(n, info, acc, choice.kernel)
            else:
                self._float_product(n, q.astype(np.float32), acc, from_planes=True)
            key = f"epilogue({shape},{axis},None,{act},{lo},{hi},{add is not None},float32,False)" + suffix
            f = self.plan.func(key, lambda: self.glue.epilogue(shape, axis, None, act, lo, hi, add is not None, "float32",
                                                               False, **fused))
            self.plan.call(f, [acc] + tail_args, n.name)
            self._requantize_after(n)
            return
        pos, neg, scale = self.quant_parts[n.inputs[0]]
        zero_point = self.zero_points.get(n.inputs[0])
        # unsigned asymmetric codes: acc_offset holds the weight sums (1 * sum_k q[c, k]), times zp in the epilogue
        code_offset = 1 if zero_point else self.code_offset.get(n.inputs[0], 0)
        acc_dtype = spec.acc_dtype if choice.kernel == "bitserial" else "int32"
        storage = "int16" if choice.kernel == "bitparallel" and self._int16_conv_outputs(n, code_offset) else acc_dtype
        # one kernel may take both sign parts and write their difference (one accumulator)
        split_acc = neg is not None and not (choice.kernel == "bitparallel" and self._one_call_dense(n))
        tile_codes = None if split_acc or zero_point or choice.kernel != "bitparallel" else self._tile_code_tables(n)
        depthwise_codes = None if tile_codes or split_acc or zero_point or code_offset or choice.kernel != "bitparallel" \
            else self._depthwise_code_tables(n, storage)
        tile_epilogue = not tile_codes and neg is None and choice.kernel == "bitparallel" and storage == "int32" \
            and self._tile_epilogue_fits(n)
        accs = [] if tile_codes or depthwise_codes or tile_epilogue else [self.plan.buffer(f"{n.name}.acc", shape, storage)]
        if split_acc:
            accs.append(self.plan.buffer(f"{n.name}.acc_neg", shape, storage))
        # where verify finds this layer's stable tensors (see csqc.verify.LAYER_TENSORS)
        source = self.producers[n.inputs[0]]  # a quantize node, or a layer that wrote codes (no float input)
        # the float tensor its quantizer reads, where a kernel writes it: verify then requantizes
        # that tensor and checks the codes and scale exactly (a fused residual epilogue writes its
        # float result for later readers; after a float layer it may differ from the golden
        # run's in the last bits, and so may a dynamic scale)
        # (a constant it quantizes, an RNN's zero state, is not recorded: verify compares its codes)
        float_in = source.op == "quantize" and source.inputs[0] not in self.g.params and (
            source.name not in self.fused_quantize or source.inputs[0] in self.plan.buffers)
        info["tensors"] = {"in": self.ref(source.inputs[0]) if float_in else None, "xq": pos, "xq_neg": neg,
                           "scale": scale, "acc": accs[0] if accs else None,
                           "acc_neg": accs[1] if split_acc else None, "acc_shift": spec.low_shift, "out": n.name}
        # offset codes: the kernel multiplies codes + L, so its acc exceeds the true one by
        # L * sum_k q[c, k]; the runtime keeps that per-channel term (for the planes in use)
        # in acc_offset, and the epilogue (and verify) subtract it
        acc_offset = self.plan.buffer(f"{n.name}.acc_offset", (shape[axis],), acc_dtype, "derived") if code_offset else None
        if zero_point:
            info["tensors"].update(xq_zero_point=zero_point, acc_offset=acc_offset, acc_zero_point=zero_point)
        elif code_offset:
            info["tensors"].update(xq_offset=code_offset, acc_offset=acc_offset)
        if acc_offset is not None:  # its channels' axis in acc: a linear layer's is the last, of any rank
            info["tensors"]["acc_axis"] = axis
        if tile_codes or depthwise_codes:
            for name in (mult, add):  # the tables replace the float chain's parameters (ref restores a reused one)
                if name is not None and not any(name in step["args"] for step in self.plan.steps):
                    del self.plan.buffers[name], self.plan.weights[name]
            if depthwise_codes:
                self._depthwise_codes(n, q, info, pos, depthwise_codes)
                return
            self._tile_codes(n, q, info, pos, acc_offset, *tile_codes)
            if code_offset:
                self._record_weight_sums(n, info, code_offset, acc_offset)
            return
        levels = 2**spec.act_bits - 1
        has_offset = acc_offset is not None
        epilogue_args = ([acc_offset] if has_offset else []) + [scale] + ([zero_point] if zero_point else []) \
            + [mult] + ([add] if add else [])
        if tile_epilogue:
            self._tile_dense_epilogue(n, q, info, pos, epilogue_args, self.glue.TileEpilogue(
                levels, act, lo, hi, add is not None, has_offset, bool(zero_point)))
            if code_offset:
                self._record_weight_sums(n, info, code_offset, acc_offset)
            return
        saturated = None if choice.kernel != "bitparallel" or split_acc or zero_point or code_offset \
            else self._saturated_forms(n, storage)
        done = self.plan.buffer(f"{n.name}.saturated", (1,), "int32") if saturated else None
        conv_at = len(self.plan.steps)
        if choice.kernel == "bitserial":
            self._bitserial(n, q, info, [pos] + ([neg] if neg else []), accs, 0 if zero_point else code_offset)
        else:
            self._bitparallel(n, q, info, [pos] + ([neg] if neg else []), accs, storage, code_offset, skip=done)
        if code_offset:
            self._record_weight_sums(n, info, code_offset, acc_offset)
        base_key = f"epilogue({shape},{axis},{levels},{act},{lo},{hi},{add is not None},{acc_dtype},{split_acc})" + (
            ",offset" if has_offset else "") + (",zero_point" if zero_point else "") + (
            f",{storage}" if storage != acc_dtype else "")
        options = {"has_offset": True} if has_offset else {}
        if storage != acc_dtype:
            options["acc_storage"] = storage
        if zero_point:
            options["has_zero_point"] = True
        args = accs + epilogue_args

        def build_epilogue(**output_options):
            return self.glue.epilogue(shape, axis, levels, act, lo, hi, add is not None, acc_dtype, split_acc,
                                      **options, **output_options)

        residual_add = self._residual_add_of(n)
        if residual_add is not None:
            info["tensors"]["out"] = None  # y stays in registers until the add's kernel (this epilogue)
            self.pending_epilogues[residual_add.name] = _PendingEpilogue(n, base_key, build_epilogue, args)
            return
        outs, fused, suffix = self._layer_output(n, info, exact_y=True)
        quantizer = (self._dynamic_quantize_of(n) or self._shared_quantize_of(n)).name \
            if fused.get("out_scale") == 0.0 else None
        tables, steps = self._code_tables(n, storage, split_acc or bool(zero_point), fused)
        if steps == FORM:
            fused, suffix = {**fused, "code_form": True}, suffix + ",form"
            info["codes"] = "fixed-point form"
        elif steps:
            fused, suffix = {**fused, "code_search": steps}, suffix + f",search({steps})"
            info["codes"] = f"threshold search, {steps} steps"
        elif self._dynamic_search_fits(n, storage, split_acc, fused):
            fused, suffix = {**fused, "dynamic_search": True}, suffix + ",dynamic_search"
            info["codes"] = "fixed-point line per row, found per call (threshold search where none holds)"
        bounded = None if steps or done is not None else self._bounded_forms(n, storage, split_acc or bool(zero_point),
                                                                              fused)
        if bounded is not None:
            in_bound, out_bound, bound_tables, form = bounded
            tables = [self.plan.weight(f"{n.name}.saturated.code_form", form.reshape(-1)) if form is not None
                      else self.plan.weight(f"{n.name}.saturated.code_thresholds", bound_tables.kernel_thresholds()),
                      self.plan.weight(f"{n.name}.saturated.code_base", bound_tables.base),
                      self.plan.weight(f"{n.name}.saturated.acc_flip", bound_tables.flip)]
            bound_steps = 0 if form is not None else bound_tables.steps
            fused = {**fused, "saturated_codes": (in_bound, out_bound, bound_steps)}
            suffix += f",saturated({in_bound!r},{out_bound!r},{bound_steps})"
            info["saturated_epilogue"] = {"in": in_bound, "out": out_bound}
            how = "fixed-point forms" if form is not None else f"a threshold search of {bound_steps} steps"
            info["codes"] = (f"{how} at the clips' scales ({in_bound:g}, {out_bound:g}) where both saturate; else "
                             + info.get("codes", "the float chain"))
        if done is not None:
            fused, suffix = {**fused, "skip_when_done": True}, suffix + ",skip"
        f = self.plan.func(base_key + suffix, lambda: build_epilogue(**fused))
        self.plan.call(f, args + tables + outs + ([done] if done else []), n.name)
        if done is not None:
            self._saturated_codes(n, info, saturated, conv_at, outs, done)
        if quantizer is not None:  # a dynamic scale: the runtime checks it like a quantize step's
            self.plan.steps[-1].update(levels=2**fused["out_bits"] - 1,
                                       scale_arg=len(args) + len(tables) + int("keep_y" in fused), quantizer=quantizer)
        self._requantize_after(n)

    def _tile_epilogue_fits(self, n: Node) -> bool:
        """Whether bit-parallel linear layer ``n`` runs as one tile call that applies its float
        epilogue in the core (``backend.tile_dense_epilogue``): on the generic dense path, with a
        float output its only form (no fused codes, quantizer or residual add)."""
        if self.backend_tile_dense_epilogue is None or n.op != "qlinear" or n.quant.out_bits is not None:
            return False
        if (self._dynamic_quantize_of(n) is not None or self._shared_quantize_of(n) is not None
                or self._residual_add_of(n) is not None):
            return False
        if self._small_dense(n) or self._nibble_high(n) is not None:
            return False
        x_shape = self.g.type_of(n.inputs[0]).shape
        m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
        return self.backend_tile_dense_epilogue(m, n.attr("weight_shape")[0], k)

    def _tile_dense_epilogue(self, n: Node, q: np.ndarray, info: dict, codes: str, epilogue_args: list[str],
                             tail) -> None:
        """Linear layer ``n`` as one call that writes its float output (``kernels.amx_dense_epilogue``):
        the accumulators stay in the core, so verify checks this layer by its output alone."""
        shape, x_shape = n.attr("weight_shape"), self.g.type_of(n.inputs[0]).shape
        m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
        info.update(pack="dense", tiles="amx", epilogue="in the tile kernel")
        w = self._bitparallel_weights(n, pack_bitparallel_layout("dense", q, shape, 1))
        outs, _, _ = self._layer_output(n, info, exact_y=True)
        key = f"amxdense_epilogue({m},{shape[0]},{k},{tail!r})"
        f = self.plan.func(key, lambda: self.kernels.amx_dense_epilogue(m, shape[0], k, tail))
        self.plan.call(f, [self._as_2d(codes, n), w] + epilogue_args + [self._as_2d(outs[0], n)], n.name)

    def _tile_code_tables(self, n: Node) -> tuple[list[str], int, str] | None:
        """The code tables, search steps and kernel kind of conv ``n`` where a backend kernel
        writes its codes itself (``backend.tile_codes``: a pointwise conv on AMX tiles, or the
        VNNI pixel conv whose tasks hold whole planes), with its output a static quantization
        (calibrated) and its codes found by the threshold search or the fixed-point form; else None."""
        if self.backend_tile_codes is None or n.op != "qconv2d" or self._residual_add_of(n) is not None:
            return None
        spec, x_shape = n.quant, self.g.type_of(n.inputs[0]).shape
        geo = conv_geometry(x_shape, n.attr("weight_shape"), n.attr("stride"), n.attr("padding"), n.attr("dilation"),
                            n.attr("groups"))
        kind = self.backend_tile_codes(geo) if self.fused_requant and spec.out_bits is not None \
            and spec.out_scale > 0 else None
        if not kind:
            return None
        tables, steps = self._code_tables(n, "int32", False, {"out_scale": float(spec.out_scale)})
        return (tables, steps, kind) if steps else None

    def _tile_codes(self, n: Node, q: np.ndarray, info: dict, codes: str, acc_offset: str | None,
                    tables: list[str], steps: int, kind: str) -> None:
        """Conv ``n`` as one call that writes its output codes (``kind`` ``amx``:
        ``kernels.amx_pointwise_codes``; ``pixels``: ``kernels.bitparallel_conv2d_codes``): the
        accumulators stay in the core, so verify checks this layer by its codes alone."""
        shape, x_shape = n.attr("weight_shape"), self.g.type_of(n.inputs[0]).shape
        info["codes"] = ("fixed-point form" if steps == FORM else f"threshold search, {steps} steps") + ", in the conv"
        outs, fused, suffix = self._layer_output(n, info, exact_y=True)
        levels, two_parts = 2**fused["out_bits"] - 1, len(outs) == 3
        search = 0 if steps == FORM else steps
        if kind == "amx":
            info.update(pack="conv_rows", tiles="amx")
            key = f"amxcodes({tuple(x_shape)},{shape[0]},{steps},{acc_offset is not None})" + suffix
            f = self.plan.func(key, lambda: self.kernels.amx_pointwise_codes(
                x_shape, shape[0], search, levels, float(fused["out_scale"]), fused["out_offset"], two_parts,
                acc_offset is not None))
            x = self._as_2d(codes, n)
        else:
            info["pack"] = "conv"
            stride, padding, dilation = n.attr("stride"), n.attr("padding"), n.attr("dilation")
            knobs = self.backend_conv_knobs(conv_geometry(x_shape, shape, stride, padding, dilation, 1))
            spec = self.kernels.ConvCodes(search, levels, float(fused["out_scale"]), fused["out_offset"], two_parts,
                                          acc_offset is not None)
            pad = self._pad_code(n)
            key = f"convcodes({tuple(x_shape)},{tuple(shape)},{stride},{padding},{dilation},{spec})" + suffix + (
                f",pad{pad}" if pad else "")
            f = self.plan.func(key, lambda: self.kernels.bitparallel_conv2d_codes(x_shape, shape, stride, padding,
                                                                                   dilation, spec, knobs, pad))
            x = codes
        w = self._bitparallel_weights(n, pack_bitparallel_layout(info["pack"], q, shape, 1))
        self.plan.call(f, [x, w] + ([acc_offset] if acc_offset else []) + tables + outs, n.name)

    def _depthwise_code_tables(self, n: Node, storage: str) -> list[str] | None:
        """The fixed-point forms (``_code_tables``' buffers) of depthwise conv ``n`` where its kernel
        writes its codes itself (``kernels.bitparallel_depthwise_codes``): int16 accumulation
        (``storage`` int16), a static unsigned output quantization (calibrated, one code part),
        plain input codes, and every channel with a form; else None."""
        spec = n.quant
        if not (self.depthwise_codes and n.op == "qconv2d" and storage == "int16" and self.fused_requant
                and spec.out_bits is not None and spec.out_scale > 0 and not spec.out_signed
                and self._residual_add_of(n) is None):
            return None
        shape, x_shape = n.attr("weight_shape"), self.g.type_of(n.inputs[0]).shape
        geo = conv_geometry(x_shape, shape, n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups"))
        if not (is_depthwise_layer(n.op, shape) and self.kernels.depthwise_codes_fit(geo)):
            return None  # (int16 storage of a depthwise conv: its kernel accumulates in int16)
        found = self._code_tables_found(n, storage, False, {"out_scale": float(spec.out_scale)})
        if found is None or found[1] is None:  # no form: the epilogue searches the thresholds instead
            return None
        return self._stored_code_tables(n, *found)[0]

    def _depthwise_codes(self, n: Node, q: np.ndarray, info: dict, codes: str, tables: list[str]) -> None:
        """Depthwise conv ``n`` as one call that writes its output codes
        (``kernels.bitparallel_depthwise_codes``): its accumulators stay on the task's stack, so
        verify checks this layer by its codes alone."""
        shape, x_shape = n.attr("weight_shape"), self.g.type_of(n.inputs[0]).shape
        stride, padding, dilation, groups = n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")
        geo = conv_geometry(x_shape, shape, stride, padding, dilation, groups)
        tap_pairs = bool(self.depthwise_tap_pairs and self.kernels.depthwise_tap_pairs_pay(geo)
                         and self._int8_under_any_planes(n))
        info.update(pack="depthwise", codes="fixed-point form, in the conv")
        if tap_pairs:
            info["tap_pairs"] = True  # the runtime checks the planes' weights are bytes
        w = self._bitparallel_weights(n, pack_bitparallel_layout("depthwise", q, shape, groups))
        outs, fused, suffix = self._layer_output(n, info, exact_y=True)
        if len(outs) != 2 or fused.get("out_offset"):  # _depthwise_code_tables admits unsigned codes only
            raise CompileError(f"layer {n.name!r}: a depthwise conv writes one part of unsigned codes")
        key = f"dwcodes({tuple(x_shape)},{tuple(shape)},{stride},{padding},{dilation},{tap_pairs})" + suffix
        f = self.plan.func(key, lambda: self.kernels.bitparallel_depthwise_codes(
            x_shape, shape, stride, padding, dilation, float(fused["out_scale"]), tap_pairs))
        self.plan.call(f, [codes, w] + tables + outs, n.name)

    def _saturated_forms(self, n: Node, storage: str):
        """For a depthwise conv whose input and output scales are dynamic and bounded by clips
        (ReLU6 before and after it: ``S = max|y| <= 6``), what its speculative call takes
        (:meth:`_saturated_codes`): ``(in_bound, out_bound, tables, form, saturation_at)``, the
        fixed-point forms of its codes at the two bounds as static scales and each channel's
        least search value reaching the output bound; None where it runs as before."""
        if not (self.saturated_scales and n.op == "qconv2d" and storage == "int16" and n.quant.out_bits is None
                and is_depthwise_layer(n.op, n.attr("weight_shape")) and self._residual_add_of(n) is None):
            return None
        quantizer, source = self._dynamic_quantize_of(n), self.producers.get(n.inputs[0])
        if quantizer is None or quantizer.attr("signed") or quantizer.attr("asymmetric", False) \
                or source is None or source.op != "quantize" or source.attr("asymmetric", False) \
                or float(source.attr("static_scale", 0.0) or 0.0) > 0:
            return None
        out_bound = self._clip_bound(n)
        before = self.producers.get(source.inputs[0])
        in_bound = self._clip_bound(before) if before is not None else None
        if not (out_bound and in_bound):
            return None
        x_shape = self.g.type_of(n.inputs[0]).shape
        geo = conv_geometry(x_shape, n.attr("weight_shape"), n.attr("stride"), n.attr("padding"), n.attr("dilation"),
                            n.attr("groups"))
        if not self.kernels.depthwise_codes_fit(geo):
            return None
        in_levels = 2**n.quant.act_bits - 1
        at_bounds = replace(n, quant=replace(n.quant, out_bits=int(quantizer.attr("bits")), out_scale=out_bound,
                                             out_signed=False))
        tables = code_tables(self.g, at_bounds, in_bound, in_levels)
        form = code_form(tables) if tables is not None else None
        saturation_at = saturation_thresholds(self.g, n, in_bound, in_levels, out_bound)
        if form is None or saturation_at is None:
            return None
        return in_bound, out_bound, tables, form, saturation_at

    def _bounded_forms(self, n: Node, storage: str, two_parts: bool, fused: dict):
        """For a conv between two clips from 0 whose input and output scales are dynamic (a ReLU6
        before and after it, a residual block's ReLU6 before it), what its epilogue's
        ``saturated_codes`` takes: ``(in_bound, out_bound, tables, form)``, the code tables of the
        two bounds as static scales and their fixed-point forms (None: the tables' search); None
        where the dynamic pass stays alone."""
        if not (self.saturated_scales and n.op == "qconv2d" and storage in ("int16", "int32")
                and not two_parts and fused.get("out_scale") == 0.0 and "out_bits" in fused
                and not (fused["out_signed"] or fused["out_offset"] or fused.get("keep_y"))
                and int(np.prod(n.type.shape[2:])) >= TABLE_ENTRIES):
            return None
        source = self.producers.get(n.inputs[0])
        if source is None or source.op != "quantize" or source.attr("asymmetric", False) or source.attr("signed") \
                or float(source.attr("static_scale", 0.0) or 0.0) > 0:
            return None
        out_bound = self._clip_bound(n)
        in_bound = self._value_bound(self.producers.get(source.inputs[0]))
        if not (out_bound and in_bound):
            return None
        at_bounds = replace(n, quant=replace(n.quant, out_bits=int(fused["out_bits"]), out_scale=out_bound,
                                             out_signed=False))
        tables = code_tables(self.g, at_bounds, in_bound, 2**n.quant.act_bits - 1, wide=storage == "int32")
        if tables is None:
            return None
        return in_bound, out_bound, tables, code_form(tables) if self.code_form else None

    def _value_bound(self, node: Node | None) -> float | None:
        """The greatest ``|y|`` of a value clipped from 0: a layer's fused clip (ReLU6: 6), or a
        ``clip`` node from 0 (a residual block's ReLU6 after its add), also through the max pools
        and reshapes after it; else None."""
        while node is not None and node.op in ("max_pool2d", "reshape", "permute"):  # they move values, or keep some
            node = self.producers.get(node.inputs[0])
        if node is None:
            return None
        if node.op == "clip":
            lo, hi = float(node.attr("lo")), float(node.attr("hi"))
            return hi if lo == 0.0 and hi > 0 and np.isfinite(hi) else None
        return self._clip_bound(node) if node.quant is not None else None

    @staticmethod
    def _clip_bound(n: Node) -> float | None:
        """The greatest ``|y|`` of a layer whose activation is a clip from 0 (ReLU6: 6), else None."""
        if n.attr("act", "none") != "clip" or float(n.attr("clip_lo", 0.0) or 0.0) != 0.0:
            return None
        hi = float(n.attr("clip_hi", 0.0) or 0.0)
        return hi if hi > 0 and np.isfinite(hi) else None

    def _saturated_codes(self, n: Node, info: dict, saturated, conv_at: int, outs: list[str], done: str) -> None:
        """Put the speculative call of depthwise conv ``n`` before its conv (step ``conv_at``,
        which with the epilogue after it skips where the call is done): the codes at the bounds'
        scales where this call's input scale is the input bound and a value reaches the output
        bound (``kernels.bitparallel_depthwise_saturated_codes``). Its accumulators then stay on
        the tasks' stacks, so verify checks the layer by its codes in such runs (``acc_unless``)."""
        in_bound, out_bound, tables, form, saturation_at = saturated
        conv = self.plan.steps[conv_at]
        if conv["args"][-1] != done or info.get("pack") != "depthwise":  # the skipping fused depthwise kernel
            raise CompileError(f"layer {n.name!r}: saturated scales need the fused depthwise conv (a csqc bug)")
        codes, w = conv["args"][0], conv["args"][1]
        scale = self.quant_parts[n.inputs[0]][2]
        shape, x_shape = n.attr("weight_shape"), self.g.type_of(n.inputs[0]).shape
        stride, padding, dilation = n.attr("stride"), n.attr("padding"), n.attr("dilation")
        tap_pairs = bool(info.get("tap_pairs"))
        names = [self.plan.weight(f"{n.name}.saturated.code_form", form.reshape(-1)),
                 self.plan.weight(f"{n.name}.saturated.code_base", tables.base),
                 self.plan.weight(f"{n.name}.saturated.acc_flip", tables.flip),
                 self.plan.weight(f"{n.name}.saturation_at", saturation_at)]
        key = (f"dwsaturated({tuple(x_shape)},{tuple(shape)},{stride},{padding},{dilation},{tap_pairs},"
               f"{in_bound!r},{out_bound!r})")
        f = self.plan.func(key, lambda: self.kernels.bitparallel_depthwise_saturated_codes(
            x_shape, shape, stride, padding, dilation, in_bound, out_bound, tap_pairs))
        self.plan.steps.insert(conv_at, {"func": f, "args": [codes, w, scale] + names + outs[:2] + [done],
                                         "layer": n.name})
        info["tensors"]["acc_unless"] = done
        info["saturated"] = {"in": in_bound, "out": out_bound}
        info["codes"] = f"at the clips' scales ({in_bound:g}, {out_bound:g}) where both saturate; else " + info.get(
            "codes", "the float chain")

    def _code_tables_found(self, n: Node, storage: str, two_parts: bool, fused: dict):
        """``(tables, form or None)`` of :meth:`_code_tables`, nothing stored in the plan; None
        where the float chain stays."""
        in_scale = self._static_scale_of(n.inputs[0])
        if not (self.code_search and n.op == "qconv2d" and storage in ("int16", "int32") and not two_parts
                and fused.get("out_scale", 0.0) > 0 and in_scale > 0 and not fused.get("keep_y")
                and int(np.prod(n.type.shape[2:])) >= TABLE_ENTRIES):
            return None
        tables = code_tables(self.g, n, in_scale, 2**n.quant.act_bits - 1, wide=storage == "int32")
        if tables is None:
            return None
        return tables, code_form(tables) if self.code_form else None

    def _code_tables(self, n: Node, storage: str, two_parts: bool, fused: dict) -> tuple[list[str], int]:
        """The code buffers of conv ``n`` and its search steps (``glue.epilogue``'s ``code_search``:
        ``code_thresholds``), or ``FORM`` where every channel has a fixed-point form (``code_form``;
        the buffers then start with the forms), or ``([], 0)`` where the float chain stays: the
        backend must have the search, the input and output scales be static (calibrated), the
        accumulators one int16 or int32 buffer, and each channel's rows at least one 32-lane vector."""
        found = self._code_tables_found(n, storage, two_parts, fused)
        return ([], 0) if found is None else self._stored_code_tables(n, *found)

    def _stored_code_tables(self, n: Node, tables, form) -> tuple[list[str], int]:
        """:meth:`_code_tables`' buffers of ``tables`` and ``form``, stored in the plan, and the steps."""
        names = [self.plan.weight(f"{n.name}.code_form", form.reshape(-1)) if form is not None
                 else self.plan.weight(f"{n.name}.code_thresholds", tables.kernel_thresholds()),
                 self.plan.weight(f"{n.name}.code_base", tables.base),
                 self.plan.weight(f"{n.name}.acc_flip", tables.flip)]
        return names, FORM if form is not None else tables.steps

    def _dynamic_search_fits(self, n: Node, storage: str, two_parts: bool, fused: dict) -> bool:
        """Whether conv ``n``'s epilogue, whose output codes have a dynamic scale, finds each row's
        thresholds per call and searches them (``glue.epilogue``'s ``dynamic_search``)."""
        if not (self.code_search and n.op == "qconv2d" and "out_bits" in fused and fused.get("out_scale") == 0.0):
            return False
        return self.glue.dynamic_search_fits(n.type.shape, 1, 2**n.quant.act_bits - 1, fused["out_bits"], 0.0,
                                             fused["out_signed"] or fused["out_offset"], storage, two_parts, False,
                                             bool(fused.get("keep_y")))

    def _static_scale_of(self, codes: str) -> float:
        """The static scale of activation codes ``codes`` (a symmetric quantize's, or the fused
        output quantization of the layer that wrote them); 0 for a dynamic one."""
        node = self.producers.get(codes)
        if node is None:
            return 0.0
        if node.op == "quantize":
            return 0.0 if node.attr("asymmetric", False) else float(node.attr("static_scale", 0.0) or 0.0)
        if node.quant is not None and node.quant.out_bits is not None:
            return float(node.quant.out_scale)
        return 0.0

    def _layer_output(self, n: Node, info: dict, exact_y: bool = False) -> tuple[list[str], dict, str]:
        """The epilogue's output buffers, its fused-quantization options and their kernel-key suffix.

        A layer without ``out_bits`` writes its float tensor, unless (``exact_y``: an integer
        layer, whose float ``y`` the interpreter's order fixes bit for bit) a dynamic quantize
        is its only reader: then the epilogue computes that quantizer's scale and codes itself.
        With ``out_bits``, where the glue can, the epilogue writes the scale and the codes in
        ``lower_quantize``'s layout (sign parts or offset codes) under the layer's name;
        otherwise it writes a float temporary that ``_requantize_after`` quantizes."""
        spec = n.quant
        if spec.out_bits is None:
            quantizer = self._dynamic_quantize_of(n) if exact_y else None
            if quantizer is None:
                shared = self._shared_quantize_of(n) if exact_y else None
                if shared is None:
                    return [self.out(n)], {}, ""
                # y has other readers too (a residual add): the epilogue writes y and the codes
                # (one kernel instead of the epilogue, then a quantize reading y back)
                self.fused_quantize.add(shared.name)
                codes, fused, suffix = self._epilogue_codes(shared, shared.attr("bits"),
                                                            float(shared.attr("static_scale", 0.0)),
                                                            bool(shared.attr("signed")))
                return [self.out(n)] + codes, {**fused, "keep_y": True}, suffix + ",keep_y"
            info["tensors"]["out"] = None  # y stays in registers
            self.fused_quantize.add(quantizer.name)
            return self._epilogue_codes(quantizer, quantizer.attr("bits"), 0.0, bool(quantizer.attr("signed")))
        info["tensors"]["out"] = None  # no float output: the next layer checks these codes as its xq
        if not self.fused_requant:
            return [self.plan.buffer(f"{n.name}.y", n.type.shape, _F32)], {}, ""
        return self._epilogue_codes(n, spec.out_bits, float(spec.out_scale), spec.out_signed)

    def _epilogue_codes(self, n: Node, bits: int, scale_value: float, signed: bool) -> tuple[list[str], dict, str]:
        """Scale and code buffers of quantized value ``n`` (``lower_quantize``'s names and
        layout) that an epilogue writes (``scale_value`` 0: a dynamic scale)."""
        offset = self._offset_codes_fit(n)
        shape = n.type.shape
        scale = self.plan.buffer(f"{n.name}.scale", (1,), _F32)
        pos = self.plan.buffer(f"{n.name}.codes", shape, "uint8")
        neg = self.plan.buffer(f"{n.name}.codes_neg", shape, "uint8") if signed and not offset else None
        self.quant_parts[n.name] = (pos, neg, scale)
        if offset:
            self.code_offset[n.name] = 2**bits - 1
        fused = {"out_bits": bits, "out_scale": scale_value, "out_signed": signed, "out_offset": offset}
        return [scale, pos] + ([neg] if neg else []), fused, f",out({bits},{scale_value!r},{signed},{offset})"

    def _residual_add_of(self, n: Node) -> Node | None:
        """The ``add`` that is the only reader of integer layer ``n``'s float output and adds a
        float tensor of the same shape (a residual block), when the backend fuses it."""
        users = self.users.get(n.name, [])
        if not (self.fused_residual and n.quant.out_bits is None and n.name not in self.g.outputs and len(users) == 1):
            return None
        (add,) = users
        if add.op != "add" or len(add.inputs) != 2 or add.inputs.count(n.name) != 1:
            return None
        if add.name in self.pending_epilogues:  # both operands are integer layers: the first one takes the add
            return None
        other = self.g.type_of(next(i for i in add.inputs if i != n.name))
        if other.qbits is not None or other.dtype != _F32 or tuple(other.shape) != tuple(n.type.shape):
            return None
        return add

    def _activation_after(self, add: Node) -> tuple[Node, str, float, float]:
        """``(tail, act, lo, hi)``: the relu or clip that is the only reader of ``add`` (its
        node and parameters), or ``add`` itself and no activation."""
        users = self.users.get(add.name, [])
        if add.name in self.g.outputs or len(users) != 1 or users[0].op not in ("relu", "clip"):
            return add, "none", 0.0, 0.0
        (act,) = users
        if act.op == "relu":
            return act, "relu", 0.0, 0.0
        return act, "clip", float(act.attr("lo")), float(act.attr("hi"))

    def _symmetric_quantize_of(self, value: Node) -> Node | None:
        """A symmetric quantize (static or dynamic scale) among ``value``'s readers."""
        for user in self.users.get(value.name, []):
            if user.op == "quantize" and user.type.qbits <= 8 and not user.attr("asymmetric", False):
                return user
        return None

    def _lower_residual_epilogue(self, add: Node, pending: "_PendingEpilogue") -> None:
        """One kernel for a residual block's tail: the layer's epilogue, the ``add`` of the
        residual, the relu or clip after it, and the codes of a quantize reading that result
        (the float result is written too when anything else reads it, e.g. the next block)."""
        layer = pending.layer
        residual = self.ref(next(i for i in add.inputs if i != layer.name))
        tail, post_act, lo, hi = self._activation_after(add)
        quantizer = self._symmetric_quantize_of(tail)
        keep_y = tail.name in self.g.outputs or any(u is not quantizer for u in self.users.get(tail.name, []))
        outs, fused, suffix = [], {}, ""
        if quantizer is not None:
            static = float(quantizer.attr("static_scale", 0.0))
            outs, fused, suffix = self._epilogue_codes(quantizer, quantizer.attr("bits"), static,
                                                       bool(quantizer.attr("signed")))
            self.fused_quantize.add(quantizer.name)
        if keep_y or quantizer is None:
            outs = [self.out(tail)] + outs
        if tail is not add:
            self.lowered_by_producer.add(tail.name)
        options = {"has_residual": True, "post_act": post_act, "post_lo": lo, "post_hi": hi,
                   "keep_y": keep_y and quantizer is not None, **fused}
        key = pending.key + f",residual({post_act},{lo!r},{hi!r},{keep_y})" + suffix
        f = self.plan.func(key, lambda: pending.build(**options))
        args = pending.args + [residual]
        self.plan.call(f, args + outs, layer.name)
        # the float residual the kernel read: verify recomputes add/activation/codes from it exactly
        # (a float layer's residual, e.g. a downsample conv, differs from the golden run's by ulps)
        self.plan.layers[layer.name].setdefault("tensors", {})["residual"] = residual
        if fused.get("out_scale") == 0.0:  # a dynamic scale: the runtime checks it like a quantize step's
            self.plan.steps[-1].update(levels=2**fused["out_bits"] - 1, scale_arg=len(args) + int(keep_y),
                                       quantizer=quantizer.name)

    def _shared_quantize_of(self, n: Node) -> Node | None:
        """A symmetric quantize among the readers of layer ``n``'s float output when others read
        it too (its epilogue can write both: ``keep_y``)."""
        if not self.fused_requant or len(self.users.get(n.name, [])) < 2:
            return None
        return self._symmetric_quantize_of(n)

    def _dynamic_quantize_of(self, n: Node) -> Node | None:
        """The dynamic-scale quantize node that is the only reader of layer ``n``'s float output."""
        users = self.users.get(n.name, [])
        if not self.fused_requant or n.name in self.g.outputs or len(users) != 1:
            return None
        (user,) = users
        if (user.op != "quantize" or float(user.attr("static_scale", 0.0)) > 0 or user.type.qbits > 8
                or user.attr("asymmetric", False)):  # the epilogue computes the symmetric max-abs codes only
            return None
        return user

    def _requantize_after(self, n: Node) -> None:
        """A backend without fused requantization: quantize the layer's float temporary."""
        spec = n.quant
        if spec.out_bits is None or self.fused_requant:
            return
        shape, bits, static, signed = n.type.shape, spec.out_bits, float(spec.out_scale), spec.out_signed
        f = self.plan.func(f"quantize({shape},{bits},{static!r},{signed})",
                           lambda: self.glue.quantize(shape, bits, static, signed))
        scale = self.plan.buffer(f"{n.name}.scale", (1,), _F32)
        pos = self.plan.buffer(f"{n.name}.codes", shape, "uint8")
        neg = self.plan.buffer(f"{n.name}.codes_neg", shape, "uint8") if signed else None
        self.plan.call(f, [f"{n.name}.y", scale, pos] + ([neg] if neg else []), n.name)
        self.quant_parts[n.name] = (pos, neg, scale)

    def _record_weight_sums(self, n: Node, info: dict, code_offset: int, acc_offset: str) -> None:
        """What the runtime needs to form ``L * sum_k q[c, k]`` for exactly the planes a call
        uses (``csqc.runtime`` counts the ones of the stored planes at load and fills
        ``acc_offset``): the plane spec, zero point and K; nothing is added to the weights."""
        _, plane_spec, z = self._planes(n)
        shape = n.attr("weight_shape")
        info.update(code_offset=int(code_offset), acc_offset=acc_offset, zero_point=int(z), k=int(np.prod(shape[1:])),
                    plane_spec=[[int(shift), int(sign)] for shift, sign in plane_spec])
        if info["kernel"] == "bitserial":
            info["weight_planes"] = f"{n.name}.planes"


    def _planes(self, n: Node) -> tuple[np.ndarray, list[tuple[int, int]], int]:
        spec = n.quant
        shape = n.attr("weight_shape")
        k = int(np.prod(shape[1:]))
        if spec.encoding == "int":
            # a graph that skipped split_planes: split here (offset encoding of q)
            from csqc.bitplanes import offset_planes

            planes, plane_spec, z = offset_planes(decode_weight(self.g, n).reshape(shape[0], k))
            return planes, plane_spec, z
        w = self.g.params[n.inputs[1]]
        planes = unpack_planes(w, k, spec.packed_word) if spec.packed_word else w
        return np.asarray(planes), list(spec.planes), spec.zero_point

    @staticmethod
    def _zero_point_argument(n: Node, z: int) -> dict:
        """A kernel's weight zero point argument: the runtime's for the planes a call keeps
        (``bitplanes.kept_zero_point``) where there is one."""
        return {"zero_point": n.name} if z else {"int": 0}

    def _bitserial(self, n: Node, q, info, codes: list[str], accs: list[str], code_offset: int = 0) -> None:
        spec = n.quant
        # offset codes span [0, 2L]: one more activation bitplane than the magnitudes
        act_bits = spec.act_bits + 1 if code_offset else spec.act_bits
        planes, plane_spec, z = self._planes(n)
        shape = n.attr("weight_shape")
        x_shape = self.g.type_of(n.inputs[0]).shape
        knobs = self.bitserial_knobs()
        if n.op == "qconv2d":
            stride, padding, dilation, groups = n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")
            planes5 = planes.reshape(len(plane_spec), *shape)
            if is_depthwise_layer(n.op, shape):
                packed = self.packing.pack_depthwise_weight_planes(planes5)
            else:
                packed = self.packing.pack_conv_weight_planes(planes5, groups, knobs.lanes)
            key = f"bsconv({tuple(x_shape)},{tuple(shape)},{plane_spec},{spec.act_bits},{bool(z)},{stride},{padding},{dilation},{groups},{spec.acc_dtype})"
            f = self.plan.func(key, lambda: self.kernels.bitserial_conv2d(
                x_shape, shape, plane_spec, spec.act_bits, bool(z), stride, padding, dilation, groups, spec.acc_dtype, knobs))
        else:
            m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
            if self.backend_bitserial_dense_knobs is not None:  # the same lanes: the weight layout is fixed
                knobs = self.backend_bitserial_dense_knobs(m, shape[0], k, plane_spec, act_bits, bool(z),
                                                           spec.acc_dtype, knobs)
            packed = self.packing.pack_weight_planes(planes.reshape(len(plane_spec), shape[0], k), lanes=knobs.lanes)
            key = f"bsdense({m},{shape[0]},{k},{plane_spec},{act_bits},{bool(z)},{spec.acc_dtype})"
            f = self.plan.func(key, lambda: self.kernels.bitserial_dense(m, shape[0], k, plane_spec, act_bits, bool(z), spec.acc_dtype, knobs))
        w = self.plan.weight(f"{n.name}.planes", packed)
        # (the planes the kernel reads: an int-encoded graph's are split here)
        info.update(encoding="offset" if z else spec.encoding, zero_point=int(z), planes=len(plane_spec),
                    plane_shifts=[int(shift) for shift, _ in plane_spec])
        for c, acc in zip(codes, accs):
            self.plan.call(f, [self._as_2d(c, n), w, {"planes": n.name}, self._zero_point_argument(n, z),
                               self._as_2d(acc, n)], n.name)

    def _int16_conv_outputs(self, n: Node, code_offset: int) -> bool:
        """Whether bit-parallel conv ``n`` stores its accumulators as int16 (half the bytes the
        kernel writes and the epilogue reads: a 1x1 conv 16 -> 96 at 112x112 went from 273 to
        113 us): a backend kernel that narrows them, and every output within int16 under any
        plane setting. Twice the bound covers the run-time plane knob's truncation (as for
        int16 depthwise convs); offset codes (``code + L``) add ``L * sum_k q`` and double it again."""
        if not self.int16_conv_outputs or n.op != "qconv2d":
            return False
        shape, x_shape = n.attr("weight_shape"), self.g.type_of(n.inputs[0]).shape
        geo = conv_geometry(x_shape, shape, n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups"))
        if is_depthwise_layer(n.op, shape):  # on the fused kernel, which accumulates in int16 then
            if not (self._int16_depthwise_pays(geo) and self.kernels.depthwise_writes_int16(geo)):
                return False
        elif self.backend_tile_conv is not None and self.backend_tile_conv(geo):
            return False
        return (4 if code_offset else 2) * accumulator_bound(self.g, n) < 2**15

    def _int16_depthwise_pays(self, geo) -> bool:
        """Whether a depthwise conv of shape ``geo`` accumulates in int16 where its bound allows."""
        return self.int16_depthwise and (self.backend_depthwise_int16_pays is None
                                         or self.backend_depthwise_int16_pays(geo))

    def _bitparallel(self, n: Node, q, info, codes: list[str], accs: list[str], storage: str = "int32",
                     code_offset: int = 0, skip: str | None = None) -> None:
        shape = n.attr("weight_shape")
        x_shape = self.g.type_of(n.inputs[0]).shape
        knobs = self.kernels.BitparallelKnobs()
        if n.op == "qconv2d":
            stride, padding, dilation, groups = n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")
            depthwise = is_depthwise_layer(n.op, shape)
            if self.backend_tile_conv is not None and self.backend_tile_conv(
                    conv_geometry(x_shape, shape, stride, padding, dilation, groups)):
                info.update(pack="conv_rows", tiles="amx")  # the runtime asks the OS for the tile state
                packed = pack_bitparallel_layout(info["pack"], q, shape, groups)
                f = self.plan.func(f"amxconv({tuple(x_shape)},{tuple(shape)},{stride},{padding},{dilation})",
                                   lambda: self.kernels.amx_conv2d(x_shape, shape, stride, padding, dilation))
            else:
                info["pack"] = "depthwise" if depthwise else "conv"
                packed = pack_bitparallel_layout(info["pack"], q, shape, groups)
                # the run-time plane knob recombines the weights: twice the bound covers any truncation;
                # offset codes (code + L, unpadded convs) double it again (int16 outputs: already checked)
                narrow = {"int16_depthwise": True} if (depthwise and self._int16_depthwise_pays(
                    conv_geometry(x_shape, shape, stride, padding, dilation, groups)) and (
                    storage == "int16" or (4 if code_offset else 2) * accumulator_bound(self.g, n) < 2**15)) else {}
                if self.backend_conv_knobs is not None and not depthwise:
                    knobs = self.backend_conv_knobs(conv_geometry(x_shape, shape, stride, padding, dilation, groups))
                if self.backend_conv_int16_groups is not None and not depthwise:
                    knobs = replace(knobs, int16_groups=self.backend_conv_int16_groups(n, q))
                if storage != "int32":
                    narrow["out_dtype"] = storage
                if self._pad_code(n):
                    narrow["pad_code"] = self._pad_code(n)
                if narrow.get("int16_depthwise") and self.depthwise_tap_pairs and self.kernels.depthwise_tap_pairs_pay(
                        conv_geometry(x_shape, shape, stride, padding, dilation, groups)) \
                        and self._int8_under_any_planes(n):
                    narrow["tap_pairs"] = True
                    info["tap_pairs"] = True  # the runtime checks the planes' weights are bytes
                if skip is not None:  # (_saturated_forms admits the fused depthwise kernel only)
                    narrow["skip_when_done"] = True
                key = f"bpconv({tuple(x_shape)},{tuple(shape)},{stride},{padding},{dilation},{groups})" + (
                    ",int16" if narrow.get("int16_depthwise") else "") + (f",{storage}out" if storage != "int32" else "") \
                    + (",pairs" if narrow.get("tap_pairs") else "") \
                    + (f",int16x{knobs.int16_groups}" if getattr(knobs, "int16_groups", 1) > 1 else "") \
                    + (f",pad{narrow['pad_code']}" if narrow.get("pad_code") else "") + (",skip" if skip else "")
                f = self.plan.func(key, lambda: self.kernels.bitparallel_conv2d(x_shape, shape, stride, padding,
                                                                                dilation, groups, knobs, **narrow))
        elif self._small_dense(n):
            self._small_bitparallel_dense(n, q, info, codes, accs)
            return
        elif self._nibble_high(n) is not None:
            self._nibble_dense(n, q, info, codes, accs)
            return
        else:
            m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
            info["pack"] = "dense"
            packed = pack_bitparallel_layout(info["pack"], q, shape, 1)
            if self.backend_tile_dense is not None and self.backend_tile_dense(m, shape[0], k):
                info["tiles"] = "amx"  # the runtime asks the OS for the tile state before it runs
                f = self.plan.func(f"amxdense({m},{shape[0]},{k})", lambda: self.kernels.amx_dense(m, shape[0], k))
            else:
                if self.backend_dense_knobs is not None:
                    knobs = self.backend_dense_knobs(m, shape[0], k)
                two_signs = len(codes) == 2 and self._signed_dense(n)  # one pass, one accumulator
                key = f"bpdense({m},{shape[0]},{k})" + (",signs" if two_signs else "")
                signs = {"two_signs": True} if two_signs else {}  # (a keyword only backends with signed_dense take)
                f = self.plan.func(key, lambda: self.kernels.bitparallel_dense(m, shape[0], k, "int8", "int32", knobs,
                                                                               **signs))
                if two_signs:
                    w = self._bitparallel_weights(n, packed)
                    (acc,) = accs
                    self.plan.call(f, [self._as_2d(c, n) for c in codes] + [w, self._as_2d(acc, n)], n.name)
                    return
        w = self._bitparallel_weights(n, packed)
        for c, acc in zip(codes, accs):
            self.plan.call(f, [self._as_2d(c, n), w, self._as_2d(acc, n)] + ([skip] if skip else []), n.name)

    def _int8_under_any_planes(self, n: Node) -> bool:
        """Whether every weight of ``n`` is an int8 under any run-time plane setting (a tap pair's
        weights are the bytes of one int16)."""
        low, high = prefix_weight_range(*self._planes(n))
        return -128 <= low and high <= 127

    def _bitparallel_weights(self, n: Node, packed: np.ndarray) -> str:
        """The int8 weight buffer of a bit-parallel layer (``packed``'s layout) and its stored planes."""
        # the artifact stores only the packed bitplanes; the runtime combines them into this int8
        # buffer when it loads (and again for the run-time plane knob), so the file stays at
        # ~bits/32 of fp32 and there is one source of truth for the weights
        w = self.plan.buffer(f"{n.name}.int8", packed.shape, str(packed.dtype), "derived")
        self._store_planes(n, int8_buffer=w)
        return w

    def _store_planes(self, n: Node, **buffer) -> None:
        """Store layer ``n``'s packed bitplanes, from which the runtime builds ``buffer`` (its
        derived weights: ``int8_buffer`` or ``float_buffer``) for each plane setting."""
        shape = n.attr("weight_shape")
        planes, plane_spec, z = self._planes(n)
        self.plan.weight(f"{n.name}.bitplanes", np.packbits(planes.astype(np.uint8), axis=-1))
        self.plan.layers[n.name].update(plane_spec=[list(p) for p in plane_spec], zero_point=int(z),
                                        k=int(np.prod(shape[1:])), weight_shape=list(shape),
                                        groups=int(n.attr("groups", 1)), **buffer)

    def _small_dense(self, n: Node) -> bool:
        """Whether bit-parallel linear layer ``n`` is small enough for the backend's one-call
        kernel (both sign passes, on the calling thread: a launch costs more than the work)."""
        if n.op != "qlinear" or not hasattr(self.kernels, "bitparallel_dense_signed"):
            return False
        x_shape = self.g.type_of(n.inputs[0]).shape
        return int(np.prod(x_shape)) * int(n.attr("weight_shape")[0]) < self.kernels.SERIAL_DENSE_MACS

    def _nibble_high(self, n: Node) -> int | None:
        """The nibble layout's fifth-bit value where the backend runs linear layer ``n`` on
        nibble-packed weights (None: the int8 layout)."""
        if n.op != "qlinear" or self.backend_nibble_high is None:
            return None
        if n.name not in self.nibble_highs:
            def weight_range():  # over every plane setting the runtime can rebuild
                planes, plane_spec, z = self._planes(n)
                return prefix_weight_range(planes, plane_spec, int(z))

            self.nibble_highs[n.name] = self.backend_nibble_high(n, output_rows(n), weight_range)
        return self.nibble_highs[n.name]

    def _one_call_dense(self, n: Node) -> bool:
        """Whether bit-parallel layer ``n``'s kernel takes both sign parts and writes their difference."""
        return self._small_dense(n) or self._nibble_high(n) is not None or self._signed_dense(n)

    def _signed_dense(self, n: Node) -> bool:
        """Whether the int8 dense kernel takes bit-parallel linear layer ``n``'s two sign parts in one pass."""
        if n.op != "qlinear" or self.backend_signed_dense is None:
            return False
        if n.name not in self.signed_dense_layers:
            x_shape = self.g.type_of(n.inputs[0]).shape
            self.signed_dense_layers[n.name] = bool(self.backend_signed_dense(
                int(np.prod(x_shape[:-1])), n.attr("weight_shape")[0], int(x_shape[-1]), n, decode_weight(self.g, n)))
        return self.signed_dense_layers[n.name]

    def _nibble_dense(self, n: Node, q, info: dict, codes: list[str], accs: list[str]) -> None:
        """A linear layer on nibble-packed weights, both sign parts in one call (one accumulator)."""
        shape = n.attr("weight_shape")
        x_shape = self.g.type_of(n.inputs[0]).shape
        m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
        high = self._nibble_high(n)
        info.update(pack="nibble", nibble_high=high)
        w = self._bitparallel_weights(n, pack_bitparallel_layout("nibble", q, shape, 1, high))
        two_signs = len(codes) == 2
        f = self.plan.func(f"nibble_dense({m},{shape[0]},{k},{high},{two_signs})",
                           lambda: self.kernels.nibble_dense(m, shape[0], k, high, two_signs))
        (acc,) = accs
        self.plan.call(f, [self._as_2d(c, n) for c in codes] + [w, self._as_2d(acc, n)], n.name)

    def _small_bitparallel_dense(self, n: Node, q, info: dict, codes: list[str], accs: list[str]) -> None:
        """A small linear layer in one call: ``acc = codes_pos @ q.T - codes_neg @ q.T`` (or one code buffer)."""
        shape = n.attr("weight_shape")
        x_shape = self.g.type_of(n.inputs[0]).shape
        m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
        info["pack"] = "dense"
        w = self._bitparallel_weights(n, pack_bitparallel_layout("dense", q, shape, 1))
        two_signs = len(codes) == 2
        one = {}  # (a keyword only backends that choose the one-product form take)
        if two_signs and self.backend_small_dense_one_product is not None:
            one["one_product"] = bool(self.backend_small_dense_one_product(n, q))
            info["one_product"] = one["one_product"]  # (for readers of the plan: both sign parts in one dot product)
        key = f"bpdense_small({m},{shape[0]},{k},{two_signs})" + (",one" if one.get("one_product") else "")
        f = self.plan.func(key, lambda: self.kernels.bitparallel_dense_signed(m, shape[0], k, two_signs, **one))
        (acc,) = accs
        self.plan.call(f, [self._as_2d(c, n) for c in codes] + [w, self._as_2d(acc, n)], n.name)

    def _as_2d(self, codes: str, n: Node) -> str:
        """Dense kernels take ``[M, K]`` codes and give ``[M, N]`` accumulators: alias a
        higher-rank buffer (e.g. a linear layer over ``[B, T, K]`` sequences)."""
        if n.op == "qconv2d":
            return codes
        shape = self.plan.buffers[codes]["shape"]
        if len(shape) == 2:
            return codes
        name = f"{codes}.2d"
        if name not in self.plan.buffers:
            self.plan.buffer(name, (int(np.prod(shape[:-1])), shape[-1]), self.plan.buffers[codes]["dtype"],
                             alias=self._root(codes))
        return name

    def _weight_only_product(self, n: Node, info: dict, out: str, kernel: str) -> None:
        """``out = x @ float32(q).T`` of a float-input linear layer from its planes: by table
        lookups (``lut``) or by codes dequantized in registers (``dequant``)."""
        planes, plane_spec, z = self._planes(n)
        shape = n.attr("weight_shape")
        x_shape = self.g.type_of(n.inputs[0]).shape
        m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
        planes = planes.reshape(len(plane_spec), shape[0], k)
        if kernel == "dequant":
            lanes = self.dequant_lanes
            _, tiles = self.kernels.dequant_blocking(m, -(-shape[0] // lanes), lanes)
            packed = self.kernels.pack_dequant_weight(planes, plane_spec, tiles, lanes)
            key = f"dequantdense({m},{shape[0]},{k},{plane_spec},{bool(z)},{lanes})"
            f = self.plan.func(key, lambda: self.kernels.dequant_dense(m, shape[0], k, plane_spec, bool(z), lanes))
        else:
            tiles = self.kernels.lut_tiles_per_task(len(plane_spec), -(-shape[0] // self.kernels.LUT_LANES))
            packed = self.kernels.pack_lut_weight(self.packing.pack_weight_planes(
                planes, lanes=self.kernels.LUT_LANES), tiles)
            key = f"lutdense({m},{shape[0]},{k},{plane_spec},{bool(z)},{tiles})"
            f = self.plan.func(key, lambda: self.kernels.lut_dense(m, shape[0], k, plane_spec, bool(z), tiles))
        w = self.plan.weight(f"{n.name}.{kernel}planes", packed)
        info.update(encoding="offset" if z else n.quant.encoding, zero_point=int(z), planes=len(plane_spec),
                    plane_shifts=[int(shift) for shift, _ in plane_spec])
        self.plan.call(f, [self._flat(self.ref(n.inputs[0]), m, k), w, {"planes": n.name},
                           self._zero_point_argument(n, z), self._flat(out, m, shape[0])], n.name)

    def _defer_float_residual(self, n: Node, q: np.ndarray, info: dict, act: str, lo: float, hi: float, mult: str,
                              add: str | None) -> bool:
        """Whether float-input conv ``n`` feeds a residual ``add`` alone (and no quantizer reads
        the block's result): then its kernel applies the layer's epilogue, the add and the
        activation after it (``FloatTail.has_residual``) and runs where the add is, once the
        residual (a shortcut conv, say) exists; the layer's own output is never stored."""
        if not (n.op == "qconv2d" and hasattr(self.glue, "FloatTail")):
            return False
        residual_add = self._residual_add_of(n)
        if residual_add is None or self._symmetric_quantize_of(self._activation_after(residual_add)[0]) is not None:
            return False
        x, knobs = self.ref(n.inputs[0]), self._float_conv_knobs(n)
        wbuf = self._float_weights(n, q.astype(np.float32), True)
        x_shape, w_shape = self.g.type_of(n.inputs[0]).shape, tuple(q.shape)
        stride, padding, dilation, groups = n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")
        has_add = add is not None

        def build(has_residual, post_act, post_lo, post_hi, keep_y):
            tail = self.glue.FloatTail(act, lo, hi, has_add, has_residual=has_residual, post_act=post_act,
                                       post_lo=post_lo, post_hi=post_hi)
            return self.glue.conv2d_f32(x_shape, w_shape, stride, padding, dilation, groups, False, "none", 0.0, 0.0,
                                        knobs=knobs, tail=tail)

        key = (f"conv2d_f32({tuple(x_shape)},{w_shape},{stride},{padding},{dilation},{groups},"
               f"{self.glue.FloatTail(act, lo, hi, has_add)!r},{knobs!r})")
        info["tensors"]["out"] = None  # y stays in registers: the kernel writes the block's result
        args = [x, wbuf, mult] + ([add] if has_add else [])
        self.pending_epilogues[residual_add.name] = _PendingEpilogue(n, key, build, args)
        return True

    def _float_weights(self, n: Node, w: np.ndarray, from_planes: bool) -> str:
        """The float32 weight buffer of float-input layer ``n`` (``w``: its weights), in the
        order its conv form reads them; ``from_planes`` (a quantized layer): the artifact stores
        the weight's bitplanes and the runtime combines them into the buffer, for the run-time
        plane knob too."""
        knobs = self._float_conv_knobs(n) if n.op in ("qconv2d", "conv2d") else None
        layout, block = _float_layout(knobs)
        if from_planes:
            wbuf = self.plan.buffer(f"{n.name}.wf", float_layout_shape(w.shape, layout, block), "float32", "derived")
            self._store_planes(n, float_buffer=wbuf, **_float_layout_entry(layout, block))
            return wbuf
        return self.plan.weight(f"{n.name}.wf", float_layout_weight(w, layout, block))

    def _float_product(self, n: Node, w: np.ndarray, out: str | None, tail=None, tail_args: list[str] = (),
                       from_planes: bool = False) -> None:
        """The float product of a float-input layer into ``out``; a conv with ``tail`` (the backend
        glue's ``FloatTail``) applies the layer's epilogue itself and writes ``tail_args`` instead.
        ``from_planes``: see :meth:`_float_weights`."""
        x = self.ref(n.inputs[0])
        x_shape = self.g.type_of(n.inputs[0]).shape
        knobs = self._float_conv_knobs(n) if n.op in ("qconv2d", "conv2d") else None
        wbuf = self._float_weights(n, w, from_planes)
        if n.op in ("qconv2d", "conv2d"):
            stride, padding, dilation, groups = n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")
            if tail is not None:
                key = f"conv2d_f32({tuple(x_shape)},{w.shape},{stride},{padding},{dilation},{groups},{tail!r},{knobs!r})"
                f = self.plan.func(key, lambda: self.glue.conv2d_f32(x_shape, w.shape, stride, padding, dilation, groups,
                                                                     False, "none", 0.0, 0.0, knobs=knobs, tail=tail))
                self.plan.call(f, [x, wbuf, *tail_args], n.name)
                return
            key = f"conv2d_f32({tuple(x_shape)},{w.shape},{stride},{padding},{dilation},{groups},False,none,{knobs!r})"
            f = self.plan.func(key, lambda: self.glue.conv2d_f32(x_shape, w.shape, stride, padding, dilation, groups, False,
                                                                 "none", 0.0, 0.0, **_given(knobs=knobs)))
            self.plan.call(f, [x, wbuf, out], n.name)
        else:
            m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
            key = f"linear_f32({m},{k},{w.shape[0]},False,none)"
            f = self.plan.func(key, lambda: self.glue.linear_f32(m, k, w.shape[0], False, "none", 0.0, 0.0))
            self.plan.call(f, [self._flat(x, m, k), wbuf, self._flat(out, m, w.shape[0])], n.name)

    def _float_conv_knobs(self, n: Node):
        """The backend's float conv schedule for conv ``n`` (None: the backend has one form)."""
        if not hasattr(self.glue, "float_conv_knobs"):
            return None
        w_shape = n.attr("weight_shape") if n.op == "qconv2d" else self.g.params[n.inputs[1]].shape
        return self.glue.float_conv_knobs(self.g.type_of(n.inputs[0]).shape, w_shape, n.attr("stride"),
                                          n.attr("padding"), n.attr("dilation"), n.attr("groups"))

    def _flat(self, buf: str, m: int, k: int) -> str:
        shape = self.plan.buffers[buf]["shape"]
        if shape == [m, k]:
            return buf
        name = f"{buf}.2d"
        if name not in self.plan.buffers:
            self.plan.buffer(name, (m, k), self.plan.buffers[buf]["dtype"], alias=self._root(buf))
        return name

    def _root(self, buf: str) -> str:
        """The buffer that holds ``buf``'s data (a view of a view, e.g. of a reshape, is refused)."""
        return self.plan.buffers[buf].get("alias", buf)

    def lower_float_layer(self, n: Node) -> None:
        x_shape = self.g.type_of(n.inputs[0]).shape
        w = self.g.params[n.inputs[1]]
        has_bias = len(n.inputs) == 3
        act = n.attr("act", "none")
        lo, hi = float(n.attr("clip_lo", 0.0) or 0.0), float(n.attr("clip_hi", 0.0) or 0.0)
        knobs = self._float_conv_knobs(n) if n.op == "conv2d" else None
        layout, block = _float_layout(knobs)
        if layout is not None:  # the weights in the order the conv's form reads them
            weight = self.plan.weight(f"{n.name}.wl", float_layout_weight(np.asarray(w, np.float32), layout, block))
        else:
            weight = self.ref(n.inputs[1])
        args = [self.ref(n.inputs[0]), weight] + ([self.ref(n.inputs[2])] if has_bias else [])
        y = self.out(n)
        if n.op == "conv2d":
            stride, padding, dilation, groups = n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")
            key = (f"conv2d_f32({tuple(x_shape)},{w.shape},{stride},{padding},{dilation},{groups},{has_bias},{act},{lo},"
                   f"{hi},{knobs!r})")
            f = self.plan.func(key, lambda: self.glue.conv2d_f32(x_shape, w.shape, stride, padding, dilation, groups,
                                                                 has_bias, act, lo, hi, **_given(knobs=knobs)))
            self.plan.call(f, args + [y], n.name)
        else:
            m, k = int(np.prod(x_shape[:-1])), int(x_shape[-1])
            key = f"linear_f32({m},{k},{w.shape[0]},{has_bias},{act},{lo},{hi})"
            f = self.plan.func(key, lambda: self.glue.linear_f32(m, k, w.shape[0], has_bias, act, lo, hi))
            args[0] = self._flat(args[0], m, k)
            self.plan.call(f, args + [self._flat(y, m, w.shape[0])], n.name)


    def lower_batch_norm(self, n: Node) -> None:
        shape = n.type.shape
        f = self.plan.func(f"channel_affine({shape},1)", lambda: self.glue.channel_affine(shape, 1))
        self.plan.call(f, [self.ref(n.inputs[0]), self.ref(n.inputs[1]), self.ref(n.inputs[2]), self.out(n)], n.name)

    def lower_unary(self, n: Node) -> None:
        shape = n.type.shape
        lo, hi = (float(n.attr("lo")), float(n.attr("hi"))) if n.op == "clip" else (0.0, 0.0)
        f = self.plan.func(f"unary({n.op},{shape},{lo},{hi})", lambda: self.glue.unary(n.op, shape, lo, hi))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)


    def lower_binary(self, n: Node) -> None:
        pending = self.pending_epilogues.pop(n.name, None)
        if pending is not None:
            self._lower_residual_epilogue(n, pending)
            return
        a, b = (self.ref(i) for i in n.inputs)
        a_shape, b_shape = tuple(self.plan.buffers[a]["shape"]), tuple(self.plan.buffers[b]["shape"])
        shape = n.type.shape
        f = self.plan.func(f"binary({n.op},{a_shape},{b_shape},{shape})", lambda: self.glue.binary(n.op, a_shape, b_shape, shape))
        self.plan.call(f, [a, b, self.out(n)], n.name)

    def lower_select(self, n: Node) -> None:
        ins = [self.ref(i) for i in n.inputs]
        shapes = [tuple(self.plan.buffers[i]["shape"]) for i in ins]
        shape = n.type.shape
        f = self.plan.func(f"select({shapes},{shape})", lambda: self.glue.select(*shapes, shape))
        self.plan.call(f, ins + [self.out(n)], n.name)

    def lower_expand(self, n: Node) -> None:
        x = self.ref(n.inputs[0])
        in_shape, shape = tuple(self.plan.buffers[x]["shape"]), n.type.shape
        f = self.plan.func(f"broadcast({in_shape},{shape})", lambda: self.glue.broadcast(in_shape, shape))
        self.plan.call(f, [x, self.out(n)], n.name)


    def lower_max_pool2d(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        k, st, p, d = n.attr("kernel"), n.attr("stride"), n.attr("padding"), n.attr("dilation", (1, 1))
        ceil = bool(n.attr("ceil_mode", False))
        f = self.plan.func(f"max_pool2d({s},{k},{st},{p},{d},{ceil})", lambda: self.glue.max_pool2d(s, k, st, p, d, ceil))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_avg_pool2d(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        k, st, p = n.attr("kernel"), n.attr("stride"), n.attr("padding")
        cip, div = bool(n.attr("count_include_pad", True)), int(n.attr("divisor", 0))
        ceil = bool(n.attr("ceil_mode", False))
        f = self.plan.func(f"avg_pool2d({s},{k},{st},{p},{cip},{div},{ceil})",
                           lambda: self.glue.avg_pool2d(s, k, st, p, cip, div, ceil))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_adaptive_avg_pool2d(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        o = n.attr("output_size")
        f = self.plan.func(f"adaptive_avg_pool2d({s},{o})", lambda: self.glue.adaptive_avg_pool2d(s, o))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_mean(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        dims, keep = n.attr("dims"), bool(n.attr("keepdim"))
        f = self.plan.func(f"mean({s},{dims},{keep})", lambda: self.glue.mean(s, dims, keep))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_amax(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        dims, keep = n.attr("dims"), bool(n.attr("keepdim"))
        f = self.plan.func(f"amax({s},{dims},{keep})", lambda: self.glue.amax(s, dims, keep))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_softmax(self, n: Node) -> None:
        s = n.type.shape
        f = self.plan.func(f"softmax({s},{n.attr('axis')})", lambda: self.glue.softmax(s, n.attr("axis")))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_matmul(self, n: Node) -> None:
        a, b = (self.ref(i) for i in n.inputs)
        a_shape, b_shape = tuple(self.plan.buffers[a]["shape"]), tuple(self.plan.buffers[b]["shape"])
        f = self.plan.func(f"matmul({a_shape},{b_shape})", lambda: self.glue.matmul(a_shape, b_shape))
        self.plan.call(f, [a, b, self.out(n)], n.name)

    def lower_layer_norm(self, n: Node) -> None:
        s, axis, eps = n.type.shape, int(n.attr("axis")), float(n.attr("eps"))
        f = self.plan.func(f"layer_norm({s},{axis},{eps!r})", lambda: self.glue.layer_norm(s, axis, eps))
        self.plan.call(f, [self.ref(i) for i in n.inputs] + [self.out(n)], n.name)

    def lower_gelu(self, n: Node) -> None:
        s, approximate = n.type.shape, str(n.attr("approximate", "none"))
        f = self.plan.func(f"gelu({s},{approximate})", lambda: self.glue.gelu(s, approximate))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_cat(self, n: Node) -> None:
        ins = [self.ref(i) for i in n.inputs]
        shapes = tuple(tuple(self.plan.buffers[i]["shape"]) for i in ins)
        f = self.plan.func(f"concat({shapes},{n.attr('axis')})", lambda: self.glue.concat(shapes, n.attr("axis")))
        self.plan.call(f, ins + [self.out(n)], n.name)

    def lower_slice(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        axis, start, end = int(n.attr("axis")), int(n.attr("start")), int(n.attr("end"))
        f = self.plan.func(f"slice_axis({s},{axis},{start},{end})", lambda: self.glue.slice_axis(s, axis, start, end))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_take(self, n: Node) -> None:
        s, axis = tuple(self.g.type_of(n.inputs[0]).shape), int(n.attr("axis"))
        index = self.ref(n.inputs[1])
        index_shape = tuple(self.plan.buffers[index]["shape"])
        f = self.plan.func(f"take({s},{axis},{index_shape})", lambda: self.glue.take(s, axis, index_shape))
        self.plan.call(f, [self.ref(n.inputs[0]), index, self.out(n)], n.name)

    def lower_permute(self, n: Node) -> None:
        s = tuple(self.g.type_of(n.inputs[0]).shape)
        dims = n.attr("dims")
        f = self.plan.func(f"transpose({s},{dims})", lambda: self.glue.transpose(s, dims))
        self.plan.call(f, [self.ref(n.inputs[0]), self.out(n)], n.name)

    def lower_embedding(self, n: Node) -> None:
        table, ids = self.ref(n.inputs[0]), self.ref(n.inputs[1])
        rows, dim = self.plan.buffers[table]["shape"]
        ids_shape, ids_dtype = tuple(self.plan.buffers[ids]["shape"]), self.plan.buffers[ids]["dtype"]
        f = self.plan.func(f"embedding({rows},{dim},{ids_shape},{ids_dtype})",
                           lambda: self.glue.embedding(rows, dim, ids_shape, ids_dtype))
        self.plan.call(f, [table, ids, self.out(n)], n.name)
        for entry in self.plan.inputs:  # the runtime refuses ids outside the smallest table they index
            if entry["name"] == n.inputs[1]:
                entry["index_limit"] = min(entry.get("index_limit", rows), int(rows))

    def lower_reshape(self, n: Node) -> None:
        src = self.ref(n.inputs[0])
        root = self.plan.buffers[src].get("alias", src)
        self.plan.buffer(n.name, n.type.shape, self.plan.buffers[src]["dtype"], alias=root)


def lower_graph(g: Graph, *, backend: TvmBackend, force_kernel: str | None = None,
                on_layer: Callable[[str], None] | None = None) -> Plan:
    """Plan ``g`` (after the default pipeline); builds every PrimFunc with ``backend``."""
    if force_kernel not in (None, "bitserial", "bitparallel"):
        raise CompileError(f"unknown kernel {force_kernel!r}")
    missing = unsupported_ops(g)
    if missing:  # every gap in one error, before any kernel is built
        raise CompileError(f"the {backend.name} target cannot lower op(s): {describe_nodes(missing)}")
    return _Lowerer(g, backend, force_kernel, on_layer).lower()


def lowerable_ops() -> frozenset[str]:
    """The IR ops the planner has a lowering for (its ``lower_<key>`` for the op table's key)."""
    return frozenset(op for op, d in OP_TABLE.items() if d.tvm and hasattr(_Lowerer, f"lower_{d.tvm}"))


def unsupported_ops(g: Graph) -> list[tuple[str, str]]:
    """``(op, node)`` for every node of ``g`` the planner has no lowering for (the op table's
    TVM key names the planner method). A form of a lowerable op it could not lower would be
    reported as ``op [form]``; every form lowers today."""
    lowered = lowerable_ops()
    return [(n.op, n.name) for n in g.nodes if n.op not in lowered]
