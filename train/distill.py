"""Distillation from the full-precision teacher: logit KD and Q-ViT's DGD.

DGD (Distribution-Guided Distillation; the reference repository does not contain it,
so this follows the paper): for every layer l and head h, the patch-similarity matrix
G = q·qᵀ (N×N) is row-wise L2-normalised, for the student's *quantized* q and the
teacher's q, and pulled together with an L2 (Frobenius) distance; the same for k::

    L_DGD = Σ_l Σ_h ||G̃_t(q) - G̃_s(q)||₂ + ||G̃_t(k) - G̃_s(k)||₂       (batch mean)

By default (``DistillConfig.dgd_mean``) the sum is divided by the number of (l, h) pairs so
one ``dgd_weight`` fits models of any depth and width.

q and k are read with forward hooks on each attention block's modules -- the teacher's
``q_norm``/``k_norm`` (timm's slots, ``Identity`` in an FP model) and the student's
``q_quant``/``k_quant`` -- so neither model's forward is forked.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import DistillConfig
from .families import family_of


def similarity(x: torch.Tensor) -> torch.Tensor:
    """Row-normalised patch similarity ``G̃`` of ``x[B, H, N, d]`` -> ``[B, H, N, N]``."""
    g = x @ x.transpose(-2, -1)
    return F.normalize(g, p=2, dim=-1)


def dgd_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], mean: bool = False) -> torch.Tensor:
    """Σ over layers and heads of the Frobenius distance of similarity matrices, batch mean;
    ``mean=True`` divides by the number of (layer, head) pairs."""
    if len(teacher) != len(student):
        raise ValueError(f"DGD: teacher has {len(teacher)} recorded tensors, student {len(student)}")
    total = student[0].new_zeros(())
    pairs = 0
    for t, s in zip(teacher, student):
        d = similarity(t.float()) - similarity(s.float())
        total = total + d.flatten(2).norm(dim=-1).sum(dim=1).mean()
        pairs += s.shape[1]
    return total / max(pairs, 1) if mean else total


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(teacher_T || student_T) · T²."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def soft_kd_loss(student_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """KL(p || student) against stored teacher probabilities ``p`` (multi-crop KD, VVTQ Eq. 8 up to the
    constant entropy of p, so its value compares with :func:`kd_loss` at T = 1)."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), probs.float(), reduction="batchmean")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")]


class QKRecorder:
    """Collect per-layer q and k tensors (forward hooks) from every attention block."""

    def __init__(self, model: nn.Module) -> None:
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.handles = []
        for attn in _attention_modules(model):
            # quantized student: its quantized q/k; float model: timm's q_norm/k_norm slots
            q_attr, k_attr = ("q_quant", "k_quant") if hasattr(attn, "q_quant") else ("q_norm", "k_norm")
            self.handles.append(getattr(attn, q_attr).register_forward_hook(self._hook(self.q)))
            self.handles.append(getattr(attn, k_attr).register_forward_hook(self._hook(self.k)))

    @staticmethod
    def _hook(store: list[torch.Tensor]):
        def fn(_m, _inp, out):
            store.append(out)
        return fn

    def clear(self) -> None:
        self.q.clear()
        self.k.clear()

    def record_only(self, model: nn.Module, images: torch.Tensor) -> None:
        """Run ``model`` only as far as the last recorded tensor (the last block's k): when only DGD needs
        the teacher, the rest of that block, the final norm and the head are skipped.  Same q and k."""
        last = _attention_modules(model)[-1]
        slot = last.k_quant if hasattr(last, "k_quant") else last.k_norm

        def stop(_m, _inp, _out):
            raise _Recorded

        handle = slot.register_forward_hook(stop)  # after the recorder's own hook on that module
        try:
            model(images)
        except _Recorded:
            pass
        finally:
            handle.remove()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Recorded(Exception):
    """Raised by :meth:`QKRecorder.record_only` once the last q/k is recorded."""


def make_teacher(model: nn.Module) -> nn.Module:
    """Frozen full-precision copy of ``model`` (call before ``prepare``)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Distiller(nn.Module):
    """Student loss = ce·CE(y) + kd·KD(teacher logits, T) + dgd·DGD(q, k similarity)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher]  # a list keeps the teacher out of parameters()/state_dict()
        self.cfg = cfg
        self.label_smoothing = label_smoothing
        self._t_rec = self._s_rec = None
        if cfg.dgd:
            for model in (teacher, student):
                family_of(model).expose_qk(model)  # e.g. Swin: q_norm/k_norm slots on the float attention
            self._t_rec = QKRecorder(teacher)
            self._s_rec = QKRecorder(student)

    @property
    def teacher_recorder(self) -> QKRecorder | None:
        """The recorder of the teacher's q/k (DGD), None without DGD."""
        return self._t_rec

    def run_teacher(self, images: torch.Tensor, need_logits: bool = True) -> torch.Tensor | None:
        """The teacher's logits (``need_logits``) and its recorded q/k (DGD), under ``inference_mode`` (no
        autograd bookkeeping; on CUDA the trainer's autocast makes it bf16, on CPU it stays fp32).  Without
        logits (stored soft labels, or no KD) it stops after the last q/k DGD reads."""
        teacher = self.teacher[0]
        with torch.inference_mode():
            if need_logits:
                t_logits = teacher(images)
            elif self._t_rec is not None:
                self._t_rec.record_only(teacher, images)
        # an inference tensor may not be saved for a backward: one small copy leaves the losses free to use it
        return t_logits.clone() if need_logits else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``soft``: the teacher's stored probabilities for ``images`` (multi-crop KD, train/softlabels.py):
        KD reads them instead of running the teacher, which then runs only when DGD needs its q and k."""
        cfg = self.cfg
        parts: dict[str, float] = {}
        if self._s_rec is not None:
            self._s_rec.clear()
            self._t_rec.clear()
        logits = self.student(images)
        if isinstance(logits, tuple):  # distilled DeiT in train mode returns (cls, dist)
            logits = (logits[0] + logits[1]) / 2
        loss = cfg.ce_weight * F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        parts["ce"] = float(loss.detach())
        if cfg.kd or cfg.dgd:
            t_logits = self.run_teacher(images, need_logits=cfg.kd and soft is None)
            if cfg.kd:
                kd = cfg.kd_weight * (soft_kd_loss(logits, soft) if soft is not None else
                                      kd_loss(logits, t_logits, cfg.temperature))
                parts["kd"] = float(kd.detach())
                loss = loss + kd
            if cfg.dgd:
                dgd = logits.new_zeros(())
                if "q" in cfg.dgd_on:
                    dgd = dgd + dgd_loss(self._t_rec.q, self._s_rec.q, cfg.dgd_mean)
                if "k" in cfg.dgd_on:
                    dgd = dgd + dgd_loss(self._t_rec.k, self._s_rec.k, cfg.dgd_mean)
                dgd = cfg.dgd_weight * dgd
                parts["dgd"] = float(dgd.detach())
                loss = loss + dgd
                self._s_rec.clear()
                self._t_rec.clear()
        return loss, logits, parts
