"""Learned head-wise bit-widths under a BitOPs budget: differentiable Q-ViT (Z. Li et al.).

The ``LearnedBits`` part (train.methods; its handler in train.qat): ``prepare`` with ``QuantConfig.mixed``
swaps every quantizer for a learned-bit one (:func:`make_learnable`):

* each quantizer keeps a float bit-width per group, ``b~``; it quantizes with
  ``b = round(clamp(b~, 2, 8))`` and a straight-through estimator (:func:`bit_ste`).  ``b~``
  learns from the task loss through the clipping bounds (``qmax = 2^(b-1) - 1``: an element
  clipped at the top pulls ``b`` up by ``s * 2^(b-1) * ln 2``) and from the BitOPs penalty;
* head-wise groups: Q_i, K_i, V_i, A_i and the head output (the input of W_O) per head; the
  rows of W_Q, W_K, W_V per (q|k|v, head) and the columns of W_O per head; one width for every
  other Linear and its input (the GELU output is fc2's input), the patch embedding and the head;
* switchable scale: one learnable scale (and LSQ+ offset) per candidate width 2..8, all
  initialised by the MSE search on the calibration batch; only the current width's is used.
  W_O keeps one scale per output row (the contract stores one per row), chosen by its widest head;
* the softmax output is unsigned and capped at 7 bits, so every learned model fits INT8 Q/DQ
  (TensorRT has no UINT8).

:class:`BitOpsCounter` sums ``MACs x w_bits x a_bits`` over every quantized matmul (patch
embedding, qkv, QK^T, A.V, proj, fc1, fc2, head), with MACs measured once per architecture
(:func:`mac_profile`).  :class:`BitBudget` is the part's objective term:
``loss += eta * (max(BitOPs - c, 0) / c)^2`` with ``c`` the BitOPs of the uniform ``budget``-bit
model, i.e. the squared *relative* overshoot, so ``eta`` does not depend on the model's size; it
freezes the bits after ``search_ratio`` of the steps.  ``convert`` calls :func:`fix_bits`, which
replaces every learned quantizer by a plain one at its learned widths (bits per group), so
everything downstream reads ordinary :class:`qformat.SiteSpec` records.  :func:`allocation` /
:func:`write_report` describe the result (JSON, markdown, PNG).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import qformat
from qformat.errors import UserError

from .config import MixedBitsConfig, QuantConfig
from .families import family_of
from .quant import QuantWeightMixin, is_prepared, quantizable_sites, quantizers
from .quantizers import ActQuantizer, WeightQuantizer, lsq_fake_quant, mse_search, needs_init, round_ste

#: Candidate widths: one switchable scale each.
CANDIDATES = tuple(range(qformat.MIN_BITS, qformat.MAX_BITS + 1))
#: Widest learned softmax output: 8 unsigned bits need UINT8, which TensorRT lacks.
MAX_UNSIGNED_BITS = 7
#: Elements each of the 7 MSE searches of an activation sees (a batch subset): calibration stays
#: about as fast as one search on the default 2^18 elements.
INIT_ELEMS = 1 << 16


# ----------------------------------------------------------------------------- bit-widths

def bit_ste(b_tilde: torch.Tensor, lo: float = qformat.MIN_BITS, hi: float = qformat.MAX_BITS) -> torch.Tensor:
    """``round(clamp(b~, lo, hi))`` forward; gradient 1 inside ``[lo, hi]`` (straight-through)."""
    return round_ste(b_tilde.clamp(lo, hi))


class LearnedBits(nn.Module):
    """Float bit-widths ``b~`` of ``groups`` groups; after :meth:`freeze_` the widths are fixed."""

    def __init__(self, groups: int, init: float, hi: int = qformat.MAX_BITS) -> None:
        super().__init__()
        self.lo, self.hi = qformat.MIN_BITS, int(hi)
        self.value = nn.Parameter(torch.full((groups,), float(min(float(init), self.hi))))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_bits", torch.round(self.value.detach().clamp(self.lo, self.hi)))

    def forward(self) -> torch.Tensor:
        """The widths in use, float tensor ``[groups]`` of integers (STE to ``b~`` while searching)."""
        b = bit_ste(self.value, self.lo, self.hi)
        # frozen: the stored widths, zero gradient; b~ stays in the graph (DDP).  Branch-free, so a compiled
        # step (train.fastqat) keeps one graph when the search ends
        return torch.where(self.frozen, self.frozen_bits, b)

    @torch.no_grad()
    def ints(self) -> list[int]:
        return [int(v) for v in self().tolist()]

    @torch.no_grad()
    def freeze_(self) -> None:
        self.frozen_bits.copy_(torch.round(self.value.clamp(self.lo, self.hi)))
        self.frozen.fill_(True)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep ``b~`` inside ``[lo, hi]`` after an optimizer step (no dead zone beyond the clamp)."""
        self.value.clamp_(self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"groups={self.value.numel()}, range={self.lo}..{self.hi}"


def grid(b: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qmin, qmax)`` of width ``b``, differentiable in ``b``."""
    if signed:
        half = torch.pow(2.0, b - 1)
        return -half, half - 1
    return torch.zeros_like(b), torch.pow(2.0, b) - 1


_ZP = {s: torch.tensor([qformat.zero_point_range(b, s) for b in CANDIDATES], dtype=torch.float32)
       for s in (True, False)}


def _zp_limits(b: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = _ZP[signed].to(b.device)[(b.detach() - qformat.MIN_BITS).long()]
    return t[..., 0], t[..., 1]


def _pick(p: torch.Tensor, b: torch.Tensor, switchable: bool) -> torch.Tensor:
    """Row ``b - 2`` of a switchable ``[7, E, ...]`` parameter for each of its ``E`` entries (``b``: [E])."""
    if not switchable:
        return p[0]
    idx = (b.detach() - qformat.MIN_BITS).long()
    return p[idx, torch.arange(p.shape[1], device=p.device)]


def _as_bits(widths: list[int]) -> int | tuple[int, ...]:
    return widths[0] if len(set(widths)) == 1 else tuple(widths)


# ----------------------------------------------------------------------------- learned quantizers

class LearnedWeightQuantizer(WeightQuantizer):
    """LSQ weight quantizer whose widths are learned: one per group of ``group_size`` rows
    (``group_axis=-2``: W_Q/W_K/W_V per head), of columns (``-1``: W_O per head) or per layer;
    one scale per output row and candidate width (switchable) or per row (not).

    With VVTQ's module-dependent scales (``grad_norm="l1"``, modules of ``module_rows`` rows) each row's
    scale gradient is scaled by ``1/sqrt(Qp * ||w_m||_1)`` at its current width; :meth:`grid`,
    :meth:`row_scale` and ``integers`` give the current widths' grid, steps and codes (OBR, oscillation).
    """

    def __init__(self, out_channels: int, in_features: int, init_bits: float, switchable: bool, groups: int = 1,
                 group_axis: int | None = None, group_size: int | None = None, init: str = "mse",
                 module_rows: int | None = None, grad_norm: str = "lsq") -> None:
        nn.Module.__init__(self)
        self._set_modules(int(out_channels), module_rows, grad_norm, "row")
        self.out_channels, self.in_features = int(out_channels), int(in_features)
        self.group_axis, self.group_size = (group_axis, int(group_size)) if groups > 1 else (None, None)
        self.switchable, self.init_method = bool(switchable), init
        self.bit = LearnedBits(groups, init_bits)
        self.scale = nn.Parameter(torch.ones(len(CANDIDATES) if switchable else 1, out_channels, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def bits(self) -> int | tuple[int, ...]:
        return _as_bits(self.bit.ints())

    def unit_bits(self, b: torch.Tensor) -> torch.Tensor:
        """Widths broadcast against the weight: ``[N, 1]`` (row groups), ``[1, K]`` (columns) or ``[]``."""
        if self.group_axis == -2:
            return b.repeat_interleave(self.group_size)[: self.out_channels].reshape(-1, 1)
        if self.group_axis == -1:
            return b.repeat_interleave(self.group_size)[: self.in_features].reshape(1, -1)
        return b.reshape(())

    def current_scale(self, b: torch.Tensor) -> torch.Tensor:
        """The scale of each row ``[N, 1]`` at its current width (W_O: its widest head's)."""
        if not self.switchable:
            return self.scale[0]
        if self.group_axis == -2:
            return _pick(self.scale, self.unit_bits(b).reshape(-1), True)
        return _pick(self.scale, b.max().expand(self.out_channels), True)

    @torch.no_grad()
    def initialize(self, w: torch.Tensor) -> None:
        w2 = w.detach().reshape(w.shape[0], -1)
        widths = CANDIDATES if self.switchable else (max(self.bit.ints()),)
        for i, b in enumerate(widths):
            qmin, qmax = qformat.qrange(b, True)
            if self.init_method == "lsq":
                s = 2 * w2.abs().mean(dim=1, keepdim=True) / math.sqrt(qmax)
            else:
                s, _ = mse_search(w2, (1,), qmin, qmax, True, False, (0, 0))
            self.scale[i].copy_(s.reshape(-1, 1).clamp(min=1e-8))
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if needs_init(self):
            self.initialize(w)
        b = self.bit()
        qmin, qmax = grid(self.unit_bits(b), True)
        if self.grad_norm == "l1":
            with torch.no_grad():
                l1 = w.detach().abs().reshape(self.n_modules, -1).sum(dim=1).clamp(min=1e-12)
                g = torch.rsqrt(self._scale_like(w, l1.repeat_interleave(self.module_rows)) * qmax.detach())
        else:
            g = torch.rsqrt(w.numel() * qmax.detach())
        return lsq_fake_quant(w, self._scale_like(w, self.current_scale(b)), None, qmin, qmax, g)

    def grid(self) -> tuple:
        """(qmin, qmax, 0, 0) at the current widths, broadcast against the weight (no gradient to the bits)."""
        qmin, qmax = grid(self.unit_bits(self.bit().detach()), True)
        return qmin, qmax, 0, 0

    def row_scale(self) -> torch.Tensor:
        """The step of every row at its current width, ``[out, 1]``."""
        return self.current_scale(self.bit().detach())

    @torch.no_grad()
    def fixed(self) -> WeightQuantizer:
        """A plain quantizer at the current widths (bits per group) and scales: what convert freezes."""
        b = self.bit()
        q = WeightQuantizer(_as_bits([int(v) for v in b.tolist()]), self.out_channels, init=self.init_method,
                            group_axis=self.group_axis, group_size=self.group_size, in_features=self.in_features)
        q.scale.copy_(self.current_scale(b))
        q.initialized.fill_(True)
        return q.to(self.scale.device)

    def extra_repr(self) -> str:
        return f"learned bits={self.bits}, switchable={self.switchable}, rows={self.out_channels}" + (
            f", groups of {self.group_size} along axis {self.group_axis}" if self.group_axis else "")


class LearnedActQuantizer(ActQuantizer):
    """LSQ+ activation quantizer with learned widths and switchable scales / offsets.

    The scale layout is an ``ActQuantizer``'s (``grouping``/``groups``: tensor, per channel, per
    head); ``share`` consecutive channels share one learned scale (the head output: one per head
    of ``head_dim`` channels); ``bit_groups`` widths cover the scale entries in equal runs.
    """

    def __init__(self, signed: bool, grouping: str, groups: int, kind: str, init_bits: float, switchable: bool,
                 bit_groups: int = 1, share: int = 1, init: str = "mse", grad_norm: str = "lsq") -> None:
        nn.Module.__init__(self)
        self.signed, self.grouping, self.kind, self.init_method = signed, grouping, kind, init
        self.grad_norm = grad_norm
        self.groups = groups if grouping != "tensor" else 1
        self.share, self.switchable = int(share), bool(switchable)
        entries = self.groups // self.share
        if entries * self.share != self.groups or entries % bit_groups:
            raise ValueError(f"{self.groups} scale groups do not split into {bit_groups} bit groups of {share}")
        self.register_buffer("entry_group", torch.arange(entries) * bit_groups // entries, persistent=False)
        self.bit = LearnedBits(bit_groups, init_bits, hi=qformat.MAX_BITS if signed else MAX_UNSIGNED_BITS)
        n = len(CANDIDATES) if switchable else 1
        self.scale = nn.Parameter(torch.ones(n, entries))
        self.zero_point = nn.Parameter(torch.zeros(n, entries), requires_grad=signed)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @classmethod
    def like(cls, q: ActQuantizer, init_bits: float, switchable: bool, bit_groups: int = 1) -> LearnedActQuantizer:
        """The learned version of a prepared quantizer (same signedness, grouping and kind)."""
        return cls(q.signed, q.grouping, q.groups, q.kind, init_bits, switchable, bit_groups, init=q.init_method,
                   grad_norm=q.grad_norm)

    @property
    def bits(self) -> int | tuple[int, ...]:
        return _as_bits(self.bit.ints())

    def entry_bits(self, b: torch.Tensor) -> torch.Tensor:
        return b[self.entry_group]

    def _layout(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-entry values ``[E]`` expanded to the scale groups and shaped to broadcast against ``x``."""
        t = t.repeat_interleave(self.share) if self.share > 1 else t
        if self.grouping == "head":
            return t.reshape((self.groups,) + (1,) * (x.dim() - 2))
        return t.reshape(()) if self.grouping == "tensor" else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_init(self):
            self.initialize(x)
        be = self.entry_bits(self.bit())
        qmin, qmax = grid(be, self.signed)
        zlo, zhi = _zp_limits(be, self.signed)
        per_group = x[0].numel() / self.groups if x.dim() > 1 else x.numel()
        lay = (lambda t: self._layout(t, x))  # noqa: E731
        if self.grad_norm == "l1":  # VVTQ: 1/sqrt(Qp * ||x_g||_1) per sample
            with torch.no_grad():
                l1 = x.detach().abs().sum(dim=self._reduce_dims(x)) / (x.shape[0] if x.dim() > 1 else 1)
                g = torch.rsqrt(l1.clamp(min=1e-12).reshape(lay(qmax).shape) * lay(qmax).detach())
        else:
            g = torch.rsqrt(per_group * lay(qmax).detach())
        zp = lay(_pick(self.zero_point, be, self.switchable)) if self.signed else None
        return lsq_fake_quant(x, lay(_pick(self.scale, be, self.switchable)), zp, lay(qmin), lay(qmax), g,
                              (lay(zlo), lay(zhi)))

    def _entries_view(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``x`` with the scale entries on one axis, and the dims to reduce for each entry's statistics."""
        if self.grouping == "tensor":
            return x, tuple(range(x.dim()))
        if self.grouping == "head":
            return x, (0,) + tuple(range(2, x.dim()))
        xv = x.reshape(*x.shape[:-1], self.groups // self.share, self.share)
        return xv, tuple(d for d in range(xv.dim()) if d != xv.dim() - 2)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        xv, dims = self._entries_view(x.detach())
        widths = CANDIDATES if self.switchable else (max(self.bit.ints()),)
        for i, b in enumerate(widths):
            b = min(b, self.bit.hi)
            qmin, qmax = qformat.qrange(b, self.signed)
            if self.init_method == "lsq":
                s, z = 2 * xv.abs().mean(dim=dims) / math.sqrt(qmax), torch.zeros(())
            else:
                s, z = mse_search(xv, dims, qmin, qmax, self.signed, self.signed,
                                   qformat.zero_point_range(b, self.signed), max_elems=INIT_ELEMS)
            self.scale[i].copy_(s.reshape(-1).clamp(min=1e-8))
            self.zero_point[i].copy_(z.reshape(-1).expand(self.scale.shape[1]))
        self.initialized.fill_(True)

    @torch.no_grad()
    def fixed(self) -> ActQuantizer:
        """A plain quantizer at the current widths (one per scale group) with the selected scales/offsets."""
        be = self.entry_bits(self.bit())
        one = torch.ones(1, device=be.device)
        widths = [int(v) for v in self._layout(be, one).reshape(-1).tolist()]
        q = ActQuantizer(_as_bits(widths), self.signed, self.grouping, self.groups, init=self.init_method,
                         kind=self.kind)
        q.scale.copy_(self._layout(_pick(self.scale, be, self.switchable), one).reshape(q.scale.shape))
        q.zero_point.copy_(self._layout(_pick(self.zero_point, be, self.switchable), one).reshape(q.scale.shape))
        q.initialized.fill_(True)
        return q.to(self.scale.device)

    def extra_repr(self) -> str:
        return (f"learned bits={self.bits}, {'signed' if self.signed else 'unsigned'}, grouping={self.grouping}x"
                f"{self.groups}" + (f" (one scale per {self.share})" if self.share > 1 else "") +
                f", switchable={self.switchable}")


LEARNED = (LearnedWeightQuantizer, LearnedActQuantizer)


# ----------------------------------------------------------------------------- prepare / convert

def _layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, quantized layer, role) of every QuantLinear / QuantConv2d, role from the family adapter."""

    for site in quantizable_sites(model, family_of(model)):
        if site.role != "attention" and isinstance(site.module, QuantWeightMixin):
            yield site.name, site.module, site.role


def _modules_of(q: WeightQuantizer) -> dict[str, Any]:
    """The VVTQ module layout and gradient norm of the fixed-bit quantizer a learned one replaces."""
    return {"module_rows": q.module_rows, "grad_norm": q.grad_norm}


def make_learnable(model: nn.Module, cfg: QuantConfig) -> None:
    """Swap the quantizers ``prepare`` attached for learned-bit ones (call before calibration)."""
    mcfg = cfg.mixed_bits
    fam = family_of(model)
    start, sw, init = mcfg.init_bits, mcfg.switchable, cfg.act_init
    done: set[int] = set()
    for _, attn in fam.attention_modules(model):
        three, heads, head_dim = fam.qkv_layout(attn)
        for slot in ("q_quant", "k_quant", "v_quant", "attn_quant"):
            setattr(attn, slot, LearnedActQuantizer.like(getattr(attn, slot), start, sw, bit_groups=heads))
        qkv, proj = attn.qkv, attn.proj
        qkv.w_quant = LearnedWeightQuantizer(qkv.out_features, qkv.in_features, start, sw, three * heads, -2,
                                             head_dim, cfg.weight_init, **_modules_of(qkv.w_quant))
        qkv.a_quant = LearnedActQuantizer.like(qkv.a_quant, start, sw)
        proj.w_quant = LearnedWeightQuantizer(proj.out_features, proj.in_features, start, sw, heads, -1, head_dim,
                                              cfg.weight_init, **_modules_of(proj.w_quant))
        share = head_dim if proj.a_quant.grouping == "tensor" else 1  # head output: one scale per head
        proj.a_quant = LearnedActQuantizer(True, "channel", proj.in_features, "act", start, sw, bit_groups=heads,
                                           share=share, init=init, grad_norm=proj.a_quant.grad_norm)
        done.update((id(qkv), id(proj)))
    fixed = {"embed": cfg.embed_bits, "head": cfg.head_bits}
    for _, m, role in _layer_modules(model):
        if id(m) in done:
            continue
        b = fixed.get(role, start)
        w = m.weight
        m.w_quant = LearnedWeightQuantizer(w.shape[0], w[0].numel(), b, sw, init=cfg.weight_init,
                                           **_modules_of(m.w_quant))
        m.a_quant = LearnedActQuantizer.like(m.a_quant, b, sw)


def learned_quantizers(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, quantizer) of every learned-bit quantizer."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LEARNED):
                yield parent, attr, child


def bit_widths(model: nn.Module) -> list[LearnedBits]:
    return [m for m in model.modules() if isinstance(m, LearnedBits)]


def has_learned_bits(model: nn.Module) -> bool:
    return bool(bit_widths(model))


def split_bit_group(groups: list[dict], model: nn.Module, bit_lr: float) -> list[dict]:
    """Move the float bit-widths out of the optimizer's groups into their own (lr ``bit_lr``, no decay)."""
    ids = {id(m.value) for m in bit_widths(model)}
    if not ids:
        return groups
    bits = [p for g in groups for p in g["params"] if id(p) in ids]
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    return [g for g in groups if g["params"]] + [{"params": bits, "lr": bit_lr, "weight_decay": 0.0, "name": "bits"}]


@torch.no_grad()
def freeze_bits(model: nn.Module) -> None:
    """Search over: every width stays where it is for the rest of training."""
    for m in bit_widths(model):
        m.freeze_()


def fit_to_budget(model: nn.Module, counter: BitOpsCounter, budget: float) -> list[tuple[str, int, int]]:
    """Greedy repair of a frozen allocation over its budget: while the BitOPs exceed ``budget``, lower by one
    bit one of the widest widths left -- among those, the one whose step down saves the most BitOPs (the
    gradient of the BitOPs in the frozen widths, exact for a one-bit step because every width enters the count
    linearly) -- then recount.  Widest first keeps the repair spread out: lowering by saving alone would take
    the largest layer down to its minimum before touching any other.  Returns the steps taken as (bit-width
    module, group, new width); [] when the allocation already fits.  No loss is estimated."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, LearnedBits)}
    mods = [m for m in bit_widths(model) if bool(m.frozen)]
    taken: list[tuple[str, int, int]] = []
    try:
        for m in mods:
            m.frozen_bits.requires_grad_(True)
        while float(counter.totals()["bitops"]) > budget:
            where = _widest_costliest(mods, counter)
            if where is None:  # every width at its minimum: the budget is below the smallest model
                break
            m, i = where
            with torch.no_grad():
                m.frozen_bits[i] -= 1
            taken.append((names.get(id(m), "?"), i, int(m.frozen_bits[i])))
    finally:
        for m in mods:
            m.frozen_bits.requires_grad_(False)
    return taken


def _widest_costliest(mods: list, counter: BitOpsCounter) -> tuple | None:
    """(module, index) of the next one-bit step: the widest width above its minimum that saves BitOPs, the
    largest saving among equally wide ones; None when no step saves anything."""
    grads = torch.autograd.grad(counter.totals()["bitops"], [m.frozen_bits for m in mods], allow_unused=True)
    best, where = (0.0, 0.0), None
    for m, g in zip(mods, grads):
        if g is None:
            continue
        for i, (w, gi) in enumerate(zip(m.frozen_bits.detach().reshape(-1).tolist(), g.reshape(-1).tolist())):
            if w > float(m.lo) and gi > 0.0 and (w, gi) > best:
                best, where = (w, gi), (m, i)
    return where


def bits_frozen(model: nn.Module) -> bool:
    return all(bool(m.frozen) for m in bit_widths(model))


@torch.no_grad()
def fix_bits(model: nn.Module) -> None:
    """Replace every learned quantizer by a plain one at its learned widths (``convert`` calls this
    first); the allocation is kept as ``model.qvit_allocation`` (the sidecar lists it)."""
    if not has_learned_bits(model):
        return
    model.qvit_allocation = allocation(model)
    for parent, attr, q in list(learned_quantizers(model)):
        setattr(parent, attr, q.fixed())


def check_allocation(model: nn.Module, sd: dict, path: str) -> None:
    """Refuse, in one line, a checkpoint whose learned allocation does not fit ``model``."""
    own = {n for n, m in model.named_modules() if isinstance(m, LearnedBits)}
    theirs = {k[: -len(".value")] for k in sd if k.endswith(".bit.value")}
    if theirs and not own:
        raise UserError(f"{path} holds a learned bit allocation but its quant config has no mixed search: "
                        "the metadata does not belong to these weights; re-create the checkpoint")
    for name in sorted(own):
        value, frozen = sd.get(name + ".value"), sd.get(name + ".frozen_bits")
        if value is None or frozen is None:
            raise UserError(f"{path} has no learned bit-widths for {name}: it was not trained with --method mp or "
                            "qvit-mp; re-create it or use its matching metadata")
        want = model.get_submodule(name).value.numel()
        if value.numel() != want or frozen.numel() != want:
            raise UserError(f"{path}: the learned allocation does not fit the model: {name} has {value.numel()} "
                            f"bit-width(s) there, the model has {want} (heads / row groups); check --model")
        f = frozen.float()
        if not (torch.isfinite(value).all() and torch.equal(f, f.round()) and f.min() >= qformat.MIN_BITS
                and f.max() <= qformat.MAX_BITS):
            raise UserError(f"{path}: {name} holds bit-widths {value.tolist()} / {frozen.tolist()} outside "
                            f"{qformat.MIN_BITS}..{qformat.MAX_BITS}: the allocation is corrupt; re-create it")


# ----------------------------------------------------------------------------- BitOPs

@torch.no_grad()
def mac_profile(model: nn.Module) -> dict[str, dict[str, Any]]:
    """How often each matmul runs per image, measured by one forward of a blank image with hooks:
    ``{"layers": {name: tokens or output positions}, "attention": {name: [windows, tokens]}}``.

    Stored as ``model.qvit_mac_profile``; ``prepare`` measures the float model, so no quantizer
    is touched.  A prepared model must be calibrated first (its quantizers would initialise on
    the blank image).
    """
    if getattr(model, "qvit_mac_profile", None) is not None:
        return model.qvit_mac_profile
    if is_prepared(model) and not all(bool(q.initialized) for _, q in quantizers(model)):
        raise UserError("BitOPs need the MAC profile of a calibrated model: calibrate (or load) it first")
    fam = family_of(model)
    prof: dict[str, dict[str, Any]] = {"layers": {}, "attention": {}}
    hooks = []

    def record(name: str, role: str):
        def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if role == "attention":
                prof["attention"][name] = [int(inp[0].shape[0]), int(inp[0].shape[1])]
            elif isinstance(m, nn.Conv2d):
                prof["layers"][name] = int(out.numel() // out.shape[1])
            else:
                prof["layers"][name] = int(inp[0].numel() // m.in_features)
        return hook

    for site in quantizable_sites(model, fam):
        hooks.append(site.module.register_forward_hook(record(site.name, site.role)))
    was = model.training
    p = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros((1,) + fam.input_size(model), device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    model.qvit_mac_profile = prof
    return prof


Fill = Optional[dict]  # role -> uniform width, or None for the model's own bits


def weight_bits(q: nn.Module, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Width of weight element ``[r, c]`` as ``rows[r] * cols[c]`` (one factor all ones): ``([n], [k])``."""
    dev = q.scale.device
    one_r, one_c = torch.ones(n, device=dev), torch.ones(k, device=dev)
    if isinstance(q, LearnedWeightQuantizer):
        b = q.unit_bits(q.bit())
        return (b.reshape(-1).expand(n), one_c) if q.group_axis != -1 else (one_r, b.reshape(-1))
    if not q.mixed:
        return one_r * q.bits, one_c
    per = q.spec().bits_along(n if q.group_axis == -2 else k)
    t = torch.as_tensor(per, dtype=torch.float32, device=dev)
    return (t, one_c) if q.group_axis == -2 else (one_r, t)


def act_bits(q: nn.Module, n: int) -> torch.Tensor:
    """Width of each of the ``n`` channels (Linear input) or heads (q, k, v, map) of a quantizer: ``[n]``."""
    if isinstance(q, LearnedActQuantizer):
        be = q.entry_bits(q.bit())
        b = be.repeat_interleave(q.share) if q.share > 1 else be
        return b.expand(n) if b.numel() == 1 else b
    bits = q.bits
    if isinstance(bits, tuple):
        return torch.as_tensor(bits, dtype=torch.float32, device=q.scale.device)
    return torch.full((n,), float(bits), device=q.scale.device)


@dataclass
class Term:
    """One quantized matmul: ``units`` repeats of ``rows x cols`` MACs per image (linear/conv: tokens x
    out x in; QK^T, A.V: windows x tokens x tokens per head of ``cols`` = head_dim)."""

    name: str
    kind: str  # "layer" | "qk" | "av"
    role: str  # "block" | "embed" | "head" (the uniform budget's width)
    left: nn.Module  # the weight quantizer, or q / the attention map
    right: nn.Module  # the input quantizer, or k / v
    units: float
    rows: int
    cols: int

    def sums(self, fill: Fill) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(BitOPs, MAC-weighted left bits, MAC-weighted right bits) of this matmul."""
        if self.kind == "layer":
            wr, wc = weight_bits(self.left, self.rows, self.cols)
            a = act_bits(self.right, self.cols)
            if fill is not None:
                f = fill[self.role]
                wr, wc, a = torch.full_like(wr, f), torch.ones_like(wc), torch.full_like(a, f)
            bitops = wr.sum() * (wc * a).sum()
            return self.units * bitops, self.units * wr.sum() * wc.sum(), self.units * self.rows * a.sum()
        x, y = act_bits(self.left, self.rows), act_bits(self.right, self.rows)
        if fill is not None:
            x, y = torch.full_like(x, fill[self.role]), torch.full_like(y, fill[self.role])
        m = self.units * self.cols
        return m * (x * y).sum(), m * x.sum(), m * y.sum()

    @property
    def macs(self) -> float:
        return self.units * self.rows * self.cols


def bitops_terms(model: nn.Module) -> list[Term]:
    """Every quantized matmul of a prepared (or converted) model, with its MACs per image."""
    prof = mac_profile(model)
    fam = family_of(model)
    terms = []
    for name, m, role in _layer_modules(model):
        w = m.weight_int if getattr(m, "converted", False) else m.weight
        terms.append(Term(name, "layer", role, m.w_quant, m.a_quant, prof["layers"][name], int(w.shape[0]),
                          int(w[0].numel())))
    for name, attn in fam.attention_modules(model):
        windows, tokens = prof["attention"][name]
        _, heads, head_dim = fam.qkv_layout(attn)
        units = windows * tokens * tokens
        terms.append(Term(f"{name} QK^T", "qk", "block", attn.q_quant, attn.k_quant, units, heads, head_dim))
        terms.append(Term(f"{name} A.V", "av", "block", attn.attn_quant, attn.v_quant, units, heads, head_dim))
    return terms


class BitOpsCounter:
    """BitOPs = sum over quantized matmuls of MACs x w_bits x a_bits (QK^T: q x k bits, A.V: map x v),
    differentiable in the learned widths.  ``fill`` evaluates a uniform model instead."""

    def __init__(self, model: nn.Module) -> None:
        self.terms = bitops_terms(model)
        self.macs = float(sum(t.macs for t in self.terms))
        cfg = QuantConfig.from_dict(model.qvit_quant_config)
        self.fixed_widths = {"embed": cfg.embed_bits, "head": cfg.head_bits}

    def totals(self, fill: Fill = None) -> dict[str, torch.Tensor]:
        parts = [t.sums(fill) for t in self.terms]
        return {"bitops": sum(p[0] for p in parts), "w_bits": sum(p[1] for p in parts) / self.macs,
                "a_bits": sum(p[2] for p in parts) / self.macs}

    def uniform(self, bits: float) -> float:
        """BitOPs of the uniform ``bits``-bit model (patch embedding and head at their own widths)."""
        fill = {"block": float(bits), **{k: float(v if v is not None else bits) for k, v in self.fixed_widths.items()}}
        return float(self.totals(fill)["bitops"])


def budget_penalty(bitops: torch.Tensor, budget: float, weight: float) -> torch.Tensor:
    """``weight * (max(BitOPs - budget, 0) / budget)^2``: the squared relative overshoot (size-free)."""
    return weight * F.relu(bitops / budget - 1.0) ** 2


def paper_penalty(bitops: torch.Tensor, budget: float, weight: float) -> torch.Tensor:
    """``weight * H(C - c)^2`` with C, c in GBitOPs (the paper's eq. 13-14): 10 % over a 0.27 G budget
    costs 7e-5 x weight here, 10 % over DeiT-S's ~70 G costs ~50 x weight."""
    return weight * F.relu((bitops - budget) / 1e9) ** 2


#: ``MixedBitsConfig.penalty`` -> the loss term (BitOPs, budget c, eta) -> penalty
BIT_PENALTIES = {"relative": budget_penalty, "paper": paper_penalty}


# ----------------------------------------------------------------------------- training

class BitBudget:
    """The ``LearnedBits`` part's objective term: the BitOPs penalty; freezes the bits after ``search_ratio`` of
    the steps (train.qat.Objective calls :meth:`set_progress` before every step and :meth:`add` after the
    base objective).

    ``parts`` gains the current BitOPs (G per image), its ratio to the budget, the MAC-weighted mean
    weight / activation bits and the penalty.
    """

    def __init__(self, model: nn.Module, log: Callable[[str], None] = print) -> None:
        self.model = model
        self.cfg: MixedBitsConfig = QuantConfig.from_dict(model.qvit_quant_config).mixed_bits
        self.counter = BitOpsCounter(model)
        self.budget = self.counter.uniform(self.cfg.budget)
        self.log = log
        self.step, self.total = 0, 0

    def freeze_step(self, total: int) -> int:
        """First step with frozen bits (sigma = 1: ``total``, but :meth:`set_progress` freezes the last step
        anyway, so that the final allocation is fitted to the budget)."""
        return total if self.cfg.search_ratio >= 1.0 else int(math.ceil(self.cfg.search_ratio * total))

    def set_progress(self, step: int, total: int) -> None:
        """Called by the trainer before every step (0-based)."""
        self.step, self.total = step, total
        model = self.model
        if step >= min(self.freeze_step(total), total - 1) and not bits_frozen(model):
            freeze_bits(model)
            self.log(f"mixed bits: search over at step {step}/{total} (sigma {self.cfg.search_ratio:g}); "
                     f"bits frozen: {self.note()}")
            lowered = fit_to_budget(model, self.counter, self.budget)
            if lowered:
                self.log(f"mixed bits: over budget, {len(lowered)} width(s) lowered one bit at a time, the costliest "
                         f"first: {self.note()}")

    @property
    def allocation_final(self) -> bool:
        """Whether checkpoints from now on carry the final allocation (bits frozen, or the last step)."""
        return bits_frozen(self.model) or self.step + 1 >= self.total

    def stats(self) -> dict[str, torch.Tensor]:
        t = self.counter.totals()
        t["penalty"] = BIT_PENALTIES[self.cfg.penalty](t["bitops"], self.budget, self.cfg.bitops_weight)
        return t

    @torch.no_grad()
    def note(self) -> str:
        """``bits w/a 4.21/4.63, BitOPs 0.271/0.268 G (1.01x budget)``."""
        t = self.counter.totals()
        return (f"bits w/a {float(t['w_bits']):.2f}/{float(t['a_bits']):.2f}, BitOPs {float(t['bitops']) / 1e9:.4g}/"
                f"{self.budget / 1e9:.4g} G ({float(t['bitops']) / self.budget:.2f}x budget)")

    def add(self, loss: torch.Tensor, parts: dict) -> torch.Tensor:
        """``loss`` + the penalty; the BitOPs figures into ``parts``."""
        t = self.stats()
        bitops = float(t["bitops"].detach())
        parts.update(bitops_g=bitops / 1e9, bitops_ratio=bitops / self.budget,
                     w_bits=float(t["w_bits"]), a_bits=float(t["a_bits"]), bitops_penalty=float(t["penalty"]))
        return loss + t["penalty"]

    def finish(self, out_dir: str, row: dict) -> None:
        """After the last epoch: the allocation report (JSON, markdown, PNG) in ``out_dir``."""
        paths = write_report(self.model, out_dir, {"final_epoch": row})
        self.log("mixed bits: {} -> {}".format(self.note(), ", ".join(paths)))


# ----------------------------------------------------------------------------- the allocation and its report

def _ints(t: torch.Tensor) -> list[int]:
    return [int(round(float(v))) for v in t.reshape(-1).tolist()]


def _layer_row(name: str, m: nn.Module, role: str) -> dict[str, Any]:
    w = m.weight_int if getattr(m, "converted", False) else m.weight
    wr, wc = weight_bits(m.w_quant, int(w.shape[0]), int(w[0].numel()))
    a = act_bits(m.a_quant, int(w[0].numel()) if w.dim() == 2 else 1)
    widths = sorted(set(v for v in _ints(torch.cat([wr, wc])) if v != 1))  # the all-ones factor is not a width
    return {"name": name, "role": role, "w": widths[0] if len(widths) == 1 else widths,
            "a": _ints(a)[0] if len(set(_ints(a))) == 1 else _ints(a)}


def _attention_row(name: str, attn: nn.Module, fam) -> dict[str, Any]:
    _, heads, head_dim = fam.qkv_layout(attn)
    qkv, proj = attn.qkv, attn.proj
    rows, cols = weight_bits(qkv.w_quant, qkv.out_features, qkv.in_features)
    per_head = _ints(rows[::head_dim] * cols[0])  # [q heads, k heads, v heads]; one factor is all ones
    rows, cols = weight_bits(proj.w_quant, proj.out_features, proj.in_features)
    cols = cols * rows[0]
    return {"name": name, "heads": heads,
            **{t: _ints(act_bits(getattr(attn, f"{t}_quant"), heads)) for t in ("q", "k", "v")},
            "attn": _ints(act_bits(attn.attn_quant, heads)),
            "head_out": _ints(act_bits(proj.a_quant, proj.in_features)[::head_dim]),
            "w_q": per_head[:heads], "w_k": per_head[heads:2 * heads], "w_v": per_head[2 * heads:],
            "w_o": _ints(cols[::head_dim]), "qkv_in": _ints(act_bits(qkv.a_quant, qkv.in_features))[0]}


@torch.no_grad()
def allocation(model: nn.Module) -> dict[str, Any]:
    """Bits of every quantized tensor -- per head in attention, per layer elsewhere -- and the BitOPs
    against the budget (a uniform model's table has one width everywhere)."""
    fam = family_of(model)
    cfg = QuantConfig.from_dict(model.qvit_quant_config)
    counter = BitOpsCounter(model)
    t = counter.totals()
    budget = cfg.mixed_bits.budget if cfg.mixed is not None else None
    ref = counter.uniform(budget if budget is not None else cfg.w_bits)
    attn_layers = {id(m) for _, a in fam.attention_modules(model) for m in (a.qkv, a.proj)}
    return {
        "model": getattr(model, "qvit_name", type(model).__name__), "budget_bits": budget,
        "bitops_g": float(t["bitops"]) / 1e9, "budget_bitops_g": ref / 1e9, "ratio": float(t["bitops"]) / ref,
        "mean_w_bits": float(t["w_bits"]), "mean_a_bits": float(t["a_bits"]), "macs_m": counter.macs / 1e6,
        "frozen": bits_frozen(model) if has_learned_bits(model) else True,
        "attention": [_attention_row(n, a, fam) for n, a in fam.attention_modules(model)],
        "layers": [_layer_row(n, m, r) for n, m, r in _layer_modules(model) if id(m) not in attn_layers],
    }


ATTN_ROWS = (("q", "Q"), ("k", "K"), ("v", "V"), ("attn", "A (softmax)"), ("head_out", "head output"),
             ("w_q", "W_Q rows"), ("w_k", "W_K rows"), ("w_v", "W_V rows"), ("w_o", "W_O columns"))


def _cell(v: Any) -> str:
    return "/".join(str(x) for x in v) if isinstance(v, list) else ("–" if v is None else str(v))


def markdown(alloc: dict[str, Any]) -> str:
    """The allocation as tables: per attention layer and head, then every other layer (W / input bits)."""
    budget = alloc["budget_bits"]
    lines = [f"# Bit allocation: {alloc['model']}" + (f", {budget:g}-bit BitOPs budget" if budget else ""), "",
             f"BitOPs {alloc['bitops_g']:.4g} G per image vs budget {alloc['budget_bitops_g']:.4g} G "
             f"(**{alloc['ratio']:.3f}x**); MAC-weighted mean bits: weights {alloc['mean_w_bits']:.2f}, "
             f"activations {alloc['mean_a_bits']:.2f} ({alloc['macs_m']:.3g} M MACs)", ""]
    att = alloc["attention"]
    if att:
        lines += ["## Attention, per head (h0/h1/...)", "",
                  "| layer | " + " | ".join(label for _, label in ATTN_ROWS) + " | qkv input |",
                  "|---|" + "---|" * (len(ATTN_ROWS) + 1)]
        lines += [f"| {a['name']} | " + " | ".join(_cell(a[k]) for k, _ in ATTN_ROWS) + f" | {a['qkv_in']} |"
                  for a in att]
    lines += ["", "## Other layers (the input of `fc2` is the GELU output)", "", "| layer | role | W | input |",
              "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['role']} | {_cell(r['w'])} | {_cell(r['a'])} |" for r in alloc["layers"]]
    return "\n".join(lines) + "\n"


def plot(alloc: dict[str, Any], path: str) -> None:
    """Heat maps (layer x head) of the head-wise widths, and the per-layer widths of the other Linears."""
    from train.plots import pyplot, save_png

    plt = pyplot()
    att, layers = alloc["attention"], alloc["layers"]
    hmax = max([a["heads"] for a in att] or [1])
    fig, axes = plt.subplots(2, 5, figsize=(17, 6.5), dpi=110)
    for ax, (key, label) in zip(axes.flat, ATTN_ROWS):
        grid_ = np.full((max(len(att), 1), hmax), np.nan)
        for i, a in enumerate(att):
            grid_[i, : len(a[key])] = a[key]
        ax.imshow(grid_, cmap="viridis", vmin=qformat.MIN_BITS, vmax=qformat.MAX_BITS, aspect="auto")
        for (i, j), v in np.ndenumerate(grid_):
            if not np.isnan(v):
                ax.text(j, i, int(v), ha="center", va="center", color="w" if v < 6 else "k", fontsize=9)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(hmax))
        ax.set_xlabel("head")
        ax.set_yticks(range(len(att)))
        ax.set_yticklabels([a["name"].replace(".attn", "") for a in att], fontsize=7)
    _plot_layers(axes.flat[-1], layers)
    budget = alloc["budget_bits"]
    fig.suptitle(f"{alloc['model']}: learned bits" + (f" under a {budget:g}-bit BitOPs budget" if budget else "") +
                 f" -- BitOPs {alloc['ratio']:.3f}x budget, mean bits w {alloc['mean_w_bits']:.2f} / "
                 f"a {alloc['mean_a_bits']:.2f}")
    fig.tight_layout()
    save_png(fig, path)


def _plot_layers(ax, layers: list[dict[str, Any]]) -> None:
    def width(v: Any) -> float:
        return float(np.mean(v)) if isinstance(v, list) else float(v)

    xs = np.arange(len(layers))
    ax.bar(xs - 0.2, [width(r["w"]) for r in layers], 0.4, label="weights")
    ax.bar(xs + 0.2, [width(r["a"]) for r in layers], 0.4, label="input (fc2: GELU out)")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["name"].replace("blocks.", "b").replace(".mlp", "") for r in layers], rotation=90,
                       fontsize=7)
    ax.set_ylim(0, qformat.MAX_BITS + 0.5)
    ax.set_title("other layers", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


REPORT_FILES = ("bits_report.json", "bits_report.md", "bits_allocation.png")


def write_report(model: nn.Module, out_dir: str, extra: dict[str, Any] | None = None) -> list[str]:
    """``bits_report.json`` (the allocation + ``extra``), ``bits_report.md`` and ``bits_allocation.png``."""
    from qformat.io import atomic_write, write_json

    alloc = getattr(model, "qvit_allocation", None) or allocation(model)
    paths = [os.path.join(out_dir, f) for f in REPORT_FILES]
    write_json(paths[0], dict(alloc, **(extra or {})))
    atomic_write(paths[1], markdown(alloc).encode())
    plot(alloc, paths[2])
    return paths

