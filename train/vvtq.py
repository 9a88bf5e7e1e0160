"""VVTQ (Huang et al., "Variation-aware Vision Transformer Quantization") on top of the LSQ/LSQ+ QAT.

What it adds, in the paper's order (the multi-crop soft-label store is :mod:`train.softlabels`):

* **Module-dependent scales** (Sec. 3.3.2): a *module* is the q, k or v rows of one head in qkv
  and the whole layer elsewhere; each weight scale's gradient is multiplied by
  ``1/sqrt(Qp * ||w_m||_1)`` of its module (LSQ: ``1/sqrt(N * Qp)``), the per-head q/k/v/attention
  scales by ``1/sqrt(Qp * ||x_h||_1)`` (per sample).  :func:`module_scale_args` hands this to the
  quantizers; the scales themselves stay per output row (finer than a module) unless
  ``QuantConfig.weight_scale == "module"`` ties a module's rows to one learned step.
* **Oscillation-aware bin regularisation** (Eq. 9), :func:`obr_loss`::

      L_OBR = sum_m ( ||w_r,m - w_q,m||_2 + sum_n Var(w_r in bin n of m) )

  over the bins holding more than two weights.  A bin is a real interval: with a step per row,
  one integer code of one row.  ``w_r`` is the weight clipped to the grid, ``w_q`` its
  quantized value (a constant), and the steps are constants here, so OBR moves weights only.
  The total loss is ``L + λ(step) L_OBR`` with λ from :func:`obr_lambda`.
* **Measures**: the oscillation rate (Eq. 10/11, :class:`OscillationTracker`) and SDAM
  (:func:`sdam`), in every quantized run's ``metrics.csv``, TensorBoard and epoch line.

:class:`OscillationMeter` and :class:`ObrPenalty` are the objective terms of the ``OscillationTracking`` and
``Obr`` parts (train/methods.py); train.qat composes them with the run's other parts.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .config import QuantConfig, VvtqConfig


def module_scale_args(cfg: QuantConfig, module_rows: Optional[int]) -> dict[str, Any]:
    """WeightQuantizer keyword arguments of a layer whose modules are ``module_rows`` rows (None: one module)."""
    return {"module_rows": module_rows, "grad_norm": "l1" if cfg.module_scales else "lsq",
            "scale_per": cfg.weight_scale}


def quantized_layers(model: nn.Module, role: Optional[str] = None) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer with a trainable quantized weight (``role``: "block", "embed", "head")."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "w_quant") and not getattr(m, "converted", True)
            and (role is None or getattr(m, "qvit_role", None) == role)]


# ----------------------------------------------------------------------------- OBR

def obr_layer(w: torch.Tensor, wq: nn.Module) -> torch.Tensor:
    """Eq. 9 for one quantized weight ``w`` and its WeightQuantizer ``wq``: the sum over its modules of
    ``||w_r - w_q||_2`` plus the (unbiased) variance of ``w_r`` in every bin holding more than two weights."""
    qmin, qmax, _, _ = wq.grid()
    s = wq._scale_like(w, wq.row_scale()).detach()
    v = torch.clamp(w / s, qmin, qmax)
    code = torch.round(v.detach())
    w_r, w_q = v * s, code * s
    err = (w_r - w_q).reshape(wq.n_modules, -1)
    dist = torch.sqrt(err.pow(2).sum(dim=1) + 1e-12).sum()
    rows = w.shape[0]
    lo = int(torch.as_tensor(qmin).min())
    levels = int(torch.as_tensor(qmax).max()) - lo + 1
    key = (torch.arange(rows, device=w.device).reshape((rows,) + (1,) * (w.dim() - 1)) * levels
           + (code - lo).long()).reshape(-1)
    flat = w_r.reshape(-1)
    n = torch.bincount(key, minlength=rows * levels)
    mean = torch.zeros(rows * levels, dtype=flat.dtype, device=w.device).index_add(0, key, flat) / n.clamp(min=1)
    sq = torch.zeros_like(mean).index_add(0, key, (flat - mean[key]).pow(2))
    keep = n > 2
    return dist + (sq[keep] / (n[keep] - 1)).sum()


def obr_loss(model: nn.Module) -> torch.Tensor:
    """L_OBR over every quantized weight of ``model`` (block Linears, patch embedding, head)."""
    terms = [obr_layer(m.weight, m.w_quant) for _, m in quantized_layers(model)]
    if not terms:
        raise ValueError("OBR needs a prepared (quantized, not converted) model")
    return torch.stack(terms).sum()


def obr_lambda(step: int, total: int, lam: float, start: float = 0.25) -> float:
    """λ at optimizer step ``step`` of ``total``: 0 before ``start * total``, then ``lam * (1 - cos(pi r)) / 2``
    with r going 0 -> 1 over the remaining steps (reaches ``lam`` at the last step)."""
    t0 = start * total
    if step < t0 or lam == 0.0:
        return 0.0
    r = min(1.0, (step - t0) / max(1.0, total - 1 - t0))
    return lam * 0.5 * (1.0 - math.cos(math.pi * r))


# ----------------------------------------------------------------------------- oscillation and SDAM

@torch.no_grad()
def oscillation_step(prev: torch.Tensor, last_dir: torch.Tensor, freq: torch.Tensor, codes: torch.Tensor,
                     momentum: float) -> torch.Tensor:
    """One step of VVTQ Eq. 10/11 (Nagel et al.'s oscillation tracking), in place on the state tensors.

    An oscillation happens at step t when the integer code changes and the change runs against the
    previous change (2 -> 3 after 3 -> 2, however many steps lay between them); ``freq`` is its EMA,
    ``f = m * o_t + (1 - m) * f``.  Returns the oscillation indicator ``o_t``.
    """
    delta = (codes.to(torch.int16) - prev.to(torch.int16)).sign().to(torch.int8)
    changed = delta != 0
    osc = changed & (last_dir != 0) & (delta != last_dir)
    freq.mul_(1.0 - momentum).add_(osc.to(freq.dtype), alpha=momentum)
    last_dir.copy_(torch.where(changed, delta, last_dir))
    prev.copy_(codes)
    return osc


class OscillationTracker:
    """The integer codes of every block Linear's weight, step after step: who oscillates.

    :meth:`rate` is the share (%) of integer weights whose oscillation frequency is above
    ``threshold`` -- the paper's "percentage of weights oscillated at the last iteration".
    With ``momentum`` m, one reversal keeps a weight counted for ``ln(m / threshold) / -ln(1 - m)``
    steps (69 at m = 0.01, threshold 0.005): the window of the measure.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], momentum: float = 0.01, threshold: float = 0.005):
        self.layers, self.momentum, self.threshold = layers, momentum, threshold
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def update(self) -> None:
        for name, m in self.layers:
            codes = m.w_quant.integers(m.weight.detach())
            st = self.state.get(name)
            if st is None or st["prev"].shape != codes.shape:
                self.state[name] = {"prev": codes.clone(), "dir": torch.zeros_like(codes),
                                    "freq": torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)}
                continue
            oscillation_step(st["prev"], st["dir"], st["freq"], codes, self.momentum)

    def rate(self) -> float:
        """Percentage of tracked integer weights oscillating now (0 before two updates)."""
        hot = sum(int((st["freq"] > self.threshold).sum()) for st in self.state.values())
        total = sum(st["freq"].numel() for st in self.state.values())
        return 100.0 * hot / total if total else 0.0

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {k: v.detach().cpu().clone() for k, v in st.items()} for n, st in self.state.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
        self.state = {n: {k: v.to(device) for k, v in st.items()} for n, st in state.items()}


@torch.no_grad()
def sdam(model: nn.Module) -> float:
    """Standard deviation of the absolute mean of each module's real-valued weights (VVTQ Table 2):
    ``std_m(mean |w_m|)`` over the modules of the block Linears (q/k/v per head in qkv, whole layers else)."""
    means = [m.weight.detach().abs().reshape(m.w_quant.n_modules, -1).mean(dim=1)
             for _, m in quantized_layers(model, "block")]
    if not means:
        return float("nan")
    means = torch.cat(means)
    return float(means.std()) if means.numel() > 1 else 0.0


# ----------------------------------------------------------------------------- objective terms (train.qat)

class OscillationMeter:
    """The ``OscillationTracking`` part's step hooks: the oscillation rate (after every optimizer step) and
    SDAM, added to each epoch's row; the tracker's state is saved with the optimizer's (``--resume``)."""

    def __init__(self, model: nn.Module, cfg: VvtqConfig) -> None:
        self.model = model
        self.tracker = OscillationTracker(quantized_layers(model, "block"), cfg.osc_momentum, cfg.osc_threshold)

    def begin_fit(self, step: int, total: int, state: Optional[dict] = None) -> None:
        device = next(self.model.parameters()).device
        if state:
            self.tracker.load_state_dict(state.get("oscillation", {}), device)
        if not self.tracker.state:
            self.tracker.update()  # the codes before the first step

    def after_step(self) -> None:
        self.tracker.update()

    def epoch_metrics(self) -> dict[str, float]:
        return {"osc_rate": self.tracker.rate(), "sdam": sdam(self.model)}

    def resume_state(self) -> dict:
        return {"oscillation": self.tracker.state_dict()}


class ObrPenalty:
    """The ``Obr`` part's objective term: ``loss + λ(step)·L_OBR``, λ from :func:`obr_lambda`."""

    def __init__(self, model: nn.Module, cfg: VvtqConfig) -> None:
        self.model, self.cfg = model, cfg
        self.step, self.total = 0, 1

    def lam(self) -> float:
        return obr_lambda(self.step, self.total, self.cfg.obr_lambda, self.cfg.obr_start)

    def begin_fit(self, step: int, total: int, state: Optional[dict] = None) -> None:
        self.step, self.total = step, max(1, total)

    def after_step(self) -> None:
        self.step += 1

    def add(self, loss: torch.Tensor, parts: dict) -> torch.Tensor:
        lam = self.lam()
        reg = lam * obr_loss(self.model) if lam > 0 else loss.new_zeros(())
        parts["obr"] = float(reg.detach())
        return loss + reg

    def epoch_metrics(self) -> dict[str, float]:
        return {"obr_lambda": self.lam()}
