"""Training methods as registered compositions of parts (torch-free: the command line lists them cheaply).

A **part** is one config type of a QAT recipe -- LSQ+ quantizers, IRM, learned bits, KD, OBR ... --
and a **method** (``--method``) is a registered tuple of parts::

    register_method("qvit", LsqQuant(), Irm(), Kd(), Dgd(), OscillationTracking(), help="IRM + DGD")

Each part writes its presets into the run's config records (:class:`train.config.QuantConfig`,
``DistillConfig``, ``VvtqConfig`` fields: :meth:`Part.preset`) and is recognised again from those
records (:meth:`Part.present`), so a checkpoint -- which stores only the records and the method's
name -- rebuilds its parts (:func:`parts_of`).  What a part does to a model (prepare, convert,
objective terms, per-step hooks) is its handler, registered in :mod:`train.qat`.  Parts run in
the order they are registered here (e.g. the MAC profile of the float model comes before IRM
changes it; the learned bits are fixed before the integers are frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from qformat.errors import UserError


@dataclass
class Presets:
    """The config fields a method's parts set; None: that record is absent (no quantization, no teacher,
    no VVTQ record)."""

    quant: Optional[dict] = None
    distill: Optional[dict] = None
    vvtq: Optional[dict] = None

    def q(self) -> dict:
        if self.quant is None:
            self.quant = {}
        return self.quant

    def d(self) -> dict:
        if self.distill is None:
            self.distill = {}
        return self.distill

    def v(self) -> dict:
        if self.vvtq is None:
            self.vvtq = {}
        return self.vvtq


class Part:
    """Base of the part config types.  ``requires``: parts a method listing this one must list too."""

    requires: ClassVar[tuple] = ()

    def preset(self, p: Presets, bits: int) -> None:
        """Write this part's config fields into ``p`` (``bits``: the run's nominal width)."""

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        """Whether a run with these config records (objects or None) has this part."""
        raise NotImplementedError


PARTS: list[type[Part]] = []


def register_part(cls: type[Part]) -> type[Part]:
    """Add a part type (a class decorator); handlers run in registration order."""
    if cls not in PARTS:
        PARTS.append(cls)
    return cls


def _on(rec: Any, name: str) -> bool:
    return rec is not None and bool(getattr(rec, name))


@register_part
@dataclass(frozen=True)
class LsqQuant(Part):
    """LSQ weight + LSQ+ activation quantizers at every site (the baseline; train/quant.py)."""

    def preset(self, p: Presets, bits: int) -> None:
        p.q().setdefault("irm", False)
        p.q().setdefault("module_scales", False)

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return quant is not None


def _mixed(p: Presets, bits: int) -> dict:
    return p.q().setdefault("mixed", {"budget": float(bits)})


@register_part
@dataclass(frozen=True)
class LearnedBits(Part):
    """Head-wise bit-widths learned under a BitOPs budget (differentiable Q-ViT; train/mixedbits.py)."""

    requires: ClassVar[tuple] = (LsqQuant,)

    def preset(self, p: Presets, bits: int) -> None:
        _mixed(p, bits).setdefault("switchable", False)

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return quant is not None and quant.mixed is not None


@register_part
@dataclass(frozen=True)
class SwitchableScales(Part):
    """One learned scale (and LSQ+ offset) per candidate width of a learned-bit quantizer."""

    requires: ClassVar[tuple] = (LearnedBits,)

    def preset(self, p: Presets, bits: int) -> None:
        _mixed(p, bits)["switchable"] = True

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return LearnedBits.present(quant, distill, vvtq) and bool(quant.mixed.get("switchable", True))


@register_part
@dataclass(frozen=True)
class Irm(Part):
    """Q-ViT's information rectification module in the q_norm/k_norm slots (train/irm.py)."""

    requires: ClassVar[tuple] = (LsqQuant,)

    def preset(self, p: Presets, bits: int) -> None:
        p.q()["irm"] = True

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return _on(quant, "irm")


@register_part
@dataclass(frozen=True)
class ModuleScales(Part):
    """VVTQ's module-dependent scale gradients 1/sqrt(Qp ||w_m||_1) (train/vvtq.py)."""

    requires: ClassVar[tuple] = (LsqQuant,)

    def preset(self, p: Presets, bits: int) -> None:
        p.q()["module_scales"] = True

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return _on(quant, "module_scales")


@register_part
@dataclass(frozen=True)
class Kd(Part):
    """Logit distillation from the FP teacher; ``labels=False`` drops the one-hot CE term (train/distill.py)."""

    labels: bool = True

    def preset(self, p: Presets, bits: int) -> None:
        p.d()["kd"] = True
        p.d().setdefault("dgd", False)
        if not self.labels:
            p.d()["ce_weight"] = 0.0

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return _on(distill, "kd")


@register_part
@dataclass(frozen=True)
class Dgd(Part):
    """Q-ViT's distribution-guided distillation of the q/k patch similarities (train/distill.py)."""

    def preset(self, p: Presets, bits: int) -> None:
        p.d()["dgd"] = True
        p.d().setdefault("kd", False)

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return _on(distill, "dgd")


@register_part
@dataclass(frozen=True)
class MulticropKd(Part):
    """KD from a stored soft-label set on its multi-crops, no label term (train/softlabels.py)."""

    store: Optional[str] = None
    requires: ClassVar[tuple] = (Kd,)

    def preset(self, p: Presets, bits: int) -> None:
        p.v()["multicrop_kd"] = self.store
        p.d()["ce_weight"] = 0.0

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return vvtq is not None and bool(vvtq.multicrop_kd)


@register_part
@dataclass(frozen=True)
class OscillationTracking(Part):
    """VVTQ's measures: weight-oscillation rate and SDAM, per epoch; a ``vvtq`` record (train/vvtq.py)."""

    requires: ClassVar[tuple] = (LsqQuant,)

    def preset(self, p: Presets, bits: int) -> None:
        p.v()

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return quant is not None and vvtq is not None


@register_part
@dataclass(frozen=True)
class Obr(Part):
    """VVTQ's oscillation-aware bin regularisation, lambda raised along a cosine (train/vvtq.py)."""

    requires: ClassVar[tuple] = (LsqQuant, OscillationTracking)

    def preset(self, p: Presets, bits: int) -> None:
        p.v()["obr"] = True

    @classmethod
    def present(cls, quant: Any, distill: Any, vvtq: Any) -> bool:
        return _on(vvtq, "obr")


def parts_of(quant: Any = None, distill: Any = None, vvtq: Any = None) -> tuple[type[Part], ...]:
    """The part types of a run with these config records (QuantConfig / DistillConfig / VvtqConfig
    objects or None), in registration order: what a checkpoint's records rebuild."""
    return tuple(p for p in PARTS if p.present(quant, distill, vvtq))


# ----------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    """A ``--method``: a name, its parts and a one-line description for ``--help``."""

    name: str
    parts: tuple[Part, ...] = field(default_factory=tuple)
    help: str = ""

    def has(self, part: type[Part]) -> bool:
        return any(isinstance(p, part) for p in self.parts)

    def presets(self, bits: int) -> Presets:
        """The config fields of this method's parts at nominal width ``bits``."""
        p = Presets()
        for part in self.parts:
            part.preset(p, bits)
        return p


METHODS: dict[str, Method] = {}


def register_method(name: str, *parts: Part, help: str = "", replace: bool = False) -> Method:
    """Register ``--method name`` as the composition ``parts``; refuses a part whose ``requires`` is missing."""
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered")
    for part in parts:
        if not isinstance(part, Part) or type(part) not in PARTS:
            raise ValueError(f"method {name!r}: {part!r} is not a registered part (train.methods.register_part)")
        missing = [r.__name__ for r in part.requires if not any(isinstance(q, r) for q in parts)]
        if missing:
            raise ValueError(f"method {name!r}: {type(part).__name__} needs {', '.join(missing)} too")
    METHODS[name] = Method(name, tuple(parts), help)
    return METHODS[name]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def methods_with(part: type[Part]) -> tuple[str, ...]:
    """The registered methods that list ``part`` (for error messages: "use it with --method ...")."""
    return tuple(n for n, m in METHODS.items() if m.has(part))


register_method("fp", help="full precision, no quantization")
register_method("baseline", LsqQuant(), Kd(), OscillationTracking(), help="LSQ+ QAT with logit KD, no IRM/DGD")
register_method("irm", LsqQuant(), Irm(), Kd(), OscillationTracking(), help="baseline + IRM")
register_method("dgd", LsqQuant(), Kd(), Dgd(), OscillationTracking(), help="baseline + DGD")
register_method("qvit", LsqQuant(), Irm(), Kd(), Dgd(), OscillationTracking(), help="Q-ViT: IRM + DGD")
register_method("mp", LsqQuant(), LearnedBits(), SwitchableScales(), Kd(),
                help="learned head-wise bits under a BitOPs budget (differentiable Q-ViT)")
register_method("qvit-mp", LsqQuant(), LearnedBits(), SwitchableScales(), Irm(), Kd(), Dgd(), help="mp + IRM + DGD")
register_method("vvtq", LsqQuant(), ModuleScales(), Kd(labels=False), OscillationTracking(), Obr(),
                help="VVTQ: KD only, module scales, OBR")
