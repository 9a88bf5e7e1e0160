"""IRM -- Q-ViT's Information Rectification Module.

q and k are normalised per token over the head dimension by their own mean and
variance, then a learnable affine (gamma, beta) lets training pick the distribution
whose quantized version keeps the most information (maximum entropy of the codes).
It is a LayerNorm over ``head_dim``, and lives in timm's ``Attention.q_norm`` /
``k_norm`` slots -- no forked attention block.  ``per_head=True`` gives every head its own
gamma/beta (the exporter can then fold per-head q/k scales into them).

IRM changes the function of a model prepared from FP weights: per-token normalisation
removes each query's and key's norm, which sets its attention temperature.  Measured on the
trained FP ``vit_fmnist`` (2,000 test images, 8-bit everything, before any QAT step):
87.9% -> 68.0% top-1 with IRM at gamma=1, beta=0; a least-squares gamma/beta fit to make
IRM(q) ≈ q was worse (63.1%), so the standard LayerNorm initialisation stays.  QAT has to
win the attention back, which is why IRM pays off only with enough QAT steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IRMNorm(nn.Module):
    """LayerNorm over the last dim of ``[B, H, N, head_dim]``, affine shared or per head."""

    def __init__(self, head_dim: int, num_heads: int = 1, per_head: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.per_head = per_head
        self.eps = eps
        shape = (num_heads, 1, head_dim) if per_head else (head_dim,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_head:
            return F.layer_norm(x, (self.head_dim,), self.weight, self.bias, self.eps)
        x = F.layer_norm(x, (self.head_dim,), None, None, self.eps)
        return x * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, per_head={self.per_head}, eps={self.eps}"
