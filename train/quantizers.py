"""LSQ weight quantizers and LSQ+ activation quantizers with straight-through rounding.

The integer grids, zero-point limits and rounding come from :mod:`qformat`; this module
only adds what training needs: learnable steps, STE, LSQ gradient scaling and the
data-driven initialisation.  After :func:`train.qat.convert` a quantizer is *frozen*:
its zero-point is an integer buffer and its forward is exactly the exported Q/DQ.

Scale shapes broadcast against the quantized tensor:
  per-tensor ``[]``; per-channel (Linear input ``[..., C]``) ``[C]``;
  per-head (``[B, H, N, d]`` or ``[B, H, N, N]``) ``[H, 1, 1]``; weights ``[N, 1]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import qformat
from qformat.spec import normalise_bits

GROUPINGS = ("tensor", "channel", "head")
#: how a scale's gradient is normalised: LSQ's 1/sqrt(N * Qp), or VVTQ's 1/sqrt(Qp * ||x||_1)
GRAD_NORMS = ("lsq", "l1")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def needs_init(q: nn.Module) -> bool:
    """Whether quantizer ``q`` still waits for its data-driven init (its first batch).  Under
    ``torch.compile`` (:mod:`train.fastqat`) never: only calibrated models are compiled, and a
    data-dependent branch would split the graph."""
    return not torch.compiler.is_compiling() and not bool(q.initialized)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient ``g * dL/dx`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def mse_search(x: torch.Tensor, reduce_dims: tuple[int, ...], qmin, qmax, signed: bool, asym: bool,
                zp_range: tuple, steps: int = 40, max_elems: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid search over shrunk [min, max] clipping ranges, per group, minimising the MSE.

    ``qmin``/``qmax``/``zp_range`` are ints or tensors broadcast against ``x`` (bits per group);
    candidates use each group's widest grid, the error its true per-element grid.  Returns
    (scale, zero_point) with ``reduce_dims`` kept as size-1 dims.  Large activations are searched
    on a subset of the batch (``max_elems``): calibration must stay seconds, not minutes.
    """
    x = x.detach().float()
    if x.dim() > 1 and 0 in reduce_dims and x.numel() > max_elems:  # search on a batch subset
        x = x[: max(1, max_elems * x.shape[0] // x.numel())]
    qmin_c, qmax_c = (_widest(v, x.dim(), reduce_dims, f) for v, f in ((qmin, torch.amin), (qmax, torch.amax)))
    xmin = x.amin(dim=reduce_dims, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=reduce_dims, keepdim=True).clamp(min=0)
    if not asym:  # symmetric grid (weights) or unsigned non-negative tensor
        if signed:
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
        if asym:
            s = ((hi - lo) / (qmax_c - qmin_c)).clamp(min=1e-8)
            z = torch.clamp(torch.round(qmin_c - lo / s), zp_range[0], zp_range[1])
        else:
            s = (hi / qmax_c).clamp(min=1e-8)
            z = torch.zeros_like(s)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        err = ((q - z) * s - x).pow(2).mean(dim=reduce_dims, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _widest(v, ndim: int, dims: tuple[int, ...], reduce):
    """A grid limit broadcast against an ``ndim``-d tensor, reduced over ``dims`` (ints pass through):
    each group's candidate grid."""
    if not torch.is_tensor(v):
        return v
    v = v.reshape((1,) * (ndim - v.dim()) + tuple(v.shape))
    dims = tuple(d for d in dims if v.shape[d] > 1)
    return reduce(v, dim=dims, keepdim=True) if dims else v


class _LsqFakeQuant(torch.autograd.Function):
    """Fused LSQ/LSQ+ fake-quant: the same function and STE gradients as composing
    ``round_ste(clamp(x / s + z))`` from primitives, in a handful of ops instead of ~20
    autograd nodes (fake-quant dominated the CPU step time).

    ``s`` and ``zp`` are broadcastable views; ``z = clamp(round(zp), zp_range)`` is an integer, so
    the forward is computed as the exported graph computes it, ``s * clip(round(x/s), qmin - z,
    qmax - z)`` -- adding ``z`` in float first would round differently at a few float ties.
    ``qmin``/``qmax``/``zlo``/``zhi`` and the gradient scale ``g`` are ints/floats or tensors
    broadcast per group (bits per group).  Gradients (LSQ+, clip before rounding), with
    ``v = x/s`` and ``in = qmin - z <= v <= qmax - z``::

        dx  = in
        ds  = g * (q - v * in)                # in range: round(v) - v ; clipped: bound - z
        dzp = g * (-s) * (not in) * [zp inside zp_range]
        dqmin = s * [v < qmin - z],  dqmax = s * [v > qmax - z]   (only when the bounds need a
                                              gradient: learned bit-widths, train.mixedbits)
    """

    @staticmethod
    def _codes(x, s, zp, qmin, qmax, zlo, zhi):
        v = x / s
        if zp is None:
            return v, qmin, qmax
        z = torch.clamp(torch.round(zp), zlo, zhi)
        return v, qmin - z, qmax - z

    @staticmethod
    def forward(ctx, x, s, zp, qmin, qmax, g, zlo, zhi):
        v, lo, hi = _LsqFakeQuant._codes(x, s, zp, qmin, qmax, zlo, zhi)
        ctx.save_for_backward(x, s, zp)
        ctx.consts = (qmin, qmax, g, zlo, zhi)
        return torch.clamp(v, lo, hi).round_() * s

    @staticmethod
    def backward(ctx, grad):
        x, s, zp = ctx.saved_tensors
        qmin, qmax, g, zlo, zhi = ctx.consts
        v, lo, hi = _LsqFakeQuant._codes(x, s, zp, qmin, qmax, zlo, zhi)
        inside = (v >= lo) & (v <= hi)
        q = torch.clamp(v, lo, hi).round_()
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_zp = None
        per_elem = torch.is_tensor(g)  # per-group LSQ scale: apply before summing into s's groups
        if ctx.needs_input_grad[1]:
            ds = grad * torch.where(inside, q - v, q)
            grad_s = (ds * g).sum_to_size(s.shape) if per_elem else ds.sum_to_size(s.shape) * g
        if zp is not None and ctx.needs_input_grad[2]:
            dz = grad * (~inside) * (-g) if per_elem else grad * (~inside)
            grad_zp = dz.sum_to_size(zp.shape) * (1.0 if per_elem else -g) * s.detach()
            grad_zp = grad_zp * ((zp >= zlo) & (zp <= zhi))
        grad_lo = (grad * (v < lo) * s).sum_to_size(qmin.shape) if ctx.needs_input_grad[3] else None
        grad_hi = (grad * (v > hi) * s).sum_to_size(qmax.shape) if ctx.needs_input_grad[4] else None
        return grad_x, grad_s, grad_zp, grad_lo, grad_hi, None, None, None


def lsq_fake_quant(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None, qmin, qmax, g,
                   zp_range: tuple = (0, 0)) -> torch.Tensor:
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s`` with LSQ+ gradients (see _LsqFakeQuant).
    Bounds and ``g`` may be tensors broadcast per group."""
    return _LsqFakeQuant.apply(x, s, zp, qmin, qmax, g, zp_range[0], zp_range[1])


def _grid_limits(widths: list[int], signed: bool, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """(qmin, qmax, zlo, zhi) float tensors of ``shape`` for per-index bit-widths ``widths``."""
    lims = [qformat.qrange(b, signed) + qformat.zero_point_range(b, signed) for b in widths]
    t = torch.tensor(lims, dtype=torch.float32)
    return tuple(t[:, i].reshape(shape) for i in range(4))


class _GridMixin:
    """Integer grid of a quantizer: ints for one width, per-group buffers for bits per group."""

    def _set_grid(self, widths: list[int] | None, shape: tuple[int, ...]) -> None:
        if widths is None:
            self.qmin, self.qmax = qformat.qrange(self.bits, self.signed)
            self.zp_range = qformat.zero_point_range(self.bits, self.signed)
            return
        qmin, qmax, zlo, zhi = _grid_limits(widths, self.signed, shape)
        for name, t in (("grid_qmin", qmin), ("grid_qmax", qmax), ("grid_zlo", zlo), ("grid_zhi", zhi)):
            self.register_buffer(name, t, persistent=False)  # derived from the config: not in checkpoints

    @property
    def mixed(self) -> bool:
        return isinstance(self.bits, tuple)

    def grid(self) -> tuple:
        """(qmin, qmax, zlo, zhi): ints, or tensors broadcast per group."""
        if not self.mixed:
            return self.qmin, self.qmax, self.zp_range[0], self.zp_range[1]
        return self.grid_qmin, self.grid_qmax, self.grid_zlo, self.grid_zhi


class WeightQuantizer(_GridMixin, nn.Module):
    """Symmetric LSQ weight quantizer, one learned step per output channel (row).

    ``bits`` is an int, or one width per group of ``group_size`` rows (``group_axis=-2``, e.g.
    the rows of one head in qkv) or columns (``group_axis=-1``, e.g. the W_O columns that read
    one head; ``in_features`` needed).  Gradient scale ``g = 1 / sqrt(numel * Qp)`` as in LSQ
    (numel of the whole weight, ``Qp`` of each element's group).

    VVTQ's module-dependent quantization (``grad_norm="l1"``): a *module* is ``module_rows``
    consecutive rows (the q, k or v rows of one head in qkv; the whole weight by default), and
    each scale's gradient is multiplied by ``1 / sqrt(Qp * ||w_m||_1)`` of its module instead.
    ``scale_per="module"`` ties the rows of a module to one learned step (stored per row after
    convert, so the exported format does not change).
    """

    signed = True

    def __init__(self, bits, out_channels: int, init: str = "mse", group_axis: int | None = None,
                 group_size: int | None = None, in_features: int | None = None, module_rows: int | None = None,
                 grad_norm: str = "lsq", scale_per: str = "row") -> None:
        super().__init__()
        try:
            self.bits, self.group_axis, self.group_size = normalise_bits(bits, group_axis, group_size)
        except qformat.FormatError as e:
            raise ValueError(f"weight bits: {e}") from None
        widths = None
        if self.mixed:
            if self.group_axis not in (-1, -2) or (self.group_axis == -1 and not in_features):
                raise ValueError("weight bits per group run along rows (-2) or columns (-1, needs in_features)")
            extent = out_channels if self.group_axis == -2 else int(in_features)
            spec = qformat.TensorSpec("weight", True, self.bits, 1.0, group_axis=self.group_axis,
                                      group_size=self.group_size)
            widths = [int(b) for b in spec.bits_along(extent)]
        self._set_grid(widths, (-1, 1) if self.group_axis == -2 else (1, -1))
        self._set_modules(out_channels, module_rows, grad_norm, scale_per)
        self.init_method = init
        self.scale = nn.Parameter(torch.ones(out_channels if scale_per == "row" else self.n_modules, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _set_modules(self, out_channels: int, module_rows: int | None, grad_norm: str, scale_per: str) -> None:
        if grad_norm not in GRAD_NORMS or scale_per not in ("row", "module"):
            raise ValueError(f"grad_norm must be one of {GRAD_NORMS}, scale_per 'row' or 'module'")
        self.module_rows = int(module_rows or out_channels)
        if out_channels % self.module_rows:
            raise ValueError(f"{out_channels} rows do not split into modules of {module_rows} rows")
        self.n_modules = out_channels // self.module_rows
        self.grad_norm, self.scale_per = grad_norm, scale_per
        if scale_per == "module" and self.mixed and (self.group_axis != -2 or self.group_size % self.module_rows):
            raise ValueError("one scale per module needs bits per group of whole modules (rows)")

    def row_scale(self) -> torch.Tensor:
        """The step of every output row, ``[out, 1]`` (a module's rows share one with ``scale_per='module'``)."""
        if self.scale_per == "row":
            return self.scale
        return self.scale.repeat_interleave(self.module_rows, dim=0)

    def _by_module(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the weight) as ``[modules, elements]``."""
        return t.reshape(self.n_modules, -1)

    @torch.no_grad()
    def initialize(self, w: torch.Tensor) -> None:
        w2 = w.detach().reshape(w.shape[0], -1)
        qmin, qmax, _, _ = self.grid()
        if self.scale_per == "module":  # search one step per module over all of its rows
            qmin, qmax = (torch.broadcast_to(torch.as_tensor(v, dtype=w2.dtype), w2.shape) for v in (qmin, qmax))
            w2, qmin, qmax = self._by_module(w2), self._by_module(qmin), self._by_module(qmax)
        if self.init_method == "lsq":
            qp = torch.as_tensor(_widest(qmax, 2, (1,), torch.amax), dtype=torch.float32)
            s = 2 * w2.abs().mean(dim=1, keepdim=True) / torch.sqrt(qp)
        else:
            s, _ = mse_search(w2, (1,), qmin, qmax, True, False, (0, 0))
        self.scale.copy_(s.reshape(-1, 1).clamp(min=1e-8))
        self.initialized.fill_(True)

    def _scale_like(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s.reshape((w.shape[0],) + (1,) * (w.dim() - 1))

    def grad_factor(self, w: torch.Tensor):
        """The factor on each scale's gradient: LSQ ``1/sqrt(N * Qp)`` (a float, or a tensor with bits per
        group), or VVTQ ``1/sqrt(Qp * ||w_m||_1)`` per row of module m (a tensor broadcast against ``w``)."""
        qmax = self.grid()[1]
        if self.grad_norm == "lsq":
            return 1.0 / math.sqrt(w.numel() * self.qmax) if not self.mixed else torch.rsqrt(w.numel() * qmax)
        with torch.no_grad():
            l1 = self._by_module(w.detach().abs()).sum(dim=1).clamp(min=1e-12)
            l1 = self._scale_like(w, l1.repeat_interleave(self.module_rows))
            return torch.rsqrt(l1 * qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if needs_init(self):
            self.initialize(w)
        if self.mixed and w.dim() != 2:
            raise ValueError("weight bits per group are for Linear weights [N, K]")
        qmin, qmax, _, _ = self.grid()
        # clamp before rounding (LSQ): the bounds are integers, so the forward is the same, and
        # an in-range value that rounds onto a bound keeps its STE gradient
        return lsq_fake_quant(w, self._scale_like(w, self.row_scale()), None, qmin, qmax, self.grad_factor(w))

    @torch.no_grad()
    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """Frozen integer codes (int8) of ``w`` -- what convert() stores."""
        qmin, qmax, _, _ = self.grid()
        s = self._scale_like(w, self.row_scale())
        return torch.clamp(torch.round(w / s), qmin, qmax).to(torch.int8)

    def spec(self, ndim: int = 2) -> qformat.TensorSpec:
        """This quantizer as the format's record: one scale per output channel of an ``ndim``-d weight."""
        scale = self.row_scale().detach().float().cpu().numpy().reshape(-1)
        return qformat.TensorSpec("weight", True, self.bits, scale, scale_axis=-int(ndim), group_axis=self.group_axis,
                                  group_size=self.group_size)

    def extra_repr(self) -> str:
        per = f"per-channel={self.scale.shape[0]}" if self.scale_per == "row" else \
            f"per-module={self.n_modules}x{self.module_rows} rows"
        return f"bits={self.bits}, {per}" + (
            f", groups of {self.group_size} along axis {self.group_axis}" if self.mixed else "") + (
            f", grad_norm={self.grad_norm}" if self.grad_norm != "lsq" else "")


def coarsest_groups(bits):
    """``(widths, group_size)``: per-index widths as the fewest equal-size groups of one width
    (e.g. one width per head for the ``head_dim`` channels of each head); an int passes through."""
    if not isinstance(bits, tuple):
        return bits, 1
    n = len(bits)
    for size in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        blocks = [bits[i:i + size] for i in range(0, n, size)]
        if all(len(set(b)) == 1 for b in blocks):
            return tuple(b[0] for b in blocks), size
    return bits, 1


#: Scale (and group) axis of each activation grouping, counted from the end of the tensor.
GROUP_AXIS = {"tensor": None, "channel": -1, "head": -3}


class ActQuantizer(_GridMixin, nn.Module):
    """LSQ+ activation quantizer: learned step and integer zero-point (STE-rounded).

    ``signed=False`` is for non-negative tensors (softmax output): unsigned grid, z = 0.
    ``grouping``: 'tensor', 'channel' (last dim, size ``groups``) or 'head' (dim 1 of a
    [B, H, ...] tensor, size ``groups``).  ``bits`` is an int or one width per group (per-head
    bits need grouping 'head').  ``kind`` is the tensor kind the spec reports (qformat.TENSOR_KINDS).
    Initialised from the first batch it sees (MSE search over clipping ranges by default, or
    LSQ's 2·mean|x|/sqrt(Qp) rule).
    """

    def __init__(self, bits, signed: bool = True, grouping: str = "tensor", groups: int = 1,
                 init: str = "mse", kind: str = "act", grad_norm: str = "lsq") -> None:
        super().__init__()
        if grouping not in GROUPINGS or grad_norm not in GRAD_NORMS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, grad_norm one of {GRAD_NORMS}")
        self.grad_norm = grad_norm
        self.signed = signed
        self.grouping = grouping
        self.groups = groups if grouping != "tensor" else 1
        self.kind = kind
        try:
            self.bits, _, _ = normalise_bits(bits, GROUP_AXIS[grouping], 1)
        except qformat.FormatError as e:
            raise ValueError(f"activation bits: {e}") from None
        if self.mixed and len(self.bits) != self.groups:
            raise ValueError(f"activation bits per group need one width per {grouping} group "
                             f"({self.groups}), got {len(self.bits)}")
        shape = {"tensor": (), "channel": (groups,), "head": (groups, 1, 1)}[grouping]
        self._set_grid(list(self.bits) if self.mixed else None, shape)
        self.init_method = init
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

    def _view(self, p, x: torch.Tensor):
        if self.grouping == "head" and torch.is_tensor(p) and p.dim() > 0:
            return p.reshape((self.groups,) + (1,) * (x.dim() - 2))
        return p

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        dims = self._reduce_dims(x)
        qmin, qmax, zlo, zhi = (self._view(v, x) for v in self.grid())
        if self.init_method == "lsq":
            qp = torch.as_tensor(qmax, dtype=torch.float32).reshape(-1) if self.mixed else float(qmax)
            s = 2 * x.detach().abs().mean(dim=dims) / (torch.sqrt(qp) if self.mixed else math.sqrt(qp))
            z = torch.zeros_like(s)
        else:
            s, z = mse_search(x, dims, qmin, qmax, self.signed, self.signed, (zlo, zhi))
        self.scale.copy_(s.reshape(self.scale.shape).clamp(min=1e-8))
        self.zero_point.copy_(z.reshape(self.scale.shape))
        self.initialized.fill_(True)

    def integer_zero_point(self) -> torch.Tensor:
        """The zero-point as the exporter sees it: rounded, clamped into the INT8-safe range."""
        _, _, zlo, zhi = self.grid()
        return torch.clamp(torch.round(self.zero_point.detach()), zlo, zhi)

    def int_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-point-0 integer clip bounds ``(lo, hi)`` per group (qformat.int_bounds)."""
        qmin, qmax, _, _ = self.grid()
        z = self.integer_zero_point()
        return qmin - z, qmax - z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_init(self):
            self.initialize(x)
        if not torch.compiler.is_compiling() and bool(self.frozen):  # train.fastqat compiles training only
            # Exactly the exported graph: s * clip(round(x / s), qmin - z, qmax - z).
            lo, hi = self.int_bounds()
            s = self._view(self.scale, x)
            return torch.clamp(torch.round(x / s), self._view(lo, x), self._view(hi, x)) * s
        qmin, qmax, zlo, zhi = (self._view(v, x) for v in self.grid())
        zp = self._view(self.zero_point, x) if self.signed else None
        return lsq_fake_quant(x, self._view(self.scale, x), zp, qmin, qmax, self.grad_factor(x), (zlo, zhi))

    def grad_factor(self, x: torch.Tensor):
        """LSQ ``1/sqrt(N * Qp)`` with N the elements per group of one sample, or (``grad_norm="l1"``, VVTQ)
        ``1/sqrt(Qp * ||x_g||_1)`` with ``||x_g||_1`` the group's L1 norm per sample."""
        qmax = self._view(self.grid()[1], x)
        if self.grad_norm == "l1":
            with torch.no_grad():
                l1 = x.detach().abs().sum(dim=self._reduce_dims(x)) / (x.shape[0] if x.dim() > 1 else 1)
                return torch.rsqrt(self._view(l1.reshape(self.scale.shape).clamp(min=1e-12), x) * qmax)
        per_group = x[0].numel() / max(self.scale.numel(), 1) if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(per_group * qmax) if not self.mixed else torch.rsqrt(per_group * qmax)

    def spec(self) -> qformat.TensorSpec:
        """This (frozen) quantizer as the format's record."""
        axis = GROUP_AXIS[self.grouping]
        scale = self.scale.detach().float().cpu().numpy().reshape(-1)
        z = self.integer_zero_point().cpu().numpy().reshape(-1) if self.signed else np.zeros_like(scale)
        bits, size = coarsest_groups(self.bits)
        return qformat.TensorSpec(self.kind, self.signed, bits, scale, scale_axis=axis, zero_point=z,
                                  group_axis=axis, group_size=size)

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, grouping={self.grouping}x{self.groups}" + (
            f", grad_norm={self.grad_norm}" if self.grad_norm != "lsq" else "")
