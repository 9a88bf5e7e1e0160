"""LSQ weight quantizers and LSQ+ activation quantizers with straight-through rounding.

The integer grids, zero-point limits and rounding come from :mod:`qformat`; this module
only adds what training needs: learnable steps, STE, LSQ gradient scaling and the
data-driven initialisation.  After :func:`train.quant.convert` a quantizer is *frozen*:
its zero-point is an integer buffer and its forward is exactly the exported Q/DQ.

Scale shapes broadcast against the quantized tensor:
  per-tensor ``[]``; per-channel (Linear input ``[..., C]``) ``[C]``;
  per-head (``[B, H, N, d]`` or ``[B, H, N, N]``) ``[H, 1, 1]``; weights ``[N, 1]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import qformat

GROUPINGS = ("tensor", "channel", "head")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient ``g * dL/dx`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def _mse_search(x: torch.Tensor, reduce_dims: tuple[int, ...], qmin: int, qmax: int, signed_zp: bool,
                zp_range: tuple[int, int], steps: int = 40,
                max_elems: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid search over shrunk [min, max] clipping ranges, per group, minimising the MSE.

    Returns (scale, zero_point) with ``reduce_dims`` kept as size-1 dims.  Large activations are
    searched on a subset of the batch (``max_elems``): calibration must stay seconds, not minutes.
    """
    x = x.detach().float()
    if x.dim() > 1 and 0 in reduce_dims and x.numel() > max_elems:  # search on a batch subset
        x = x[: max(1, max_elems * x.shape[0] // x.numel())]
    xmin = x.amin(dim=reduce_dims, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=reduce_dims, keepdim=True).clamp(min=0)
    if not signed_zp:  # symmetric grid (weights) or unsigned non-negative tensor
        if qmin < 0:
            absmax = torch.maximum(-xmin, xmax)
            xmin, xmax = -absmax, absmax
        else:
            xmin = torch.zeros_like(xmin)
    best_err = torch.full_like(xmax, float("inf"))
    best_s = torch.ones_like(xmax)
    best_z = torch.zeros_like(xmax)
    for i in range(steps):
        alpha = 1.0 - i * (0.95 / steps)
        lo, hi = xmin * alpha, xmax * alpha
        if signed_zp:
            s = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
            z = torch.round(qmin - lo / s).clamp(*zp_range)
        elif qmin < 0:
            s = (hi / qmax).clamp(min=1e-8)
            z = torch.zeros_like(s)
        else:
            s = (hi / qmax).clamp(min=1e-8)
            z = torch.zeros_like(s)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        err = ((q - z) * s - x).pow(2).mean(dim=reduce_dims, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


class _LsqFakeQuant(torch.autograd.Function):
    """Fused LSQ/LSQ+ fake-quant: the same function and STE gradients as composing
    ``round_ste(clamp(x / s + z))`` from primitives, in a handful of ops instead of ~20
    autograd nodes (fake-quant dominated the CPU step time).

    ``s`` and ``zp`` are broadcastable views; ``z = clamp(round(zp), zp_range)`` is an integer.
    Gradients (LSQ+, clip before rounding), with ``u = x/s + z`` and ``in = qmin <= u <= qmax``::

        dx  = in
        ds  = g * ((q - z) - (x/s) * in)      # in range: round(u) - u ; clipped: bound - z
        dzp = g * (-s) * (not in) * [zp inside zp_range]
    """

    @staticmethod
    def forward(ctx, x, s, zp, qmin: int, qmax: int, g: float, zlo: int, zhi: int):
        z = torch.clamp(torch.round(zp), zlo, zhi) if zp is not None else None
        v = x / s
        u = v + z if z is not None else v
        q = torch.clamp(u, qmin, qmax).round_()
        ctx.save_for_backward(x, s, zp)
        ctx.consts = (qmin, qmax, g, zlo, zhi)
        return (q - z) * s if z is not None else q * s

    @staticmethod
    def backward(ctx, grad):
        x, s, zp = ctx.saved_tensors
        qmin, qmax, g, zlo, zhi = ctx.consts
        z = torch.clamp(torch.round(zp), zlo, zhi) if zp is not None else None
        v = x / s
        u = v + z if z is not None else v
        inside = (u >= qmin) & (u <= qmax)
        q = torch.clamp(u, qmin, qmax).round_()
        qz = q - z if z is not None else q
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_zp = None
        if ctx.needs_input_grad[1]:
            grad_s = (grad * torch.where(inside, qz - v, qz)).sum_to_size(s.shape) * g
        if zp is not None and ctx.needs_input_grad[2]:
            grad_zp = (grad * (~inside)).sum_to_size(zp.shape) * (-g) * s.detach()
            grad_zp = grad_zp * ((zp >= zlo) & (zp <= zhi))
        return grad_x, grad_s, grad_zp, None, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None, qmin: int, qmax: int, g: float,
                   zp_range: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s`` with LSQ+ gradients (see _LsqFakeQuant)."""
    return _LsqFakeQuant.apply(x, s, zp, qmin, qmax, g, zp_range[0], zp_range[1])


class WeightQuantizer(nn.Module):
    """Symmetric LSQ weight quantizer, one learned step per output channel (row).

    Gradient scale ``g = 1 / sqrt(numel * Qp)`` as in LSQ (numel of the whole weight).
    """

    def __init__(self, bits: int, out_channels: int, init: str = "mse") -> None:
        super().__init__()
        self.bits = qformat.check_bits(bits, "weight bits")
        self.qmin, self.qmax = qformat.qrange(self.bits, signed=True)
        self.init_method = init
        self.scale = nn.Parameter(torch.ones(out_channels, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, w: torch.Tensor) -> None:
        w2 = w.detach().reshape(w.shape[0], -1)
        if self.init_method == "lsq":
            s = 2 * w2.abs().mean(dim=1, keepdim=True) / math.sqrt(self.qmax)
        else:
            s, _ = _mse_search(w2, (1,), self.qmin, self.qmax, False, (0, 0))
        self.scale.copy_(s.clamp(min=1e-8))
        self.initialized.fill_(True)

    def _scale_like(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s.reshape((w.shape[0],) + (1,) * (w.dim() - 1))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(w)
        g = 1.0 / math.sqrt(w.numel() * self.qmax)
        # clamp before rounding (LSQ): the bounds are integers, so the forward is the same, and
        # an in-range value that rounds onto a bound keeps its STE gradient
        return lsq_fake_quant(w, self._scale_like(w, self.scale), None, self.qmin, self.qmax, g)

    @torch.no_grad()
    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """Frozen integer codes (int8) of ``w`` -- what convert() stores."""
        s = self._scale_like(w, self.scale)
        return torch.clamp(torch.round(w / s), self.qmin, self.qmax).to(torch.int8)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-channel={self.scale.shape[0]}"


class ActQuantizer(nn.Module):
    """LSQ+ activation quantizer: learned step and integer zero-point (STE-rounded).

    ``signed=False`` is for non-negative tensors (softmax output): unsigned grid, z = 0.
    ``grouping``: 'tensor', 'channel' (last dim, size ``groups``) or 'head' (dim 1 of a
    [B, H, ...] tensor, size ``groups``).  Initialised from the first batch it sees
    (MSE search over clipping ranges by default, or LSQ's 2·mean|x|/sqrt(Qp) rule).
    """

    def __init__(self, bits: int, signed: bool = True, grouping: str = "tensor", groups: int = 1,
                 init: str = "mse") -> None:
        super().__init__()
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}")
        self.bits = qformat.check_bits(bits, "activation bits")
        self.signed = signed
        self.qmin, self.qmax = qformat.qrange(self.bits, signed)
        self.zp_range = qformat.zero_point_range(self.bits, signed)
        self.grouping = grouping
        self.groups = groups if grouping != "tensor" else 1
        self.init_method = init
        shape = {"tensor": (), "channel": (groups,), "head": (groups, 1, 1)}[grouping]
        self.scale = nn.Parameter(torch.ones(shape))
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=signed)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def _reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.grouping == "tensor":
            return tuple(range(x.dim()))
        if self.grouping == "channel":
            return tuple(range(x.dim() - 1))
        return (0,) + tuple(range(2, x.dim()))

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.grouping == "head":
            return p.reshape((self.groups,) + (1,) * (x.dim() - 2))
        return p

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        dims = self._reduce_dims(x)
        if self.init_method == "lsq":
            s = 2 * x.detach().abs().mean(dim=dims) / math.sqrt(self.qmax)
            z = torch.zeros_like(s)
        else:
            s, z = _mse_search(x, dims, self.qmin, self.qmax, self.signed, self.zp_range)
            s, z = s.reshape(self.scale.shape), z.reshape(self.scale.shape)
        self.scale.copy_(s.reshape(self.scale.shape).clamp(min=1e-8))
        self.zero_point.copy_(z.reshape(self.scale.shape))
        self.initialized.fill_(True)

    def integer_zero_point(self) -> torch.Tensor:
        """The zero-point as the exporter sees it: rounded, clamped into the INT8-safe range."""
        return torch.round(self.zero_point.detach()).clamp(*self.zp_range)

    def int_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-point-0 integer clip bounds ``(lo, hi)`` per group (qformat.int_bounds)."""
        z = self.integer_zero_point()
        return self.qmin - z, self.qmax - z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(x)
        if bool(self.frozen):
            # Exactly the exported graph: s * clip(round(x / s), qmin - z, qmax - z).
            lo, hi = self.int_bounds()
            s = self._view(self.scale, x)
            return torch.clamp(torch.round(x / s), self._view(lo, x), self._view(hi, x)) * s
        per_group = x[0].numel() / max(self.scale.numel(), 1) if x.dim() > 1 else x.numel()
        g = 1.0 / math.sqrt(per_group * self.qmax)
        zp = self._view(self.zero_point, x) if self.signed else None
        return lsq_fake_quant(x, self._view(self.scale, x), zp, self.qmin, self.qmax, g, self.zp_range)

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, grouping={self.grouping}x{self.groups}"
