"""Model surgery of the LSQ+ quantizers: the :class:`train.methods.LsqQuant` part's prepare and convert.

Use :func:`train.qat.prepare` (``quantize_``) / :func:`train.qat.convert`: they run every part of a
config (IRM, learned bits ... ) around this surgery, in order.  :func:`attach_quantizers` swaps
module classes in place (parameters and state-dict keys are kept; float type -> quantized class from
:data:`QUANT_MODULES`) and attaches quantizers, at the places the model's family adapter
(:mod:`train.families`) names:

* every block Linear (qkv, proj, fc1, fc2; Swin's patch-merging reduction): LSQ weight
  quantizer + LSQ+ quantizer on its input;
* q, k, v before QK^T and A.V (signed, per head by default) and the softmax output
  (unsigned); IRM (:func:`attach_irm`, the ``Irm`` part) in the ``q_norm``/``k_norm`` slots;
* patch embedding and classifier head at ``embed_bits``/``head_bits`` (8 by default).

Bits come from the config's defaults per tensor kind, then its per-module overrides by
wildcard pattern (``QuantConfig.overrides``), which may give a weight one width per group of
rows (the rows of one head in qkv) and q/k/v/attention one width per head.
LayerNorm, softmax, GELU, residual adds and Swin's relative position bias stay float.

:func:`freeze_quantizers` freezes the result into integer weights + per-channel scales and activation
quantizers with integer zero-points whose forward is exactly ``s * clip(round(x / s), lo, hi)``
-- the zero-point-0 Q/DQ the exported graph contains -- and attaches ``model.qvit_specs``: one
:class:`qformat.SiteSpec` per quantized site, the record every later stage reads.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import qformat
from qformat.errors import UserError

from .attention import add_slots
from .config import ATTENTION_KEYS, LAYER_KEYS, QuantConfig
from .families import FamilyAdapter, family_of
from .irm import IRMNorm
from .quantizers import ActQuantizer, WeightQuantizer
from .vvtq import module_scale_args

# ------------------------------------------------------------------------ quantized layers

class QuantWeightMixin:
    """Shared by QuantLinear/QuantConv2d: fake-quant while training, integers after convert.

    After :func:`convert` the float ``weight`` parameter is gone; the module holds
    ``weight_int`` (int8, b-bit values) and ``weight_scale`` (float32 ``[out]``), and
    ``w_quant``/``a_quant`` give the bits and the input's scale / integer bounds.
    """

    converted: bool = False

    def attach(self, plan: dict[str, Any], grouping: str, groups: int, cfg: QuantConfig) -> None:
        """Create the weight and input quantizers of ``plan`` (bits, weight groups, module rows)."""
        out = self.weight.shape[0]
        self.w_quant = WeightQuantizer(plan["w_bits"], out, init=cfg.weight_init, group_axis=plan.get("group_axis"),
                                       group_size=plan.get("group_size"), in_features=self.weight.shape[-1],
                                       **module_scale_args(cfg, plan.get("module_rows")))
        self.a_quant = ActQuantizer(plan["a_bits"], signed=True, grouping=grouping, groups=groups, init=cfg.act_init)
        self.converted = False

    def quant_weight(self) -> torch.Tensor:
        if self.converted:
            return self.dequantized_weight()
        return self.w_quant(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * scale`` in the scale's type (FP32; FP16 in a ``.half()`` copy, as a typed graph's DQ)."""
        s = self.weight_scale.reshape((-1,) + (1,) * (self.weight_int.dim() - 1))
        return self.weight_int.to(s.dtype) * s

    @torch.no_grad()
    def freeze(self) -> None:
        w = self.weight.detach()
        if not bool(self.w_quant.initialized):
            self.w_quant.initialize(w)
        self.register_buffer("weight_int", self.w_quant.integers(w))
        self.register_buffer("weight_scale", self.w_quant.row_scale().detach().reshape(-1).clone().float())
        del self.weight
        self.converted = True

    def spec(self, name: str) -> qformat.SiteSpec:
        """This converted layer as the format's record (integer weights, both quantizers)."""
        if not self.converted:
            raise UserError(f"{name} is not converted: call train.qat.convert(model) first")
        ws = self.w_quant.spec(self.weight_int.dim())
        bias = None if self.bias is None else self.bias.detach().float().cpu().numpy()
        op = "conv" if isinstance(self, nn.Conv2d) else "linear"
        return qformat.SiteSpec(name, op, self.a_quant.spec(), ws, self.weight_int.cpu().numpy(), bias,
                                self._geometry(name) if op == "conv" else None)


class QuantLinear(QuantWeightMixin, nn.Linear):
    """nn.Linear with a quantized weight and a quantized input."""

    def setup(self, site: Site, plan: dict[str, Any], cfg: QuantConfig, fam: FamilyAdapter) -> None:
        """Quantizers of a block Linear (qkv: a module is the q, k or v rows of one head), the head."""
        if site.attn is not None:
            plan["module_rows"] = fam.qkv_layout(site.attn)[2]
        channel = site.role == "block" and cfg.linear_scale == "channel"
        self.attach(plan, "channel" if channel else "tensor", self.in_features, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.quant_weight(), self.bias)


class QuantConv2d(QuantWeightMixin, nn.Conv2d):
    """Patch-embedding convolution with a quantized weight and input (8-bit by default)."""

    def setup(self, site: Site, plan: dict[str, Any], cfg: QuantConfig, fam: FamilyAdapter) -> None:
        self.attach(plan, "tensor", 1, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.a_quant(x), self.quant_weight(), self.bias)

    def _geometry(self, name: str) -> dict[str, Any]:
        if isinstance(self.padding, str):
            raise UserError(f"{name}: padding={self.padding!r} is not supported by the exporter (use explicit ints)")
        pads = [int(p) for p in self.padding]
        return {"kernel_shape": [int(k) for k in self.kernel_size], "strides": [int(v) for v in self.stride],
                "pads": pads + pads, "dilations": [int(v) for v in self.dilation], "group": int(self.groups)}


# ------------------------------------------------------------------------ the plan: which bits where

LAYER_ROLES = ("block", "embed", "head")


@dataclass
class Site:
    """A module ``prepare`` quantizes: an attention block or a layer (block Linear, patch embedding, head)."""

    name: str
    module: nn.Module
    role: str  # "attention" | "block" | "embed" | "head"
    attn: nn.Module | None = None  # the attention block whose qkv this Linear is


def quantizable_sites(model: nn.Module, fam: FamilyAdapter) -> list[Site]:
    """Every module ``prepare`` touches, named by its module path (what override patterns match)."""
    sites = [Site(n, m, "attention") for n, m in fam.attention_modules(model)]
    qkv_of = {id(s.module.qkv): s.module for s in sites}
    for prefix, root in fam.block_roots(model):
        for n, m in root.named_modules():
            if isinstance(m, nn.Linear):
                sites.append(Site(f"{prefix}.{n}", m, "block", qkv_of.get(id(m))))
    name, conv = fam.patch_embed(model)
    sites.append(Site(name, conv, "embed"))
    sites += [Site(n, m, "head") for n, m in fam.heads(model)]
    return sites


def _group_plan(site: Site, widths: list, ov: dict[str, Any]) -> dict[str, Any]:
    """Row (or column) groups of a weight given as a list of widths."""
    if site.role == "embed" or not isinstance(site.module, nn.Linear):
        raise UserError(f"{site.name}: w_bits per group are for Linear layers; give one integer")
    axis = ov.get("w_group_axis", "out")
    n = site.module.out_features if axis == "out" else site.module.in_features
    gs = ov.get("w_group_size")
    if gs is None and site.attn is not None and axis == "out" and len(widths) == site.attn.num_heads:
        heads = site.attn.num_heads  # one width per head: its q, k and v rows (qkv rows are [3, heads, head_dim])
        widths, gs = [widths[h] for _ in range(3) for h in range(heads)], n // (3 * heads)
    elif gs is None:
        if n % len(widths):
            raise UserError(f"{site.name}: {len(widths)} widths do not divide its {n} "
                            f"{'rows' if axis == 'out' else 'columns'}; add w_group_size")
        gs = n // len(widths)
    if -(-n // gs) != len(widths):
        raise UserError(f"{site.name}: {n} {'rows' if axis == 'out' else 'columns'} in groups of {gs} need "
                        f"{-(-n // gs)} widths, got {len(widths)}")
    return {"w_bits": tuple(widths), "group_axis": -2 if axis == "out" else -1, "group_size": gs}


def layer_plan(site: Site, cfg: QuantConfig) -> dict[str, Any] | None:
    """Bits of a layer (``w_bits``, ``a_bits`` and weight groups) after overrides; None keeps it float."""
    ov = cfg.module_overrides(site.name)
    w_default, a_default = {"block": (cfg.w_bits, cfg.a_bits), "embed": (cfg.embed_bits, cfg.embed_bits),
                            "head": (cfg.head_bits, cfg.head_bits)}[site.role]
    w, a = ov.get("w_bits", w_default), ov.get("a_bits", a_default)
    if w is None and a is None:
        return None
    if w is None or a is None:  # a float embed/head given one of the two: the other follows it
        w, a = (a if w is None else w), (max(w) if isinstance(w, list) else w) if a is None else a
    plan: dict[str, Any] = {"w_bits": w, "a_bits": a}
    if isinstance(w, list) and len(set(w)) > 1:
        plan.update(_group_plan(site, list(w), ov))
    elif isinstance(w, list):
        plan["w_bits"] = w[0]
    elif "w_group_size" in ov or "w_group_axis" in ov:
        raise UserError(f"{site.name}: w_group_size/w_group_axis need w_bits as a list of widths")
    return plan


def attention_plan(site: Site, cfg: QuantConfig) -> dict[str, Any]:
    """Bits of q, k, v (signed) and the attention map (unsigned), each an int or one width per head."""
    ov = cfg.module_overrides(site.name)
    a = ov.get("a_bits", cfg.a_bits)
    qkv = ov.get("qkv_bits", cfg.qkv_bits)
    attn = ov.get("attn_bits", cfg.attn_bits)
    plan = {t: ov.get(f"{t}_bits", qkv if qkv is not None else a) for t in ("q", "k", "v")}
    plan["attn"] = attn if attn is not None else a
    heads = site.module.num_heads
    for t, bits in plan.items():
        if isinstance(bits, list) and len(set(bits)) == 1:
            plan[t] = bits[0]
        elif isinstance(bits, list):
            if len(bits) != heads:
                raise UserError(f"{site.name}: {t} bits {bits} need one width per head ({heads})")
            if cfg.attn_scale != "head":
                raise UserError(f"{site.name}: per-head {t} bits need per-head scales (attn_granularity='head')")
            plan[t] = tuple(bits)
    return plan


def check_overrides(model: nn.Module, cfg: QuantConfig) -> None:
    """Refuse override patterns that match no module, keys that fit no matched module, and widths
    that do not fit the model -- before any training starts."""
    fam = family_of(model)
    fam.check(model)
    sites = quantizable_sites(model, fam)
    for pattern, keys in cfg.overrides.items():
        matched = [s for s in sites if fnmatch.fnmatchcase(s.name, pattern)]
        if not matched:
            examples = ", ".join(dict.fromkeys(s.name for s in sites[:2] + sites[-2:]))
            raise UserError(f"quant override pattern {pattern!r} matches no quantized module "
                            f"(names look like {examples})")
        roles = {s.role for s in matched}
        for key in keys:
            fits = (key in ATTENTION_KEYS and "attention" in roles) or (key in LAYER_KEYS and roles & set(LAYER_ROLES))
            if not fits:
                raise UserError(f"quant override {pattern!r}: {key} applies to none of the modules it matches "
                                f"({', '.join(s.name for s in matched[:3])}{' ...' if len(matched) > 3 else ''})")
    for s in sites:
        if s.role == "attention":
            attention_plan(s, cfg)
        else:
            layer_plan(s, cfg)


# ------------------------------------------------------------------------ prepare / convert

#: float module type -> its quantized class (like ModelOpt's QuantModuleRegistry): :func:`attach_quantizers`
#: swaps a layer's class in place and calls the class's ``setup(site, plan, cfg, family)``
QUANT_MODULES: dict[type, type] = {}


def register_quant_module(float_type: type, quant_type: type) -> None:
    """Quantize layers of exactly ``float_type`` as ``quant_type`` (a subclass with ``setup``)."""
    QUANT_MODULES[float_type] = quant_type


register_quant_module(nn.Linear, QuantLinear)
register_quant_module(nn.Conv2d, QuantConv2d)


def attach_irm(model: nn.Module, cfg: QuantConfig) -> None:
    """IRM in the ``q_norm``/``k_norm`` slots of every attention block (the ``Irm`` part; a trained
    timm ``qk_norm`` LayerNorm is inherited)."""
    for _, attn in family_of(model).attention_modules(model):
        heads = attn.num_heads
        head_dim = attn.qkv.out_features // (3 * heads)
        for slot in ("q_norm", "k_norm"):
            irm = IRMNorm(head_dim, heads, per_head=cfg.irm_per_head, init=cfg.irm_init,
                          blend_steps=cfg.irm_blend_steps)
            trained = getattr(attn, slot, None)
            if isinstance(trained, nn.LayerNorm):  # FP model trained with IRM (timm qk_norm)
                irm.inherit(trained)
            setattr(attn, slot, irm)


def _attach_attention(site: Site, cfg: QuantConfig, fam: FamilyAdapter) -> None:
    attn = site.module
    attn.__class__ = fam.quant_attention
    heads = attn.num_heads
    add_slots(attn)
    plan = attention_plan(site, cfg)
    kw = dict(grouping=cfg.attn_scale, groups=heads, init=cfg.act_init, kind="qkv",
              grad_norm="l1" if cfg.module_scales else "lsq")
    attn.q_quant = ActQuantizer(plan["q"], signed=True, **kw)
    attn.k_quant = ActQuantizer(plan["k"], signed=True, **kw)
    attn.v_quant = ActQuantizer(plan["v"], signed=True, **kw)
    attn.attn_quant = ActQuantizer(plan["attn"], signed=False, **dict(kw, kind="attn"))


def _attach_layer(site: Site, cfg: QuantConfig, fam: FamilyAdapter) -> None:
    plan = layer_plan(site, cfg)
    qclass = QUANT_MODULES.get(type(site.module))
    if plan is None or qclass is None:
        return
    m = site.module
    m.qvit_role = site.role  # what the variation measures (train/vvtq.py) look at: the "block" layers
    m.__class__ = qclass
    m.setup(site, plan, cfg, fam)


def is_prepared(model: nn.Module) -> bool:
    return getattr(model, "qvit_quant_config", None) is not None


def attach_quantizers(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """The LSQ+ quantizers of ``cfg`` in place (Q-ViT's fully quantized layout); records ``cfg`` on the
    model.  Only the ``LsqQuant`` part: :func:`train.qat.prepare` runs it with the config's other parts."""
    fam = family_of(model)
    for site in quantizable_sites(model, fam):
        if site.role == "attention":
            _attach_attention(site, cfg, fam)
        else:
            _attach_layer(site, cfg, fam)
    model.qvit_quant_config = cfg.to_dict()
    return model


def quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """All weight and activation quantizers with their qualified names."""
    for name, m in model.named_modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            yield name, m


def quant_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Quantizer steps and zero-points: they get their own lr / weight decay."""
    for _, m in quantizers(model):
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                yield p


def scale_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The quantizers' learned steps (the trainer keeps them positive)."""
    for _, m in quantizers(model):
        if m.scale.requires_grad:
            yield m.scale


def quant_report(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer (name, kind, bits, grouping): what tests count and users read."""
    rows = []
    for name, m in quantizers(model):
        kind = "weight" if isinstance(m, WeightQuantizer) else ("act" if m.signed else "act-unsigned")
        rows.append({"name": name, "kind": kind, "bits": m.bits,
                     "grouping": "channel" if kind == "weight" else m.grouping})
    return rows


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Initialise all quantizers from data: one forward of the concatenated ``batches``.

    Each quantizer initialises on the input it sees (already quantized upstream), so the
    ranges match what the quantized network produces.  Call before wrapping in DDP
    (DDP broadcasts rank 0's parameters).
    """
    x = torch.cat([b if torch.is_tensor(b) else b[0] for b in batches])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model(x.to(device))
    model.train(was_training)


@torch.no_grad()
def freeze_quantizers(model: nn.Module) -> nn.Module:
    """Freeze integer weights and integer zero-points; eval mode, no gradients; attach the site specs.
    The ``LsqQuant`` part's convert: :func:`train.qat.convert` runs the other parts' first."""
    for m in model.modules():
        if isinstance(m, QuantWeightMixin) and not m.converted:
            m.freeze()
        if isinstance(m, ActQuantizer):
            m.zero_point.copy_(m.integer_zero_point())
            m.frozen.fill_(True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.qvit_converted = True
    model.qvit_specs = site_specs(model)
    return model


def site_specs(model: nn.Module) -> list[qformat.SiteSpec]:
    """One :class:`qformat.SiteSpec` per quantized site of a converted model, in module order:
    the layers (with their input quantizers), then the standalone activation quantizers."""
    specs, owned = [], set()
    for name, m in model.named_modules():
        if isinstance(m, QuantWeightMixin):
            specs.append(_named_spec(name, lambda m=m, name=name: m.spec(name)))
            owned.add(id(m.a_quant))
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer) and id(m) not in owned:
            if not bool(m.frozen):
                raise UserError(f"{name} is not converted: call train.qat.convert(model) first")
            specs.append(_named_spec(name, lambda m=m, name=name: qformat.SiteSpec(name, "act", m.spec())))
    return specs


def _named_spec(name: str, build) -> qformat.SiteSpec:
    """``build()``, with a contract violation (e.g. a learned step that went negative in a run made
    before steps were kept positive) as one line naming the module."""
    try:
        return build()
    except qformat.FormatError as e:
        raise UserError(f"{name}: {e}: this checkpoint cannot be exported; retrain it (training now keeps every "
                        "learned step positive)") from None


def float_modules(model: nn.Module) -> list[str]:
    """Module paths of the LayerNorm and IRM computations (builders keep them in FP32)."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, IRMNorm))]
