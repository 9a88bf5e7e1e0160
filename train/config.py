"""Configs as dataclasses (torchao style): what to quantize and how, and how to distill.

A config is plain data: it is stored in every checkpoint's JSON so that export and
``load_converted`` rebuild exactly the quantized model that was trained.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qformat import MAX_BITS, MIN_BITS, FormatError, check_bits, formats
from qformat.errors import UserError

from .methods import Dgd, Irm, LearnedBits, get_method, methods_with

DATASETS = ("fmnist", "imagefolder", "synthetic")
GRANULARITIES = ("deploy", "paper")
#: weight-scale granularity: one learned step per output row, or one per module (VVTQ's "module": the
#: q, k or v rows of one head in qkv, the whole layer elsewhere), stored per row after convert
WEIGHT_SCALES = ("row", "module")
ACT_INITS = ("mse", "lsq")
IRM_INITS = ("ln", "std")
DGD_TENSORS = ("q", "k")

#: Per-module override keys (``QuantConfig.overrides``), by the kind of module a pattern matches.
#: Layers (block Linears, patch embedding, head): ``w_bits`` (an int, or a list of widths per group
#: of weight rows -- for qkv, a list of one width per head applies to that head's q, k and v rows),
#: ``w_group_axis`` ("out": rows, default; "in": columns), ``w_group_size`` (default: rows / widths),
#: ``a_bits`` (the layer input).  Attention modules: ``a_bits`` (default for all four),
#: ``qkv_bits``, ``q_bits``, ``k_bits``, ``v_bits``, ``attn_bits`` (int or one width per head).
LAYER_KEYS = ("w_bits", "a_bits", "w_group_size", "w_group_axis")
ATTENTION_KEYS = ("a_bits", "qkv_bits", "q_bits", "k_bits", "v_bits", "attn_bits")
_LIST_KEYS = ("w_bits", "qkv_bits", "q_bits", "k_bits", "v_bits", "attn_bits")


def resolve_bits(bits: int, w_bits: int | None, a_bits: int | None) -> tuple[int, int]:
    """(weight bits, activation bits) of a command line (``--bits`` and its ``--w-bits``/``--a-bits``
    overrides), validated by qformat."""
    try:
        return (check_bits(bits if w_bits is None else w_bits, "--bits" if w_bits is None else "--w-bits"),
                check_bits(bits if a_bits is None else a_bits, "--bits" if a_bits is None else "--a-bits"))
    except FormatError as e:
        raise UserError(str(e)) from None


def _check_override_value(where: str, key: str, value: Any) -> None:
    if key == "w_group_axis":
        if value not in ("out", "in"):
            raise UserError(f"{where}: w_group_axis must be \"out\" (rows) or \"in\" (columns), got {value!r}")
        return
    if key == "w_group_size":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: w_group_size must be a positive integer, got {value!r}")
        return
    values = value if isinstance(value, list) and key in _LIST_KEYS else [value]
    if not values:
        raise UserError(f"{where}: {key} must not be an empty list")
    for v in values:
        try:
            check_bits(v, key)
        except FormatError as e:
            hint = "" if key in _LIST_KEYS else " (one integer: only weights and attention tensors take a list)"
            raise UserError(f"{where}: {e}{hint}") from None


def check_overrides(overrides: Any) -> dict[str, dict[str, Any]]:
    """Validate the shape, keys and bit-widths of per-module overrides (not yet against a model)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise UserError("quant overrides must be a JSON object {\"<module pattern>\": {\"<key>\": <value>}}")
    known = LAYER_KEYS + tuple(k for k in ATTENTION_KEYS if k not in LAYER_KEYS)
    for pattern, keys in overrides.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise UserError(f"quant override pattern {pattern!r} must be a non-empty module-name pattern")
        if not isinstance(keys, dict) or not keys:
            raise UserError(f"quant override {pattern!r} must map to a non-empty object of settings")
        for key, value in keys.items():
            if key not in known:
                raise UserError(f"quant override {pattern!r}: unknown key {key!r}; use {', '.join(known)}")
            _check_override_value(f"quant override {pattern!r}", key, value)
    return {p: dict(k) for p, k in overrides.items()}


class _Record:
    """A config dataclass as stored in checkpoints: ``to_dict``, and ``from_dict`` that ignores keys this
    code does not know (fields added later take their defaults when an older checkpoint is read)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: the BitOPs penalties of the bit search (their formulas: train/mixedbits.py ``BIT_PENALTIES``)
BIT_PENALTY_NAMES = ("relative", "paper")


@dataclass
class MixedBitsConfig(_Record):
    """The learned-bit-width search (``--method mp|qvit-mp``): budget, schedule and penalty.

    ``budget``: the BitOPs of a uniform ``budget``-bit model (patch embedding and head at their
    own ``embed_bits``/``head_bits``), a number in [2, 8]; block quantizers start at
    ``budget + init_offset`` bits, the patch embedding and head at their configured bits (8).
    ``search_ratio`` (sigma): bits are learned for that fraction of the steps, then frozen.
    ``bitops_weight`` (eta) and ``penalty``: loss += eta * (max(BitOPs - c, 0) / c)^2 ("relative": the
    overshoot relative to the budget c, so one eta fits every model size) or eta * max(BitOPs - c, 0)^2 with
    BitOPs in G ("paper": the paper's eq. 13, whose strength depends on the model's size; train/mixedbits.py
    ``BIT_PENALTIES``).  ``switchable``: one scale (and LSQ+ offset)
    per candidate width 2..8, only the current width's used.  ``bit_lr``: peak lr of the float
    bit-widths (AdamW, no weight decay, same schedule as the weights).
    """

    budget: float = 4.0
    search_ratio: float = 0.9
    bitops_weight: float = 0.1
    switchable: bool = True
    bit_lr: float = 0.01
    init_offset: float = 1.0
    penalty: str = "relative"

    def __post_init__(self) -> None:
        checks = (("budget", MIN_BITS <= _num(self.budget) <= MAX_BITS,
                   f"a uniform-bit equivalent in [{MIN_BITS}, {MAX_BITS}]"),
                  ("search_ratio", 0.0 < _num(self.search_ratio) <= 1.0, "in (0, 1]"),
                  ("bitops_weight", _num(self.bitops_weight) >= 0.0, ">= 0"),
                  ("bit_lr", _num(self.bit_lr) > 0.0, "> 0"),
                  ("init_offset", _num(self.init_offset) >= 0.0, ">= 0"))
        for name, ok, rng in checks:
            if not ok:
                raise UserError(f"mixed-bit search: {name}={getattr(self, name)!r} must be {rng}")
        self.switchable = bool(self.switchable)
        if self.penalty not in BIT_PENALTY_NAMES:
            raise UserError(f"mixed-bit search: penalty={self.penalty!r} must be one of {', '.join(BIT_PENALTY_NAMES)}")

    @property
    def init_bits(self) -> float:
        """The float bit-width block quantizers start at (budget + 1 in the paper), capped at 8."""
        return min(float(MAX_BITS), float(self.budget) + float(self.init_offset))


#: Command-line attribute -> MixedBitsConfig field (None = not given on the command line).
MIXED_FLAGS = {"bitops_budget": "budget", "search_ratio": "search_ratio", "bitops_weight": "bitops_weight",
               "bit_lr": "bit_lr", "switchable_scale": "switchable", "bit_penalty": "penalty"}


def mixed_settings(args: Any) -> dict[str, Any] | None:
    """The MixedBitsConfig of a command line as a dict (``--bitops-budget`` defaults to ``--bits``), or
    None for a method that does not search; the search flags with such a method are refused."""
    given = [a for a in MIXED_FLAGS if getattr(args, a, None) is not None]
    method = getattr(args, "method", None)
    if method is None or not get_method(method).has(LearnedBits):
        if given:
            flag = "--no-switchable-scale" if given[0] == "switchable_scale" else "--" + given[0].replace("_", "-")
            raise UserError(f"{flag} belongs to the mixed-bit search: use it with --method "
                            f"{' or '.join(methods_with(LearnedBits))}, not {method}")
        return None
    if getattr(args, "w_bits", None) is not None or getattr(args, "a_bits", None) is not None:
        raise UserError(f"--w-bits/--a-bits fix the bits; --method {method} learns them under --bitops-budget")
    d = {MIXED_FLAGS[a]: getattr(args, a) for a in given}
    d.setdefault("budget", float(getattr(args, "bits", None) or MixedBitsConfig.budget))
    return MixedBitsConfig(**d).to_dict()


def nominal_bits(budget: float) -> int:
    """The integer width a mixed model's config carries as ``w_bits``/``a_bits`` (tags, labels): the
    budget rounded half up."""
    return int(min(MAX_BITS, max(MIN_BITS, math.floor(float(budget) + 0.5))))


def _num(v: Any) -> float:
    """``v`` as a finite float, NaN for anything else (so every range check fails on it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return float("nan")
    return float(v)


@dataclass
class QuantConfig(_Record):
    """Bit-widths per tensor kind and the quantizer choices of Q-ViT.

    ``granularity`` sets the activation-scale granularity:
    ``deploy`` -- per-tensor scales at Linear inputs, per-head for q/k/v and the attention map;
    ``paper`` -- per-input-channel scales at Linear inputs (the reference code), per-head for q/k/v/attn.
    ``attn_granularity``/``linear_granularity`` override either part ("tensor"|"head", "tensor"|"channel").
    """

    w_bits: int = 4
    a_bits: int = 4
    qkv_bits: int | None = None  # q, k, v before QK^T and A.V; None -> a_bits
    attn_bits: int | None = None  # softmax output (unsigned); None -> a_bits
    embed_bits: int | None = 8  # patch embedding weights + input; None -> float
    head_bits: int | None = 8  # classifier weights + input; None -> float
    irm: bool = True
    irm_per_head: bool = False
    #: IRM gamma at the start of QAT: "ln" = 1 (LayerNorm); "std" = the std of q (k) over head_dim,
    #: averaged over the calibration tokens (per head with ``irm_per_head``), so the normalised
    #: q, k keep the FP model's attention temperature on average
    irm_init: str = "ln"
    #: > 0: IRM enters gradually, (1 - t)·q + t·IRM(q) with t = min(1, step / irm_blend_steps)
    irm_blend_steps: int = 0
    granularity: str = "deploy"
    linear_granularity: str | None = None
    attn_granularity: str | None = None
    act_init: str = "mse"
    weight_init: str = "mse"
    #: VVTQ module-dependent scales (train/vvtq.py): each weight scale's gradient is multiplied by
    #: 1/sqrt(Qp * ||w_m||_1) of its module m (LSQ: 1/sqrt(N * Qp)); q/k/v/attention scales are per
    #: head with 1/sqrt(Qp * ||x_h||_1) (per sample)
    module_scales: bool = False
    weight_scale: str = "row"
    #: per-module overrides by wildcard pattern (ModelOpt-style), e.g.
    #: ``{"blocks.*.attn.qkv": {"w_bits": 3}, "blocks.0.*": {"a_bits": 8}}``; later patterns win
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: learned bit-widths under a BitOPs budget (MixedBitsConfig as a dict); None = the bits above
    mixed: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.overrides = check_overrides(self.overrides)
        self._check_mixed()
        try:
            for name in ("w_bits", "a_bits"):
                check_bits(getattr(self, name), name)
            for name in ("qkv_bits", "attn_bits", "embed_bits", "head_bits"):
                if getattr(self, name) is not None:
                    check_bits(getattr(self, name), name)
        except FormatError as e:
            raise UserError(str(e)) from None
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity={self.granularity!r}: use one of {', '.join(GRANULARITIES)}")
        if self.act_init not in ACT_INITS or self.weight_init not in ACT_INITS:
            raise UserError(f"act_init/weight_init must be one of {', '.join(ACT_INITS)}")
        if self.irm_init not in IRM_INITS:
            raise UserError(f"irm_init={self.irm_init!r}: use one of {', '.join(IRM_INITS)}")
        if not isinstance(self.irm_blend_steps, int) or self.irm_blend_steps < 0:
            raise UserError(f"irm_blend_steps={self.irm_blend_steps!r}: give an integer >= 0")
        if self.linear_granularity not in (None, "tensor", "channel"):
            raise UserError("linear_granularity must be 'tensor' or 'channel'")
        if self.attn_granularity not in (None, "tensor", "head"):
            raise UserError("attn_granularity must be 'tensor' or 'head'")
        if self.weight_scale not in WEIGHT_SCALES:
            raise UserError(f"weight_scale={self.weight_scale!r}: use one of {', '.join(WEIGHT_SCALES)}")
        if self.module_scales and self.attn_granularity == "tensor":
            raise UserError("module-dependent scales are per head for q, k, v: drop attn_granularity='tensor'")

    def _check_mixed(self) -> None:
        if self.mixed is None:
            return
        if isinstance(self.mixed, MixedBitsConfig):
            self.mixed = self.mixed.to_dict()
        if not isinstance(self.mixed, dict):
            raise UserError("mixed must be the settings of the mixed-bit search (a dict), or None")
        names = {f.name for f in fields(MixedBitsConfig)}
        unknown = sorted(set(self.mixed) - names)
        if unknown:
            raise UserError(f"mixed-bit search: unknown setting(s) {', '.join(unknown)}; "
                            f"use {', '.join(sorted(names))}")
        self.mixed = MixedBitsConfig(**self.mixed).to_dict()
        if self.overrides:
            raise UserError("the mixed-bit search learns every bit-width: drop --quant-override (it fixes them)")
        if self.attn_scale != "head":
            raise UserError("the mixed-bit search learns head-wise bits: it needs per-head scales "
                            "(attn_granularity 'head')")
        if self.weight_scale != "row":
            raise UserError("the mixed-bit search learns one weight step per row and width: drop weight_scale "
                            "'module' (--weight-scale module)")

    @property
    def mixed_bits(self) -> MixedBitsConfig | None:
        """The search settings as a dataclass (None for fixed bits)."""
        return MixedBitsConfig(**self.mixed) if self.mixed is not None else None

    # resolved views ------------------------------------------------------------
    @property
    def q_bits(self) -> int:
        return self.qkv_bits if self.qkv_bits is not None else self.a_bits

    @property
    def softmax_bits(self) -> int:
        return self.attn_bits if self.attn_bits is not None else self.a_bits

    @property
    def linear_scale(self) -> str:
        """Scale granularity at Linear inputs: 'tensor' or 'channel'."""
        if self.linear_granularity:
            return self.linear_granularity
        return "channel" if self.granularity == "paper" else "tensor"

    @property
    def attn_scale(self) -> str:
        """Scale granularity of q, k, v and the attention map: 'tensor' or 'head'."""
        return self.attn_granularity or "head"

    def module_overrides(self, name: str) -> dict[str, Any]:
        """The settings of every pattern that matches module ``name``, merged in order (later wins)."""
        out: dict[str, Any] = {}
        for pattern, keys in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                out.update(keys)
        return out

    def bits_summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"weight": self.w_bits, "act": self.a_bits, "qkv": self.q_bits, "attn": self.softmax_bits,
                             "embed": self.embed_bits, "head": self.head_bits}
        if self.mixed is not None:  # learned bits: weight/act are the budget's nominal width, per site in the specs
            d["budget"] = self.mixed["budget"]
        return d

    @property
    def tag(self) -> str:
        """``w4a4`` / ``mp3``: the one naming rule of qformat.formats (file names, labels, run names)."""
        return formats.bits_tag(self.bits_summary())

    @classmethod
    def for_method(cls, method: str, bits: int, **overrides: Any) -> QuantConfig | None:
        """The quantizers of a registered method (train.methods) at ``bits``; None for a method that does not
        quantize (``fp``)."""
        p = get_method(method).presets(bits)
        if p.quant is None:
            return None
        return cls(**{"w_bits": bits, "a_bits": bits, **p.quant, **overrides})


@dataclass
class DistillConfig(_Record):
    """Loss weights: ``ce_weight``·CE + ``kd_weight``·KD(T) + ``dgd_weight``·DGD (Q-ViT Eq. 10)."""

    kd: bool = True
    dgd: bool = True
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    dgd_weight: float = 1.0
    #: divide the paper's Σ_{l,h} by the number of (layer, head) pairs, so one weight fits DeiT-T..B
    #: (the raw sum is ~30 on vit_fmnist and ~140 on DeiT-T at init, swamping CE ~2)
    dgd_mean: bool = True
    dgd_on: tuple[str, ...] = field(default_factory=lambda: ("q", "k"))

    def __post_init__(self) -> None:
        for name in ("ce_weight", "kd_weight", "dgd_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"{name}={v!r}: give a finite number >= 0")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise UserError(f"temperature={self.temperature!r}: give a number > 0")
        self.dgd_on = tuple(self.dgd_on)
        if not self.dgd_on or set(self.dgd_on) - set(DGD_TENSORS) or len(set(self.dgd_on)) != len(self.dgd_on):
            raise UserError(f"dgd_on={','.join(self.dgd_on)!r}: use q, k or q,k")

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), dgd_on=list(self.dgd_on))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        return super().from_dict(dict(d, dgd_on=tuple(d["dgd_on"])) if "dgd_on" in d else d)

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> DistillConfig | None:
        """The distillation of a registered method's parts (train.methods: Kd, Dgd); None without a teacher
        (``fp``). Every quantized row gets logit KD from the same FP teacher, so the ablation isolates IRM
        and DGD; ``vvtq`` distils with KD alone (VVTQ Sec. 3.3.1: no one-hot label term)."""
        p = get_method(method).presets(1)
        if p.distill is None:
            return None
        return cls(**{**p.distill, **overrides})


@dataclass
class VvtqConfig(_Record):
    """VVTQ's training-side switches (Huang et al.; train/vvtq.py): oscillation-aware bin regularisation
    and multi-crop KD from a soft-label store.  Module-dependent scales shape the quantizers, so they
    live in :class:`QuantConfig` (``module_scales``, ``weight_scale``).  Stored as ``meta["vvtq"]``.

    ``obr_lambda`` is λ at the last step; λ is 0 until ``obr_start`` of the steps, then rises along
    half a cosine (the reference code's ``CosineTempDecay((0, 0.01), rel_decay_start=0.25)``).
    ``osc_momentum``/``osc_threshold``: the oscillation measure (VVTQ Eq. 11; a weight oscillates
    while the EMA of its direction reversals exceeds the threshold).
    """

    obr: bool = False
    obr_lambda: float = 0.01
    obr_start: float = 0.25
    multicrop_kd: str | None = None  # soft-label store folder (python -m train.softlabels)
    store_digest: str | None = None  # its manifest digest, recorded when training starts
    osc_momentum: float = 0.01
    osc_threshold: float = 0.005

    def __post_init__(self) -> None:
        checks = (("obr_lambda", 0.0 <= self.obr_lambda < float("inf")), ("obr_start", 0.0 <= self.obr_start < 1.0),
                  ("osc_momentum", 0.0 < self.osc_momentum <= 1.0), ("osc_threshold", 0.0 <= self.osc_threshold < 1.0))
        for name, ok in checks:
            if not ok:
                raise UserError(f"{name}={getattr(self, name)!r} is out of range (see python -m train --help)")

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> VvtqConfig | None:
        """The VVTQ record of a registered method's parts (train.methods: OscillationTracking, Obr, ...) plus
        the switches given in ``overrides`` (None values are not given); None when neither asks for one,
        or the method does not quantize (``fp``)."""
        m = get_method(method)
        p = m.presets(1)
        given = {k: v for k, v in overrides.items() if v is not None}
        if p.quant is None or (p.vvtq is None and not given):
            return None
        return cls(**{**(p.vvtq or {}), **given})


def variant_overrides(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(QuantConfig, DistillConfig) overrides from the ``--irm-*``/``--dgd-*`` flags of ``args``
    (attributes that are absent or None keep the ``--method`` preset), validated: an IRM flag
    needs a method with IRM (irm, qvit), a DGD flag one with DGD (dgd, qvit)."""
    q: dict[str, Any] = {}
    d: dict[str, Any] = {}
    if getattr(args, "irm_per_head", False):
        q["irm_per_head"] = True
    if getattr(args, "irm_init", None) is not None:
        q["irm_init"] = args.irm_init
    if getattr(args, "irm_blend_steps", None) is not None:
        q["irm_blend_steps"] = args.irm_blend_steps
    if getattr(args, "dgd_weight", None) is not None:
        d["dgd_weight"] = args.dgd_weight
    if getattr(args, "dgd_on", None) is not None:
        d["dgd_on"] = tuple(t.strip() for t in str(args.dgd_on).split(",") if t.strip())
    method = getattr(args, "method", "qvit")
    for given, part, what in ((q, Irm, "--irm-* flags change IRM"), (d, Dgd, "--dgd-* flags change DGD")):
        if given and not get_method(method).has(part):
            raise UserError(f"{what}: use them with --method {' or '.join(methods_with(part))}, not {method}")
    QuantConfig(**q)  # validate now (no torch import needed)
    DistillConfig(**d)
    return q, d
