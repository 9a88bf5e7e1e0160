"""Configs as dataclasses (torchao style): what to quantize and how, and how to distill.

A config is plain data: it is stored in every checkpoint's JSON so that export and
``load_converted`` rebuild exactly the quantized model that was trained.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qformat import FormatError, check_bits
from qformat.errors import UserError

METHODS = ("fp", "baseline", "irm", "dgd", "qvit")
DATASETS = ("fmnist", "imagefolder", "synthetic")
GRANULARITIES = ("deploy", "paper")
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


@dataclass
class QuantConfig:
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
    #: per-module overrides by wildcard pattern (ModelOpt-style), e.g.
    #: ``{"blocks.*.attn.qkv": {"w_bits": 3}, "blocks.0.*": {"a_bits": 8}}``; later patterns win
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.overrides = check_overrides(self.overrides)
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

    def bits_summary(self) -> dict[str, int | None]:
        return {"weight": self.w_bits, "act": self.a_bits, "qkv": self.q_bits, "attn": self.softmax_bits,
                "embed": self.embed_bits, "head": self.head_bits}

    @property
    def tag(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def for_method(cls, method: str, bits: int, **overrides: Any) -> QuantConfig | None:
        """Preset of the paper's ablation rows; ``fp`` returns None (no quantization)."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if method == "fp":
            return None
        irm = method in ("irm", "qvit")
        return cls(**{"w_bits": bits, "a_bits": bits, "irm": irm, **overrides})


@dataclass
class DistillConfig:
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
        d = asdict(self)
        d["dgd_on"] = list(self.dgd_on)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "dgd_on" in d:
            d["dgd_on"] = tuple(d["dgd_on"])
        return cls(**d)

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> DistillConfig | None:
        """``fp`` trains without a teacher (None). Every quantized row gets logit KD from the
        same FP teacher, so the ablation isolates IRM and DGD; ``dgd``/``qvit`` add DGD."""
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if method == "fp":
            return None
        return cls(**{"dgd": method in ("dgd", "qvit"), **overrides})


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
    if q and method not in ("irm", "qvit"):
        raise UserError(f"--irm-* flags change IRM: use them with --method irm or qvit, not {method}")
    if d and method not in ("dgd", "qvit"):
        raise UserError(f"--dgd-* flags change DGD: use them with --method dgd or qvit, not {method}")
    QuantConfig(**q)  # validate now (no torch import needed)
    DistillConfig(**d)
    return q, d
