"""Hypernetworks with magnitude invariant parametrizations (MIP).

Ortiz, Guttag, Dalca, "Magnitude Invariant Parametrizations Improve Hypernetwork Learning",
ICLR 2024, arXiv:2304.07645. Official code: ``JJGO/hyperlight`` (``hypernet/model.py``,
``encoding.py``, ``initialization.py``); defaults and initialisation here follow it.

Why: a hypernetwork maps a hyperparameter ``z`` (e.g. a loss weight) to the weights ``θ(z)`` of a
primary network. With a plain MLP the *magnitude* of the predicted weights follows the magnitude
of ``z``, so the primary network's activation scale, and with it the training dynamics, depend on
``z``. MIP makes two changes:

1. **Input encoding** ``"cos|sin"`` (default): ``z ∈ [0, 1]^k ↦ [cos(πz/2), sin(πz/2)] ∈ R^{2k}``,
   whose norm is ``√k`` for every ``z`` (a warning is given when ``z`` leaves ``[0, 1]``, as the
   official code does). ``"z|1-z"`` (``[z, 1 − z]``) and ``None`` (``z`` as is) are the official
   alternatives.
2. **Additive output** ``θ(z) = θ₀ + Δθ(z)``: ``θ₀`` is the bias of the MLP's output layer (the
   "independent weights"), initialised like an ordinary primary network, and ``Δθ`` the rest of
   the MLP, so ``θ`` starts at a well-scaled network whatever ``z`` is.

Initialisation (official defaults):

* hidden layers: ``Linear`` + ``LeakyReLU`` (slope 0.01), weights ``kaiming_normal_`` in
  ``fan_out`` mode with ``nonlinearity="leaky_relu"`` (torch's ``a=0``, so gain √2: std
  ``√2/√fan_out``), biases 0;
* output layer weight: initialised **per predicted tensor** (its row block as its own
  ``kaiming_normal_`` fan-out matrix: std ``√2/√numel(tensor)``), because one fan-out over all
  predicted weights would shrink with the size of the primary network;
* ``θ₀``: every ``*.weight`` with ``kaiming_normal_`` (fan-in, leaky-relu gain √2), every
  ``*.bias`` 0, anything else 0.

Divergence (named): a 1-D ``*.weight`` (a norm gain) cannot take a fan-in init (the official code
raises); here it starts at 1, like the norm it parametrizes.

Use with :func:`torch.func.functional_call`::

    primary = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    hyper = HyperNet.for_module(primary, num_inputs=1, hidden_sizes=(16, 64))
    params = hyper(torch.tensor([0.3]))            # {"0.weight": (16, 2), ...}
    y = torch.func.functional_call(primary, params, (x,))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import init

__all__ = ["HyperNet", "encode_input"]

Encoding = Literal["cos|sin", "z|1-z"] | None
ENCODINGS: tuple[Encoding, ...] = ("cos|sin", "z|1-z", None)


def encode_input(z: Tensor, mode: Encoding = "cos|sin") -> Tensor:
    """MIP's input encoding along the last dim: ``[cos(πz/2), sin(πz/2)]``, ``[z, 1 − z]`` or ``z``."""
    if mode not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {mode!r}")
    if mode is None:
        return z
    if mode == "cos|sin":
        if bool((z < 0).any()) or bool((z > 1).any()):
            warnings.warn("HyperNet input has values outside [0, 1]; the cos|sin encoding assumes z in [0, 1]", stacklevel=2)
        half = torch.pi * z / 2
        return torch.cat([torch.cos(half), torch.sin(half)], dim=-1)
    return torch.cat([z, 1 - z], dim=-1)


def _fan_out_normal_(w: Tensor) -> None:
    init.kaiming_normal_(w, mode="fan_out", nonlinearity="leaky_relu")


class HyperNet(nn.Module):
    """MLP from ``num_inputs`` hyperparameters to the named tensors of ``output_shapes`` (MIP by default).

    Args:
        num_inputs: ``k``, the number of hyperparameters (``z`` has shape ``(k,)`` or ``(B, k)``).
        output_shapes: ``{name: shape}`` of the predicted primary-network tensors, in output order.
        hidden_sizes: widths of the hidden layers (at least one).
        encoding: ``"cos|sin"`` (MIP, default), ``"z|1-z"`` or ``None``.
        residual: ``True`` (MIP, default) initialises ``θ₀`` (the output bias) as a primary
            network; ``False`` leaves it at 0, the plain hypernetwork MIP is compared against.
        output_split_init: per-tensor initialisation of the output weight (default, official).
        negative_slope: the hidden LeakyReLU's slope (official 0.01).

    ``forward(z)`` returns ``{name: tensor}``: ``shape`` for a single ``z`` of shape ``(k,)``,
    ``(B, *shape)`` for a batch.
    """

    def __init__(
        self,
        num_inputs: int,
        output_shapes: Mapping[str, Sequence[int]],
        hidden_sizes: Sequence[int],
        *,
        encoding: Encoding = "cos|sin",
        residual: bool = True,
        output_split_init: bool = True,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 1:
            raise ValueError(f"num_inputs must be an int >= 1, got {num_inputs!r}")
        if not isinstance(output_shapes, Mapping) or not output_shapes:
            raise ValueError(f"output_shapes must be a non-empty mapping name -> shape, got {output_shapes!r}")
        shapes = {str(k): tuple(int(s) for s in v) for k, v in output_shapes.items()}
        if any(any(s < 1 for s in v) for v in shapes.values()):
            raise ValueError(f"every output shape must have positive sizes, got {shapes}")
        hidden = [int(h) for h in hidden_sizes]
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden_sizes must be one or more positive ints, got {hidden_sizes!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.num_inputs, self.output_shapes, self.encoding, self.residual = num_inputs, shapes, encoding, residual
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in shapes.items():
            self.offsets[name] = (offset, math.prod(shape))
            offset += math.prod(shape)
        layers: list[nn.Module] = []
        width = num_inputs * (1 if encoding is None else 2)
        for h in hidden:
            lin = nn.Linear(width, h)
            _fan_out_normal_(lin.weight)
            init.zeros_(lin.bias)
            layers += [lin, nn.LeakyReLU(negative_slope)]
            width = h
        self.backbone = nn.Sequential(*layers)
        self.output = nn.Linear(width, offset)
        with torch.no_grad():
            if output_split_init:
                for start, size in self.offsets.values():
                    _fan_out_normal_(self.output.weight[start : start + size])
            else:
                _fan_out_normal_(self.output.weight)
            self.output.bias.zero_()
            if residual:
                self.set_independent_weights(self._initial_independent_weights())

    @classmethod
    def for_module(cls, module: nn.Module, num_inputs: int, hidden_sizes: Sequence[int], **kwargs: object) -> HyperNet:
        """A hypernetwork predicting every parameter of ``module`` (names and shapes from ``named_parameters``)."""
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        return cls(num_inputs, shapes, hidden_sizes, **kwargs)  # type: ignore[arg-type]

    def _initial_independent_weights(self) -> dict[str, Tensor]:
        out = {}
        for name, shape in self.output_shapes.items():
            t = torch.zeros(shape)
            if name == "weight" or name.endswith(".weight"):
                if t.dim() >= 2:
                    init.kaiming_normal_(t, nonlinearity="leaky_relu")
                else:
                    t.fill_(1.0)  # named divergence: a norm gain starts at 1
            out[name] = t
        return out

    def independent_weights(self) -> dict[str, Tensor]:
        """``θ₀`` (views of the output bias), by name."""
        return {n: self.output.bias[s : s + k].view(self.output_shapes[n]) for n, (s, k) in self.offsets.items()}

    @torch.no_grad()
    def set_independent_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Set ``θ₀`` (e.g. from a trained primary network); names and shapes must match ``output_shapes``."""
        missing, extra = set(self.output_shapes) - set(weights), set(weights) - set(self.output_shapes)
        if missing or extra:
            raise ValueError(f"independent weights: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, (start, size) in self.offsets.items():
            w = weights[name]
            if tuple(w.shape) != self.output_shapes[name]:
                raise ValueError(f"independent weight {name!r}: expected shape {self.output_shapes[name]}, got {tuple(w.shape)}")
            self.output.bias[start : start + size] = w.reshape(-1).to(self.output.bias)

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        if not isinstance(z, Tensor):
            raise TypeError(f"HyperNet expects a tensor z, got {type(z).__name__}")
        single = z.dim() == 1
        if z.dim() not in (1, 2) or z.shape[-1] != self.num_inputs:
            raise ValueError(f"HyperNet expects z of shape ({self.num_inputs},) or (B, {self.num_inputs}), got {tuple(z.shape)}")
        flat = self.output(self.backbone(encode_input(z.to(self.output.weight.dtype), self.encoding)))
        out = {}
        for name, (start, size) in self.offsets.items():
            piece = flat[..., start : start + size]
            out[name] = piece.reshape(self.output_shapes[name] if single else (flat.shape[0], *self.output_shapes[name]))
        return out

    def extra_repr(self) -> str:
        outputs = len(self.output_shapes)
        return f"num_inputs={self.num_inputs}, outputs={outputs}, encoding={self.encoding!r}, residual={self.residual}"
