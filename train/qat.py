"""The QAT door, torchao style: ``prepare(model, cfg)`` (``quantize_``) -> train -> ``convert(model)``, with
one registered handler per part type (:mod:`train.methods`) for what that part contributes.

A handler (:class:`PartHandler`) may

* ``float_prepare`` -- change the float model before quantizers exist (IRM; the MAC profile of learned bits);
* ``prepare`` -- attach or replace quantizers (LSQ+ quantizers; learned-bit quantizers);
* ``convert`` -- freeze what it trained (run in reverse part order: learned bits are fixed before the
  LSQ+ surgery freezes integer weights);
* ``terms`` -- objective terms and per-step hooks for the trainer (BitOPs penalty + bit freezing, OBR,
  oscillation tracking), composed by :func:`objective`.

Every built-in handler is registered when this module is imported: importing the door is enough.
Parts that only set config fields (Kd, Dgd: terms of :class:`train.distill.Distiller`, which share one
teacher forward; ModuleScales, SwitchableScales: quantizer choices; MulticropKd: the trainer's data)
need no handler.  A new part registers with ``@register_part`` (train.methods) and
``@register_part_handler(ThePart)`` here or in its own module; a new method is ``register_method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from qformat.errors import UserError

from .config import DistillConfig, QuantConfig, VvtqConfig
from .methods import Irm, LearnedBits, LsqQuant, Obr, OscillationTracking, Part, parts_of
from .mixedbits import BitBudget, fix_bits, mac_profile, make_learnable
from .quant import attach_irm, attach_quantizers, check_overrides, freeze_quantizers, is_prepared
from .vvtq import ObrPenalty, OscillationMeter

Log = Callable[[str], None]


@dataclass
class QATConfig:
    """A run's config records; its parts (:attr:`parts`) are what the records hold (train.methods.parts_of)."""

    quant: Optional[QuantConfig]
    distill: Optional[DistillConfig] = None
    vvtq: Optional[VvtqConfig] = None

    @property
    def parts(self) -> tuple[type[Part], ...]:
        return parts_of(self.quant, self.distill, self.vvtq)

    @classmethod
    def for_method(cls, method: str, bits: int, **quant: Any) -> QATConfig:
        """The records of a registered method (train.methods) at ``bits``; ``quant``: QuantConfig overrides."""
        return cls(QuantConfig.for_method(method, bits, **quant), DistillConfig.for_method(method),
                   VvtqConfig.for_method(method))

    @classmethod
    def from_meta(cls, meta: dict) -> QATConfig:
        """The records of a checkpoint's metadata (``quant``, ``distill``, ``vvtq``; absent = None)."""
        rec = [c.from_dict(meta[k]) if meta.get(k) else None
               for k, c in (("quant", QuantConfig), ("distill", DistillConfig), ("vvtq", VvtqConfig))]
        return cls(*rec)


class PartHandler:
    """What one part type does to a model and to the training objective; every hook is optional."""

    def float_prepare(self, model: nn.Module, cfg: QuantConfig) -> None:
        """Before any quantizer is attached."""

    def prepare(self, model: nn.Module, cfg: QuantConfig) -> None:
        """Attach or replace quantizers (after the parts registered before this one)."""

    def convert(self, model: nn.Module) -> None:
        """Fix what the part trained (before the parts registered before this one)."""

    def terms(self, model: nn.Module, cfg: QATConfig, log: Log) -> list:
        """Objective terms / step hooks for :class:`Objective` (see there for the hook names)."""
        return []


HANDLERS: dict[type, PartHandler] = {}
_NONE = PartHandler()


def register_part_handler(part: type[Part]):
    """Class decorator: an instance of the decorated :class:`PartHandler` handles ``part``."""
    def deco(cls: type[PartHandler]) -> type[PartHandler]:
        HANDLERS[part] = cls()
        return cls
    return deco


def handler_for(part: type[Part]) -> PartHandler:
    return HANDLERS.get(part, _NONE)


def _quant(cfg: QuantConfig | QATConfig) -> QuantConfig:
    q = cfg.quant if isinstance(cfg, QATConfig) else cfg
    if q is None:
        raise UserError("prepare needs a quantizing config (this method trains in full precision)")
    return q


def prepare(model: nn.Module, cfg: QuantConfig | QATConfig) -> nn.Module:
    """Attach every part's quantizers in place (Q-ViT's fully quantized layout) and return the model."""
    q = _quant(cfg)
    if is_prepared(model):
        raise UserError("model is already prepared for quantization")
    check_overrides(model, q)
    parts = parts_of(q)
    for part in parts:
        handler_for(part).float_prepare(model, q)
    for part in parts:
        handler_for(part).prepare(model, q)
    return model


quantize_ = prepare  # torchao's name


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Freeze integer weights and integer zero-points; eval mode, no gradients (``model.qvit_specs``)."""
    if not is_prepared(model):
        raise UserError("convert() needs a prepared model: call train.qat.prepare(model, QuantConfig) first")
    for part in reversed(parts_of(QuantConfig.from_dict(model.qvit_quant_config))):
        handler_for(part).convert(model)
    return model


class Objective(nn.Module):
    """A base objective (``(images, labels, *extra) -> (loss, logits, parts)``: CE, or KD + DGD) plus the
    terms of a run's parts, and their hooks fanned out to every term that has them:

    ``add(loss, parts) -> loss`` (an objective term), ``set_progress(step, total)`` (before a step),
    ``begin_fit(step, total, resume_state)``, ``after_step()``, ``epoch_metrics() -> dict``,
    ``resume_state() -> dict`` (merged), ``note() -> str``, ``allocation_final`` (all must be),
    ``finish(out_dir, row)`` (rank 0, after the last epoch).
    """

    def __init__(self, base: nn.Module, terms: list) -> None:
        super().__init__()
        self.base = base
        self.terms = list(terms)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, *extra: Any):
        loss, logits, parts = self.base(images, labels, *extra)
        for t in self._with("add"):
            loss = t.add(loss, parts)
        return loss, logits, parts

    def _with(self, hook: str) -> list:
        return [t for t in self.terms if hasattr(t, hook)]

    def set_progress(self, step: int, total: int) -> None:
        for t in self._with("set_progress"):
            t.set_progress(step, total)

    def begin_fit(self, step: int, total: int, state: Optional[dict] = None) -> None:
        for t in self._with("begin_fit"):
            t.begin_fit(step, total, state)

    def after_step(self) -> None:
        for t in self._with("after_step"):
            t.after_step()

    def epoch_metrics(self) -> dict:
        out: dict = {}
        for t in self._with("epoch_metrics"):
            out.update(t.epoch_metrics())
        return out

    def resume_state(self) -> Optional[dict]:
        states = [t.resume_state() for t in self._with("resume_state")]
        return {k: v for s in states for k, v in s.items()} if states else None

    def note(self) -> str:
        return " | ".join(t.note() for t in self._with("note"))

    @property
    def allocation_final(self) -> bool:
        return all(t.allocation_final for t in self._with("allocation_final"))

    def finish(self, out_dir: str, row: dict) -> None:
        for t in self._with("finish"):
            t.finish(out_dir, row)


def objective(base: nn.Module, model: nn.Module, cfg: QATConfig, log: Log = print) -> nn.Module:
    """``base`` plus the terms of ``cfg``'s parts, in part order; ``base`` itself when no part adds one."""
    terms = [t for part in cfg.parts for t in handler_for(part).terms(model, cfg, log)]
    return Objective(base, terms) if terms else base


# ----------------------------------------------------------------------------- the built-in handlers

@register_part_handler(LsqQuant)
class LsqQuantHandler(PartHandler):
    def prepare(self, model: nn.Module, cfg: QuantConfig) -> None:
        attach_quantizers(model, cfg)

    def convert(self, model: nn.Module) -> None:
        freeze_quantizers(model)


@register_part_handler(LearnedBits)
class LearnedBitsHandler(PartHandler):
    def float_prepare(self, model: nn.Module, cfg: QuantConfig) -> None:
        mac_profile(model)  # the BitOPs counter needs the float model's MACs

    def prepare(self, model: nn.Module, cfg: QuantConfig) -> None:
        make_learnable(model, cfg)

    def convert(self, model: nn.Module) -> None:
        fix_bits(model)  # learned bit-widths -> plain quantizers at those widths

    def terms(self, model: nn.Module, cfg: QATConfig, log: Log) -> list:
        budget = BitBudget(model, log=log)
        log("mixed bits: budget {:g}-bit = {:.4g} GBitOPs per image; starting at {}".format(
            budget.cfg.budget, budget.budget / 1e9, budget.note()))
        return [budget]


@register_part_handler(Irm)
class IrmHandler(PartHandler):
    def float_prepare(self, model: nn.Module, cfg: QuantConfig) -> None:
        attach_irm(model, cfg)


@register_part_handler(OscillationTracking)
class OscillationTrackingHandler(PartHandler):
    def terms(self, model: nn.Module, cfg: QATConfig, log: Log) -> list:
        return [OscillationMeter(model, cfg.vvtq)]


@register_part_handler(Obr)
class ObrHandler(PartHandler):
    def terms(self, model: nn.Module, cfg: QATConfig, log: Log) -> list:
        return [ObrPenalty(model, cfg.vvtq)]
