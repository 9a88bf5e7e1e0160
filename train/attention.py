"""The one explicit attention forward, with a slot for everything QAT and distillation touch.

timm's fused attention (SDPA) cannot quantize q, k, v or the attention map, so quantized
models run :func:`attention_forward` instead.  Its slots are modules: ``q_norm``/``k_norm``
(timm's own, where IRM lives), ``q_quant``/``k_quant``/``v_quant`` and ``attn_quant`` (the
softmax output).  Empty slots are ``nn.Identity``, so the same forward serves a float Swin
teacher whose q and k DGD must read (:func:`add_slots`) and a quantized student.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention
from torch import nn

SLOTS = ("q_norm", "k_norm", "q_quant", "k_quant", "v_quant", "attn_quant")


def add_slots(attn: nn.Module) -> None:
    """Give every missing slot an ``nn.Identity``."""
    for name in SLOTS:
        if not hasattr(attn, name):
            setattr(attn, name, nn.Identity())


def attention_forward(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                      window_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention with explicit q/k/v/map slots.

    ``attn.scale`` multiplies the integer-grid product q̂·k̂ᵀ, so QKᵀ stays a pure quantized
    MatMul in the exported graph.  ``bias``: Swin's relative position bias; ``window_mask``: its
    shifted-window mask.
    """
    b, n, _ = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = attn.q_quant(q), attn.k_quant(k), attn.v_quant(v)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if bias is not None:
        logits = logits + bias
    if window_mask is not None:
        nw = window_mask.shape[0]
        logits = logits.view(-1, nw, h, n, n) + window_mask.unsqueeze(1).unsqueeze(0)
        logits = logits.view(-1, h, n, n)
    a = attn.attn_drop(attn.attn_quant(logits.softmax(dim=-1)))
    out = (a @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj_drop(attn.proj(out))


class QuantAttention(Attention):
    """timm ``Attention`` running :func:`attention_forward` (quantized q/k/v/map; IRM in q_norm/k_norm)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention supports unmasked ViT attention only")
        return attention_forward(self, x, None)


class QuantWindowAttention(WindowAttention):
    """timm Swin ``WindowAttention`` running :func:`attention_forward`; relative position bias stays float.

    Also the float teacher's class when DGD needs its q and k (identity quantizer slots).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return attention_forward(self, x, self._get_rel_pos_bias(), mask)
