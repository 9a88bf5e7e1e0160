"""Top-1 / top-5 accuracy, loss and throughput over a loader (summed across DDP ranks)."""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from train.dist import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, max_batches: Optional[int] = None,
             autocast=contextlib.nullcontext) -> dict:
    """Returns {top1, top5, loss, images, img_s}; accuracies in percent. Leaves the model in eval mode.
    ``top5`` is None with 5 classes or fewer, where it would be 100 % by construction."""
    model.eval()
    loss_sum = top1 = top5 = n = 0.0
    classes = 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        classes = logits.shape[1]
        k = min(5, classes)
        pred = logits.topk(k, dim=1).indices
        hit = pred.eq(y[:, None])
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        n += y.numel()
    dt = time.perf_counter() - t0
    loss_sum, top1, top5, n = all_reduce_sum([loss_sum, top1, top5, n], device)
    n_ = max(n, 1.0)
    return {"top1": 100.0 * top1 / n_, "top5": 100.0 * top5 / n_ if classes > 5 else None, "loss": loss_sum / n_,
            "images": int(n), "img_s": n / dt if dt > 0 else 0.0}
