"""Handlers for layers: CSQ's quantized conv and linear layers and activation quantizers (the
annotated ops of ``csqc.layers``), float convs, linears and batch norms, matmul and einsum."""

from __future__ import annotations

import string

import numpy as np
import torch

from ..errors import BadInput
from ..idioms import IDIOM_META, idiom_attrs
from ..ir import QuantSpec, TensorType
from .context import _arg, _aten, _base, _Ctx, module_path, _pair, _scalar, _shape_of, _type_of, _typed, _Unsupported
from .integers import embedding_at_positions


def _active_bits(mask: int, n_bits: int) -> tuple[int, ...]:
    return tuple(b for b in reversed(range(n_bits)) if mask >> b & 1)


def _quant_layer(ctx: _Ctx, fx: torch.fx.Node, conv: bool, x_value: str | None = None, conv_attrs: dict | None = None,
                 ttype: TensorType | None = None, weight: np.ndarray | None = None, channel_repeat: int = 1) -> str:
    """A ``csqc::quant_linear`` / ``quant_conv2d`` node as a qlinear / qconv2d; ``x_value``,
    ``conv_attrs``, ``ttype`` and ``weight`` replace its input, convolution attributes, type and
    codes, and each output channel's scale and bias then serve ``channel_repeat`` channels in a
    row (a transposed convolution's stride-one form: its phases stacked per channel)."""
    x, q, scale, bias, n_bits, mask = fx.args[:6]
    qt, st = ctx.tensor(q), ctx.tensor(scale)
    codes = qt.detach().numpy() if weight is None else weight
    out_ch = qt.shape[0]
    base = module_path(fx) or fx.name
    mult = (st.detach().to(torch.float32) / float(2**n_bits - 1)).numpy().astype(np.float32)
    per_channel = mult.size > 1
    mult = np.repeat(np.broadcast_to(mult.reshape(-1), (out_ch,)), channel_repeat)
    inputs = [x_value or ctx.value(x), ctx.param(f"{base}.weight", codes), ctx.param(f"{base}.mult", mult)]
    if bias is not None:
        add = ctx.tensor(bias).detach().numpy().astype(np.float32)
        inputs.append(ctx.param(f"{base}.add", np.repeat(add, channel_repeat)))
    attrs = {"weight_shape": tuple(codes.shape), "act": "none"}
    form = _layer_form(fx)
    if form:
        attrs["form"] = form
    if codes.size != qt.numel():  # the phases' zero taps (or a latent's linear form): the model's own count
        attrs["form_weights"] = int(qt.numel())
    if conv_attrs is not None:
        attrs.update(conv_attrs)
    elif conv:
        stride, padding, dilation, groups = fx.args[6:10]
        attrs.update(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=int(groups))
    spec = QuantSpec(int(n_bits), _active_bits(int(mask), int(n_bits)), "per_channel" if per_channel else "per_tensor")
    return ctx.emit(fx, "qconv2d" if conv else "qlinear", inputs, ttype, attrs=attrs, quant=spec)


def _layer_form(fx: torch.fx.Node) -> str:
    """A quantized layer as the model wrote it where its IR op says another thing (a 1-D
    convolution runs as a 2-D one over a height of one, a transposed one as the convolution of
    its phases), for reports: ``conv1d 64x64x3``, ``conv_transpose2d 256x128x4x4 stride 2x2``
    (PyTorch's weight shape); "" otherwise."""
    stack = fx.meta.get("nn_module_stack") or {}
    module = str(list(stack.values())[-1][1]).rsplit(".", 1)[-1] if stack else ""
    shape = _shape_of(fx.args[1])
    if len(shape) != 4:
        return ""
    o, c_g, kh, kw = shape
    if fx.target == torch.ops.csqc.quant_conv_transpose2d.default:
        groups, (sh, sw) = int(fx.args[10]), _pair(fx.args[6])
        if module == "CSQConvTranspose1d":
            return f"conv_transpose1d {c_g * groups}x{o // groups}x{kw} stride {sw}"
        return f"conv_transpose2d {c_g * groups}x{o // groups}x{kh}x{kw} stride {sh}x{sw}"
    if fx.target == torch.ops.csqc.quant_conv2d.default and module == "CSQConv1d":
        return f"conv1d {o}x{c_g}x{kw}"
    return ""


def _act_quant(ctx: _Ctx, fx: torch.fx.Node) -> str:
    x, bits, static = fx.args[:3]
    xv = ctx.value(x)
    base = (module_path(fx) or fx.name)
    t = _type_of(fx)
    idiom = fx.meta.get(IDIOM_META)
    if idiom is not None and idiom.unsigned and xv not in ctx.nonneg:
        # a 0..L grid maps negative inputs to code 0: relu, then csqc's unsigned codes
        xv = ctx.emit(fx, "relu", [xv], t, base=f"{base}.relu")
    signed = xv not in ctx.nonneg
    q = ctx.emit(fx, "quantize", [xv], TensorType(t.shape, "int32", int(bits), signed),
                 {"bits": int(bits), "static_scale": float(static), "signed": signed, **idiom_attrs(fx)},
                 base=f"{base}.quant")
    return ctx.emit(fx, "dequantize", [q], t, base=f"{base}.dequant")


def _act_quant_asymmetric(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``csqc::act_quant_asymmetric``: unsigned codes with a zero point (static: the op's own)."""
    x, bits, static, zero_point = fx.args[:4]
    t = _type_of(fx)
    base = module_path(fx) or fx.name
    static = float(static)
    attrs = {"bits": int(bits), "static_scale": static, "signed": False, "asymmetric": True,
             "zero_point": int(zero_point) if static > 0 else 0, **idiom_attrs(fx)}
    q = ctx.emit(fx, "quantize", [ctx.value(x)], TensorType(t.shape, "int32", int(bits), False, True), attrs,
                 base=f"{base}.quant")
    return ctx.emit(fx, "dequantize", [q], t, base=f"{base}.dequant")


def _float_layer_inputs(ctx: _Ctx, fx: torch.fx.Node) -> list[str]:
    """A float conv's or linear's input value, weight and (if any) bias parameters."""
    x, w = fx.args[:2]
    b = _arg(fx, 2, "bias")
    base = module_path(fx) or fx.name
    inputs = [ctx.value(x), ctx.param(f"{base}.weight", ctx.tensor(w).detach().numpy().astype(np.float32))]
    if b is not None:
        inputs.append(ctx.param(f"{base}.bias", ctx.tensor(b).detach().numpy().astype(np.float32)))
    return inputs


def _float_conv(ctx: _Ctx, fx: torch.fx.Node) -> str:
    inputs = _float_layer_inputs(ctx, fx)
    attrs = {"stride": _pair(_arg(fx, 3, "stride", 1)), "padding": _pair(_arg(fx, 4, "padding", 0)),
             "dilation": _pair(_arg(fx, 5, "dilation", 1)), "groups": int(_arg(fx, 6, "groups", 1)), "act": "none"}
    if isinstance(_arg(fx, 4, "padding", 0), str):
        raise _Unsupported("string padding")
    return ctx.emit(fx, "conv2d", inputs, attrs=attrs)


def _float_linear(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.emit(fx, "linear", _float_layer_inputs(ctx, fx), attrs={"act": "none"})


def _batch_norm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # batch_norm(x, weight, bias, mean, var, training, momentum, eps) and the no_training form
    if fx.target == _aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var, _, eps = fx.args[:7]
    else:
        x, w, b, mean, var, training, _, eps = fx.args[:8]
        if training:
            raise _Unsupported("batch_norm in training mode (call model.eval())")
    var_t = ctx.tensor(var).detach().float().numpy()
    mean_t = ctx.tensor(mean).detach().float().numpy()
    if not (var_t + np.float32(eps) > 0).all():  # 1 / sqrt would be NaN or infinite
        raise BadInput(f"batch norm {module_path(fx) or fx.name}: running variance + eps must be positive; "
                       "the model's statistics are damaged")
    c = var_t.shape[0]
    w_t = ctx.tensor(w).detach().float().numpy() if w is not None else np.ones(c, np.float32)
    b_t = ctx.tensor(b).detach().float().numpy() if b is not None else np.zeros(c, np.float32)
    # the inference transform torch uses: x * alpha + (beta - mean * alpha); an overflow is
    # refused with the parameter's name once the graph is built
    with np.errstate(over="ignore", invalid="ignore"):
        alpha = (np.float32(1) / np.sqrt(var_t + np.float32(eps))).astype(np.float32) * w_t
        shift = (b_t - mean_t * alpha).astype(np.float32)
    base = module_path(fx) or fx.name
    return ctx.emit(fx, "batch_norm", [ctx.value(x), ctx.param(f"{base}.mul", alpha), ctx.param(f"{base}.add", shift)])


def _matmul(ctx: _Ctx, fx: torch.fx.Node) -> str:
    a, b = fx.args[:2]
    if min(len(_type_of(v).shape) for v in (a, b)) < 2:
        raise _Unsupported("matmul of a vector (rank-1 operand)")
    return ctx.emit(fx, "matmul", [ctx.value(a), ctx.value(b)], base=f"{module_path(fx) or fx.name}.matmul")


def _einsum_subscripts(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """The operands' and the output's subscripts of ``equation`` (an implicit output: the
    letters used once, in alphabetical order, as torch.einsum reads it; an ellipsis: letters of
    their own, :func:`_named_ellipsis`)."""
    equation = _named_ellipsis(equation.replace(" ", ""), ranks)
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        out = "".join(sorted(c for c in set(lhs.replace(",", "")) if lhs.count(c) == 1))
    if len(terms) != len(ranks) or any(len(t) != r for t, r in zip(terms, ranks)) or not all(
            c.isalpha() for c in "".join(terms) + out):
        raise _Unsupported(f"einsum {equation!r} does not match its operands' ranks {ranks}")
    if any(len(set(t)) != len(t) for t in [*terms, out]):
        raise _Unsupported(f"einsum {equation!r} repeats a subscript within a term (a diagonal)")
    if not set(out) <= set("".join(terms)):
        raise _Unsupported(f"einsum {equation!r}: an output subscript no operand has")
    return terms, out


def _named_ellipsis(equation: str, ranks: list[int]) -> str:
    """``equation`` with each ``...`` spelled as letters it does not use (the same dimensions in
    every operand that has one, and in the output: leading ones, where the output is implicit).
    An ellipsis standing for different numbers of dimensions (broadcast) is not translated."""
    if "." not in equation:
        return equation
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if equation.count(".") != 3 * equation.count("...") or len(terms) != len(ranks) or any(
            t.count("...") > 1 for t in [*terms, out]):
        raise _Unsupported(f"einsum {equation!r}: an ellipsis must be '...', once a term")
    counts = {r - len(t) + 3 for t, r in zip(terms, ranks) if "..." in t}
    if len(counts) != 1 or min(counts) < 0:
        raise _Unsupported(f"einsum {equation!r} broadcasts its ellipsis over operands of different ranks")
    spare = [c for c in string.ascii_letters if c not in equation]
    named = "".join(spare[:counts.pop()])
    if not arrow:
        once = sorted(c for c in set(lhs.replace(",", "").replace(".", "")) if lhs.count(c) == 1)
        out = "..." + "".join(once)
    return ",".join(t.replace("...", named) for t in terms) + "->" + out.replace("...", named)


def _einsum(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``einsum`` of one operand (a permutation) or two (a batched matmul: batch subscripts in
    both and the output, contracted ones in both only, free ones in one and the output), as
    permute / reshape / matmul / reshape / permute; sums over one operand's own subscripts, and
    broadcast (size-1) dimensions, are not translated."""
    equation, operands = fx.args[0], list(fx.args[1])
    types = [_type_of(v) for v in operands]
    terms, out = _einsum_subscripts(equation, [len(t.shape) for t in types])
    base, dtype = f"{module_path(fx) or fx.name}.einsum", _type_of(fx).dtype
    sizes: dict[str, int] = {}
    for term, t in zip(terms, types):
        for c, n in zip(term, t.shape):
            if sizes.setdefault(c, n) != n:
                raise _Unsupported(f"einsum {equation!r}: subscript {c} has sizes {sizes[c]} and {n} (broadcast)")
    values = [ctx.value(v) for v in operands]

    def permute(value: str, term: str, order: str, part: str) -> str:
        if term == order:
            return value
        return ctx.emit(fx, "permute", [value], TensorType(tuple(sizes[c] for c in order), dtype),
                        {"dims": tuple(term.index(c) for c in order)}, base=f"{base}.{part}")

    def reshape(value: str, shape: tuple[int, ...], part: str, current: tuple[int, ...]) -> str:
        if shape == current:
            return value
        return ctx.emit(fx, "reshape", [value], TensorType(shape, dtype), base=f"{base}.{part}")

    if not out:
        raise _Unsupported(f"einsum {equation!r} to a scalar")
    if len(terms) == 1:
        if set(terms[0]) != set(out):
            raise _Unsupported(f"einsum {equation!r} sums over one operand's own subscripts")
        return permute(values[0], terms[0], out, "permute")
    if len(terms) != 2:
        raise _Unsupported(f"einsum {equation!r} of {len(terms)} operands (one or two are translated: write it as "
                           "a chain of two-operand einsums)")
    a, b = terms
    batch = "".join(c for c in out if c in a and c in b)
    contract = "".join(c for c in a if c in b and c not in out)
    free_a, free_b = "".join(c for c in out if c in a and c not in b), "".join(c for c in out if c in b and c not in a)
    if set(a) != set(batch + contract + free_a) or set(b) != set(batch + contract + free_b):
        raise _Unsupported(f"einsum {equation!r} sums over one operand's own subscripts")
    nb, nm, nk, nn = (int(np.prod([sizes[c] for c in part], dtype=np.int64))
                      for part in (batch, free_a, contract, free_b))
    left = permute(values[0], a, batch + free_a + contract, "a")
    left = reshape(left, (nb, nm, nk), "a_3d", tuple(sizes[c] for c in batch + free_a + contract))
    right = permute(values[1], b, batch + contract + free_b, "b")
    right = reshape(right, (nb, nk, nn), "b_3d", tuple(sizes[c] for c in batch + contract + free_b))
    product = ctx.emit(fx, "matmul", [left, right], TensorType((nb, nm, nn), dtype), base=f"{base}.matmul")
    order = batch + free_a + free_b
    product = reshape(product, tuple(sizes[c] for c in order), "unflatten", (nb, nm, nn))
    return permute(product, order, out, "out")


def _embedding(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)
    return _table_rows(ctx, fx, *fx.args[:2])


def _table_rows(ctx: _Ctx, fx: torch.fx.Node, table, ids) -> str:
    """Rows of constant ``table`` at token ids or at positions computed from them (an embedding,
    or ``table.index_select(0, ids)``): the IR op gives ids.shape + [dim]; a reshape restores a
    view of the ids taken on the way."""
    base = module_path(fx) or fx.name
    ids_value = ctx.value(ids)
    if ids_value in ctx.int_ranges:  # positions the model computed from its ids (capture.integers)
        return embedding_at_positions(ctx, fx, ctx.tensor(table).detach().float().numpy(), ids_value,
                                      _shape_of(ids))
    if ids_value not in ctx.integer_inputs:
        raise _Unsupported("ids computed inside the model from float values (an integer model input, or "
                           "integers computed from one, may index an embedding)")
    weight = ctx.param(f"{base}.weight", ctx.tensor(table).detach().float().numpy())
    t = _type_of(fx)
    rows_shape = ctx.id_shapes[ids_value] + (t.shape[-1],)
    out = ctx.emit(fx, "embedding", [weight, ids_value], TensorType(rows_shape), base=base)
    if rows_shape == t.shape:
        return out
    return ctx.emit(fx, "reshape", [out], t, base=_base(fx, "reshape"))


def _addmm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # addmm(bias, x, w, beta=1, alpha=1) = bias + x @ w: transformers' Conv1D keeps w as [in, out]
    bias, x, w = fx.args[:3]
    plain = float(_arg(fx, 3, "beta", 1)) == 1 and float(_arg(fx, 4, "alpha", 1)) == 1
    base = module_path(fx) or fx.name
    if plain and ctx.is_const(w) and ctx.is_const(bias) and ctx.tensor(bias).dim() == 1:
        weight = ctx.tensor(w).detach().float().numpy().T
        inputs = [ctx.value(x), ctx.param(f"{base}.weight", np.ascontiguousarray(weight)),
                  ctx.param(f"{base}.bias", ctx.tensor(bias).detach().float().numpy())]
        return ctx.emit(fx, "linear", inputs, attrs={"act": "none"})
    return _scaled_sum_of_product(ctx, fx)


def _scaled_sum_of_product(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``addmm`` / ``baddbmm(input, a, b, beta, alpha)`` = ``beta * input + alpha * (a @ b)``
    (BLOOM's ALiBi attention scores): a matmul, times ``alpha`` where it is not 1, plus the
    input times ``beta`` where that is not 1; ``beta`` 0 leaves the input out (torch does not
    read it then: NaN there does not spread). torch accumulates the product into the scaled
    input: float tolerance against torch; the runtimes of the IR agree as their matmul does."""
    addend, a, b = fx.args[:3]
    beta, alpha = float(_arg(fx, 3, "beta", 1)), float(_arg(fx, 4, "alpha", 1))
    if min(len(_shape_of(v)) for v in (a, b)) < 2:
        raise _Unsupported("matmul of a vector (rank-1 operand)")
    what = "baddbmm" if fx.target == _aten.baddbmm.default else "addmm"
    out = _type_of(fx).shape
    last = beta == 0 and alpha == 1
    product = (ctx.emit(fx, "matmul", [ctx.value(a), ctx.value(b)], base=_base(fx, what)) if last else
               _typed(ctx, fx, "matmul", [ctx.value(a), ctx.value(b)], out, "matmul"))
    if alpha != 1:
        scale = [product, _scalar(ctx, fx, alpha, "alpha")]
        product = (ctx.emit(fx, "mul", scale, base=_base(fx, what)) if beta == 0 else
                   _typed(ctx, fx, "mul", scale, out, "scaled_product"))
    if beta == 0:
        return product
    addend_v = ctx.value(addend)
    if beta != 1:
        addend_v = _typed(ctx, fx, "mul", [addend_v, _scalar(ctx, fx, beta, "beta")], _shape_of(addend),
                          "scaled_input")
    return ctx.emit(fx, "add", [product, addend_v], base=_base(fx, what))


def _float_conv_convolution(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
    if fx.args[6]:
        raise _Unsupported("transposed convolution")
    x, w, b, stride, padding, dilation = fx.args[:6]
    shim = torch.fx.Node.__new__(torch.fx.Node)
    shim.__dict__.update(fx.__dict__)
    shim.args = (x, w, b, stride, padding, dilation, fx.args[8])
    shim.kwargs = {}
    return _float_conv(ctx, shim)


def _as_2d(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape) -> str:
    return _typed(ctx, fx, "reshape", [xv], (shape[0], shape[1], 1, shape[2]), "as_2d")


def _over_height_one(fx: torch.fx.Node, i: int, name: str, default: int, height: int) -> tuple[int, int]:
    """A 1-D op's argument as its 2-D op's over a height of one: ``(height, value)``."""
    return height, int(_pair(_arg(fx, i, name, default))[0])


def _conv1d(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """A float ``conv1d`` as a conv2d over a height of one (weight ``[O, C/g, 1, K]``)."""
    shape, out = _shape_of(fx.args[0]), _type_of(fx).shape
    if isinstance(_arg(fx, 4, "padding", 0), str):
        raise _Unsupported("string padding")
    base = module_path(fx) or fx.name
    w = ctx.tensor(fx.args[1]).detach().numpy().astype(np.float32)
    inputs = [_as_2d(ctx, fx, ctx.value(fx.args[0]), shape), ctx.param(f"{base}.weight", w[:, :, None, :])]
    if _arg(fx, 2, "bias") is not None:
        inputs.append(ctx.param(f"{base}.bias", ctx.tensor(_arg(fx, 2, "bias")).detach().numpy().astype(np.float32)))
    attrs = {"stride": _over_height_one(fx, 3, "stride", 1, 1), "padding": _over_height_one(fx, 4, "padding", 0, 0),
             "dilation": _over_height_one(fx, 5, "dilation", 1, 1), "groups": int(_arg(fx, 6, "groups", 1)),
             "act": "none"}
    conv = _typed(ctx, fx, "conv2d", inputs, (out[0], out[1], 1, out[2]), "conv2d", attrs)
    return ctx.emit(fx, "reshape", [conv], base=_base(fx, "conv1d"))
