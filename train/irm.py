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

Variants that try to keep the FP attention (``QuantConfig.irm_init`` / ``irm_blend_steps``):

* ``init="std"``: on its first forward (the calibration pass) gamma is set to the std of
  its input over ``head_dim``, averaged over tokens (per head when ``per_head``), so the
  normalised q and k have the FP model's typical norm and q·kᵀ its typical temperature;
* ``blend_steps=N``: the output is ``(1 - t)·x + t·IRM(x)`` with ``t = step / N`` counted in
  training-mode forwards, so QAT starts from the FP attention and IRM takes over by step N;
* an FP model trained with timm's ``qk_norm`` (``vit_fmnist_irm``): IRM takes over the trained
  LayerNorm's gamma, beta (:meth:`IRMNorm.inherit`), so nothing changes at prepare time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IRMNorm(nn.Module):
    """LayerNorm over the last dim of ``[B, H, N, head_dim]``, affine shared or per head."""

    def __init__(self, head_dim: int, num_heads: int = 1, per_head: bool = False, eps: float = 1e-6,
                 init: str = "ln", blend_steps: int = 0) -> None:
        super().__init__()
        if init not in ("ln", "std"):
            raise ValueError(f"IRMNorm init={init!r}: use 'ln' or 'std'")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.per_head = per_head
        self.eps = eps
        self.init = init
        self.blend_steps = int(blend_steps)
        shape = (num_heads, 1, head_dim) if per_head else (head_dim,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        # buffers only where a variant needs them: the default's state dict is unchanged
        if init == "std":
            self.register_buffer("data_initialized", torch.tensor(False))
        if self.blend_steps > 0:
            self.register_buffer("blend_step", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """gamma := std of ``x[B, H, N, d]`` over d, mean over tokens (per head if ``per_head``)."""
        std = x.float().var(dim=-1, unbiased=False).add(self.eps).sqrt()  # [B, H, N]
        per_head = std.transpose(0, 1).reshape(std.shape[1], -1).mean(dim=1)  # [H]
        if self.per_head:
            self.weight.copy_(per_head.view(-1, 1, 1).expand_as(self.weight))
        else:
            self.weight.fill_(float(per_head.mean()))
        self.data_initialized.fill_(True)

    @torch.no_grad()
    def inherit(self, norm: nn.LayerNorm) -> None:
        """Take over a trained LayerNorm over head_dim (timm's ``qk_norm``): same function."""
        if tuple(norm.normalized_shape) != (self.head_dim,) or norm.weight is None:
            raise ValueError(f"cannot inherit {norm}: IRM needs an affine LayerNorm over {self.head_dim}")
        self.eps = norm.eps
        self.weight.copy_(norm.weight.detach().expand_as(self.weight))
        self.bias.copy_((norm.bias.detach() if norm.bias is not None else torch.zeros_like(norm.weight))
                        .expand_as(self.bias))
        if self.init == "std":
            self.data_initialized.fill_(True)  # trained gamma beats a data-driven one

    def blend(self) -> float:
        """Weight t of IRM in the output: 1 unless blending in and not yet done."""
        if self.blend_steps <= 0:
            return 1.0
        return min(1.0, float(self.blend_step) / self.blend_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.init == "std" and not torch.compiler.is_compiling() and not bool(self.data_initialized):
            self.init_from(x)
        if not self.per_head:
            y = F.layer_norm(x, (self.head_dim,), self.weight, self.bias, self.eps)
        else:
            y = F.layer_norm(x, (self.head_dim,), None, None, self.eps) * self.weight + self.bias
        if self.blend_steps <= 0:
            return y
        if torch.compiler.is_compiling():  # train.fastqat: t as a tensor (a Python float would recompile per step)
            t = torch.clamp(self.blend_step / self.blend_steps, max=1.0)
            if self.training:
                self.blend_step += 1
            return torch.where(t >= 1.0, y, t * y + (1.0 - t) * x)
        t = self.blend()
        if self.training:
            self.blend_step += 1
        return y if t >= 1.0 else t * y + (1.0 - t) * x

    def extra_repr(self) -> str:
        extra = (f", init={self.init}" if self.init != "ln" else "") + \
                (f", blend_steps={self.blend_steps}" if self.blend_steps else "")
        return f"head_dim={self.head_dim}, per_head={self.per_head}, eps={self.eps}{extra}"
