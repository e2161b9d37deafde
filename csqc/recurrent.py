"""CSQ recurrent layers: LSTM and GRU whose projections are CSQ-quantized linear layers.

``csqc.convert`` replaces ``nn.LSTM`` / ``nn.GRU`` with :class:`CSQLSTM` / :class:`CSQGRU`.
Each layer of the stack holds two :class:`~csqc.layers.CSQLinear` projections, ``ih``
(input -> gates) and ``hh`` (hidden -> gates), with activation quantization on their inputs
when ``act_bits`` is set. Gates are computed explicitly, so ``torch.export`` yields ops csqc
captures (``add``, ``sub``, ``mul``, ``sigmoid``, ``tanh``, slices of the gate vector)::

    LSTM  (gate order i, f, g, o as in nn.LSTM; both torch biases summed into ih's bias)
        gates = ih(x) + hh(h)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    GRU   (gate order r, z, n as in nn.GRU)
        a = ih(x); b = hh(h)
        r = sigmoid(a_r + b_r); z = sigmoid(a_z + b_z)
        n = tanh(a_n + r * b_n)
        h' = n + z * (h - n)        (= (1 - z) * n + z * h)

    LSTM with proj_size: h' = hr(sigmoid(o) * tanh(c')), hr a CSQ projection without bias

The sequence form (``forward``) unrolls over the time steps of a fixed-length input (each
step is a copy of the cell in the exported graph). Bidirectional layers run a second set of
projections (``ih_reverse``, ``hh_reverse``) over the sequence backwards, each layer over the
whole sequence before the next (which reads both directions' outputs, concatenated), states
ordered as torch orders them (layer 0 forward, layer 0 backward, layer 1 forward, ...).
:meth:`step` and :func:`one_step` give the single-step form ``(x_t, h, c) -> (h', c')`` that
per-step, batch-1 deployment runs (unidirectional layers).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import BadInput
from .layers import ActQuant, CSQLinear

__all__ = ["CSQLSTM", "CSQGRU", "from_torch", "one_step"]


def _proj(in_features: int, out_features: int, bias: bool, n_bits: int, act_bits: int | None,
          act_clip: str | None, act_mode: str, quantize_input: bool) -> CSQLinear:
    layer = CSQLinear(in_features, out_features, bias, n_bits)
    if act_bits is not None and quantize_input:
        layer.input_quant = ActQuant(act_bits, act_clip, act_mode)
    return layer


class _CSQRecurrent(nn.Module):
    """Shared structure: a stack of (ih, hh) projection pairs, batch_first sequences."""

    gates = 0  # gate blocks per layer (4 for LSTM, 3 for GRU)
    has_cell = False
    hh_bias = True  # whether hh has its own bias (GRU's b_hn sits inside r * (W_hn h + b_hn))

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, n_bits: int = 8, act_bits: int | None = None, *,
                 act_clip: str | None = None, act_mode: str = "dynamic", quantize_first_input: bool = True,
                 bidirectional: bool = False, proj_size: int = 0):
        super().__init__()
        if num_layers < 1:
            raise BadInput(f"num_layers must be at least 1, got {num_layers}")
        if proj_size and not (self.has_cell and 0 < proj_size < hidden_size):
            raise BadInput(f"proj_size {proj_size}: LSTM only, between 0 and hidden_size ({hidden_size})")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.bidirectional, self.proj_size = batch_first, bidirectional, int(proj_size)
        self.directions = 2 if bidirectional else 1
        self.out_size = self.proj_size or hidden_size  # h's width
        g = self.gates * hidden_size
        for suffix in ("", "_reverse")[:self.directions]:
            ih, hh, hr = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for layer in range(num_layers):
                width = input_size if layer == 0 else self.out_size * self.directions
                quant_x = layer > 0 or quantize_first_input
                ih.append(_proj(width, g, bias, n_bits, act_bits, act_clip, act_mode, quant_x))
                hh.append(_proj(self.out_size, g, bias and self.hh_bias, n_bits, act_bits, act_clip, act_mode, True))
                if self.proj_size:
                    hr.append(_proj(hidden_size, self.proj_size, False, n_bits, act_bits, act_clip, act_mode, True))
            setattr(self, f"ih{suffix}", ih)
            setattr(self, f"hh{suffix}", hh)
            if self.proj_size:
                setattr(self, f"hr{suffix}", hr)

    def _projections(self, layer: int, direction: int) -> tuple:
        """``(ih, hh, hr)`` of one layer and direction (``hr`` None without proj_size)."""
        suffix = "_reverse" if direction else ""
        hr = getattr(self, f"hr{suffix}")[layer] if self.proj_size else None
        return getattr(self, f"ih{suffix}")[layer], getattr(self, f"hh{suffix}")[layer], hr

    def _weights(self) -> list[tuple[Tensor | None, ...]]:
        """Per layer and direction (``layer * directions + direction``, torch's state order), the
        (ih, hh, hr) weights of the training form, computed once per call (the soft weights are
        costly to rebuild every time step); None once finalized."""
        return [tuple(None if p is None or p.finalized else p.soft_weight() for p in self._projections(layer, d))
                for layer in range(self.num_layers) for d in range(self.directions)]

    @staticmethod
    def _project(proj: CSQLinear, x: Tensor, weight: Tensor | None) -> Tensor:
        """``proj(x)`` with a precomputed training-form weight (same math as ``CSQLinear.forward``)."""
        if weight is None:  # finalized: a module call, so exported nodes are named after ih / hh
            return proj(x)
        if proj.input_quant is not None:
            x = proj.input_quant(x)
        return proj._run(x, weight)

    def _gate(self, v: Tensor, k: int) -> Tensor:
        h = self.hidden_size
        return v[..., k * h:(k + 1) * h]

    def _zeros(self, x: Tensor, width: int) -> Tensor:
        return x.new_zeros((self.num_layers * self.directions, x.shape[0], width))

    def forward(self, x: Tensor, state=None):
        """``x: [B, T, input]`` (``[T, B, input]`` unless ``batch_first``) -> ``(out, state)`` like
        ``nn.LSTM`` / ``nn.GRU`` (``out``'s features: both directions' ``h``, concatenated)."""
        if x.dim() != 3:
            raise BadInput(f"a batch of sequences ({'[B, T, input]' if self.batch_first else '[T, B, input]'}) "
                           f"expected, got shape {list(x.shape)} (unbatched: add the batch axis)")
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.has_cell:
            h0, c0 = state if state is not None else (self._zeros(x, self.out_size), self._zeros(x, self.hidden_size))
        else:
            h0, c0 = (state if state is not None else self._zeros(x, self.out_size)), None
        states = range(self.num_layers * self.directions)  # (static: torch.export may make the state's axes symbolic)
        hs = [h0[k] for k in states]
        cs = [c0[k] for k in states] if self.has_cell else None
        weights = self._weights()
        if self.bidirectional:
            out = self._layer_by_layer(x, hs, cs, weights)
        else:
            out = torch.stack([self._through_layers(x[:, t], hs, cs, weights) for t in range(x.shape[1])], 1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        h_n = torch.stack(hs, 0)
        return (out, (h_n, torch.stack(cs, 0))) if self.has_cell else (out, h_n)

    def _layer_by_layer(self, x: Tensor, hs: list, cs: list | None, weights) -> Tensor:
        """Both directions of each layer over the whole sequence, then the next layer on their
        concatenated outputs; updates ``hs`` (and ``cs``) in place, returns the top outputs."""
        steps = [x[:, t] for t in range(x.shape[1])]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                out = [None] * len(steps)
                for t in (reversed(range(len(steps))) if direction else range(len(steps))):
                    if self.has_cell:
                        hs[k], cs[k] = self.cell(layer, steps[t], hs[k], cs[k], weights[k], direction)
                    else:
                        hs[k] = self.cell(layer, steps[t], hs[k], weights[k], direction)
                    out[t] = hs[k]
                outputs.append(out)
            steps = [torch.cat(pair, -1) for pair in zip(*outputs)]
        return torch.stack(steps, 1)

    def _through_layers(self, inp: Tensor, hs: list, cs: list | None, weights) -> Tensor:
        """One time step up the stack; updates ``hs`` (and ``cs``) in place, returns the top ``h``."""
        for layer in range(self.num_layers):
            if self.has_cell:
                hs[layer], cs[layer] = self.cell(layer, inp, hs[layer], cs[layer], weights[layer])
            else:
                hs[layer] = self.cell(layer, inp, hs[layer], weights[layer])
            inp = hs[layer]
        return inp

    def step(self, x: Tensor, h: Tensor, c: Tensor | None = None):
        """One time step of the whole stack: ``x [B, input]``, ``h`` (and ``c``) ``[L, B, H]``
        (or ``[B, H]`` for one layer) -> the new ``h`` (and ``c``), same shapes."""
        if self.bidirectional:
            raise BadInput("a bidirectional layer has no single-step form (its backward direction reads the whole "
                           "sequence)")
        flat = h.dim() == 2
        hs = [h] if flat else [h[layer] for layer in range(self.num_layers)]
        cs = ([c] if flat else [c[layer] for layer in range(self.num_layers)]) if self.has_cell else None
        self._through_layers(x, hs, cs, self._weights())
        h_new = hs[0] if flat else torch.stack(hs, 0)
        if not self.has_cell:
            return h_new
        return h_new, (cs[0] if flat else torch.stack(cs, 0))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}"
                + (", bidirectional=True" if self.bidirectional else "")
                + (f", proj_size={self.proj_size}" if self.proj_size else ""))


class CSQLSTM(_CSQRecurrent):
    """``nn.LSTM`` with CSQ-quantized projections (``proj_size``'s too)."""

    gates = 4
    has_cell = True
    hh_bias = False  # nn.LSTM's two biases are always summed: one bias, in ih

    def cell(self, layer: int, x: Tensor, h: Tensor, c: Tensor, weights=(None, None, None),
             direction: int = 0) -> tuple[Tensor, Tensor]:
        ih, hh, hr = self._projections(layer, direction)
        gates = self._project(ih, x, weights[0]) + self._project(hh, h, weights[1])
        i = torch.sigmoid(self._gate(gates, 0))
        f = torch.sigmoid(self._gate(gates, 1))
        g = torch.tanh(self._gate(gates, 2))
        o = torch.sigmoid(self._gate(gates, 3))
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        return (h_new if hr is None else self._project(hr, h_new, weights[2])), c_new


class CSQGRU(_CSQRecurrent):
    """``nn.GRU`` with CSQ-quantized projections."""

    gates = 3

    def cell(self, layer: int, x: Tensor, h: Tensor, weights=(None, None, None), direction: int = 0) -> Tensor:
        ih, hh, _ = self._projections(layer, direction)
        a = self._project(ih, x, weights[0])
        b = self._project(hh, h, weights[1])
        r = torch.sigmoid(self._gate(a, 0) + self._gate(b, 0))
        z = torch.sigmoid(self._gate(a, 1) + self._gate(b, 1))
        n = torch.tanh(self._gate(a, 2) + r * self._gate(b, 2))
        return n + z * (h - n)


def from_torch(module: nn.Module, n_bits: int = 8, act_bits: int | None = None, *, act_clip: str | None = None,
               act_mode: str = "dynamic", quantize_first_input: bool = True) -> _CSQRecurrent:
    """A CSQ twin of an ``nn.LSTM`` / ``nn.GRU`` with its float weights loaded into the bits."""
    if type(module) not in (nn.LSTM, nn.GRU):
        raise BadInput(f"expected nn.LSTM or nn.GRU, got {type(module).__name__}")
    kind = type(module).__name__
    cls = CSQLSTM if kind == "LSTM" else CSQGRU
    proj = module.proj_size if kind == "LSTM" else 0
    new = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first, n_bits,
              act_bits, act_clip=act_clip, act_mode=act_mode, quantize_first_input=quantize_first_input,
              bidirectional=module.bidirectional, proj_size=proj)
    for layer in range(module.num_layers):
        for direction, suffix in enumerate(("", "_reverse")[:new.directions]):
            ih, hh, hr = new._projections(layer, direction)
            ih.load_float_weight(getattr(module, f"weight_ih_l{layer}{suffix}").detach())
            hh.load_float_weight(getattr(module, f"weight_hh_l{layer}{suffix}").detach())
            if hr is not None:
                hr.load_float_weight(getattr(module, f"weight_hr_l{layer}{suffix}").detach())
            if module.bias:
                b_ih = getattr(module, f"bias_ih_l{layer}{suffix}").detach()
                b_hh = getattr(module, f"bias_hh_l{layer}{suffix}").detach()
                with torch.no_grad():
                    if cls is CSQLSTM:
                        ih.bias.copy_(b_ih + b_hh)
                    else:
                        ih.bias.copy_(b_ih)
                        hh.bias.copy_(b_hh)
    return new


class _OneStep(nn.Module):
    def __init__(self, rnn: _CSQRecurrent):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h: Tensor, c: Tensor | None = None):
        return self.rnn.step(x, h, c) if self.rnn.has_cell else self.rnn.step(x, h)


def one_step(rnn: _CSQRecurrent) -> nn.Module:
    """A module running one time step: ``(x_t, h, c) -> (h', c')`` (LSTM) or ``(x_t, h) -> h'``
    (GRU); state shapes ``[B, H]`` for one layer, ``[L, B, H]`` for a stack. Shares ``rnn``'s
    parameters."""
    if not isinstance(rnn, _CSQRecurrent):
        raise BadInput(f"expected a CSQLSTM or CSQGRU, got {type(rnn).__name__}")
    return _OneStep(rnn)
