"""Model surgery, torchao style: ``prepare(model, QuantConfig)`` -> train -> ``convert(model)``.

``prepare`` swaps module classes in place (parameters and state-dict keys are kept) and
attaches quantizers:

* every block Linear (qkv, proj, fc1, fc2; Swin's patch-merging reduction): LSQ weight
  quantizer + LSQ+ quantizer on its input;
* q, k, v before QK^T and A.V (signed, per head by default) and the softmax output
  (unsigned); IRM in the ``q_norm``/``k_norm`` slots when enabled;
* patch embedding and classifier head at ``embed_bits``/``head_bits`` (8 by default).

LayerNorm, softmax, GELU, residual adds and Swin's relative position bias stay float.

``convert`` freezes the result into the form the exporter reads (see :class:`QuantLinear`
and :class:`train.quantizers.ActQuantizer`): integer weights + per-channel scales, and
activation quantizers with integer zero-points whose forward is exactly
``s * clip(round(x / s), lo, hi)`` -- the zero-point-0 Q/DQ the exported graph contains.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from qformat.errors import UserError

from .config import QuantConfig
from .irm import IRMNorm
from .quantizers import ActQuantizer, WeightQuantizer

SUPPORTED = "timm VisionTransformer (DeiT-T/S/B, distilled) and SwinTransformer (Swin-T/S)"


# ------------------------------------------------------------------------ quantized layers

class _QuantWeightMixin:
    """Shared by QuantLinear/QuantConv2d: fake-quant while training, integers after convert.

    After :func:`convert` the float ``weight`` parameter is gone; the module holds
    ``weight_int`` (int8, b-bit values) and ``weight_scale`` (float32 ``[out]``), and
    ``w_quant``/``a_quant`` give the bits and the input's scale / integer bounds.
    """

    converted: bool = False

    def _attach(self, w_bits: int, a_bits: int, grouping: str, groups: int, cfg: QuantConfig) -> None:
        out = self.weight.shape[0]
        self.w_quant = WeightQuantizer(w_bits, out, init=cfg.weight_init)
        self.a_quant = ActQuantizer(a_bits, signed=True, grouping=grouping, groups=groups, init=cfg.act_init)
        self.converted = False

    def quant_weight(self) -> torch.Tensor:
        if self.converted:
            return self.dequantized_weight()
        return self.w_quant(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        s = self.weight_scale.reshape((-1,) + (1,) * (self.weight_int.dim() - 1))
        return self.weight_int.float() * s

    @torch.no_grad()
    def freeze(self) -> None:
        w = self.weight.detach()
        if not bool(self.w_quant.initialized):
            self.w_quant.initialize(w)
        self.register_buffer("weight_int", self.w_quant.integers(w))
        self.register_buffer("weight_scale", self.w_quant.scale.detach().reshape(-1).clone().float())
        del self.weight
        self.converted = True


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """nn.Linear with a quantized weight and a quantized input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.quant_weight(), self.bias)

    def lowbit_attrs(self) -> dict[str, Any]:
        """This converted layer as ``QvitLowBitLinear`` attributes (qformat.lowbit_attrs)."""
        import qformat

        aq = self.a_quant
        if not self.converted or aq.scale.numel() != 1:
            raise UserError(f"{self.__class__.__name__}: the low-bit kernel needs a converted layer with a "
                            "per-tensor input scale (granularity='deploy')")
        lo, hi = (int(t.reshape(-1)[0]) for t in aq.int_bounds())
        bias = None if self.bias is None else self.bias.detach().cpu().numpy()
        return qformat.lowbit_attrs(self.weight_int.cpu().numpy(), self.weight_scale.cpu().numpy(), bias,
                                    self.w_quant.bits, float(aq.scale), lo, hi, aq.bits)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """Patch-embedding convolution with a quantized weight and input (8-bit by default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.a_quant(x), self.quant_weight(), self.bias)


# ------------------------------------------------------------------------ quantized attention

def _attach_attention(attn: nn.Module, cfg: QuantConfig) -> None:
    heads = attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)
    if cfg.irm:
        for slot in ("q_norm", "k_norm"):
            irm = IRMNorm(head_dim, heads, per_head=cfg.irm_per_head, init=cfg.irm_init,
                          blend_steps=cfg.irm_blend_steps)
            trained = getattr(attn, slot, None)
            if isinstance(trained, nn.LayerNorm):  # FP model trained with IRM (timm qk_norm)
                irm.inherit(trained)
            setattr(attn, slot, irm)
    elif not hasattr(attn, "q_norm"):
        attn.q_norm, attn.k_norm = nn.Identity(), nn.Identity()
    grouping = cfg.attn_scale
    kw = dict(grouping=grouping, groups=heads, init=cfg.act_init)
    attn.q_quant = ActQuantizer(cfg.q_bits, signed=True, **kw)
    attn.k_quant = ActQuantizer(cfg.q_bits, signed=True, **kw)
    attn.v_quant = ActQuantizer(cfg.q_bits, signed=True, **kw)
    attn.attn_quant = ActQuantizer(cfg.softmax_bits, signed=False, **kw)


def quant_attention_core(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                         window_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit quantized attention (fused SDPA cannot quantize q, k, v or the map).

    ``attn.scale`` multiplies the integer-grid product q̂·k̂ᵀ, so QK^T stays a pure
    quantized MatMul in the exported graph.
    """
    b, n, _ = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = attn.q_quant(q), attn.k_quant(k), attn.v_quant(v)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if bias is not None:
        logits = logits + bias
    if window_mask is not None:
        nw = window_mask.shape[0]
        logits = logits.view(-1, nw, h, n, n) + window_mask.unsqueeze(1).unsqueeze(0)
        logits = logits.view(-1, h, n, n)
    a = attn.attn_quant(logits.softmax(dim=-1))
    a = attn.attn_drop(a)
    out = (a @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj_drop(attn.proj(out))


class QuantAttention(Attention):
    """timm ``Attention`` with quantized q/k/v/attention map; IRM sits in q_norm/k_norm."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention supports unmasked ViT attention only")
        return quant_attention_core(self, x, None)


class QuantWindowAttention(WindowAttention):
    """timm Swin ``WindowAttention`` quantized the same way; relative position bias stays float."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return quant_attention_core(self, x, self._get_rel_pos_bias(), mask)


# ------------------------------------------------------------------------ prepare / convert

def _swap_linear(lin: nn.Linear, w_bits: int, a_bits: int, grouping: str, cfg: QuantConfig) -> None:
    lin.__class__ = QuantLinear
    lin._attach(w_bits, a_bits, grouping, lin.in_features, cfg)


def _check_supported(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        for blk in model.blocks:
            attn = blk.attn
            if type(attn) is not Attention or getattr(attn, "gate", None) is not None or \
                    not isinstance(attn.norm, nn.Identity):
                raise UserError(f"unsupported attention variant {type(attn).__name__}: supported are {SUPPORTED}")
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    raise UserError(f"cannot quantize {type(model).__name__}: supported are {SUPPORTED}")


def is_prepared(model: nn.Module) -> bool:
    return getattr(model, "qvit_quant_config", None) is not None


def prepare(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Attach quantizers in place (Q-ViT's fully quantized layout) and return the model."""
    if is_prepared(model):
        raise UserError("model is already prepared for quantization")
    family = _check_supported(model)
    lin_grouping = "channel" if cfg.linear_scale == "channel" else "tensor"

    for module in list(model.modules()):
        if type(module) is Attention:
            module.__class__ = QuantAttention
            _attach_attention(module, cfg)
        elif isinstance(module, WindowAttention) and not isinstance(module, QuantWindowAttention):
            module.__class__ = QuantWindowAttention
            _attach_attention(module, cfg)

    blocks = model.blocks if family == "vit" else model.layers
    for module in blocks.modules():
        if type(module) is nn.Linear:
            _swap_linear(module, cfg.w_bits, cfg.a_bits, lin_grouping, cfg)

    if cfg.embed_bits is not None:
        conv = model.patch_embed.proj
        conv.__class__ = QuantConv2d
        conv._attach(cfg.embed_bits, cfg.embed_bits, "tensor", 1, cfg)
    if cfg.head_bits is not None:
        heads = [model.head.fc] if family == "swin" else [model.head, getattr(model, "head_dist", None)]
        for head in heads:
            if type(head) is nn.Linear:
                _swap_linear(head, cfg.head_bits, cfg.head_bits, "tensor", cfg)
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
def convert(model: nn.Module) -> nn.Module:
    """Freeze integer weights and integer zero-points; eval mode, no gradients."""
    if not is_prepared(model):
        raise UserError("convert() needs a prepared model: call prepare(model, QuantConfig) first")
    for m in model.modules():
        if isinstance(m, _QuantWeightMixin) and not m.converted:
            m.freeze()
        if isinstance(m, ActQuantizer):
            m.zero_point.copy_(m.integer_zero_point())
            m.frozen.fill_(True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.qvit_converted = True
    return model
