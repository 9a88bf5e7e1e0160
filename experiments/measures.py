"""What a final row reports beside accuracy: BitOPs per image and model bytes, and the paired statistics.

* BitOPs: ``train.mixedbits.BitOpsCounter`` on the converted model (MACs x weight bits x activation bits
  over every quantized matmul, QK^T and A.V included), the quantity the learned-bit budget constrains.
* Model bytes: the quantized weights packed at their own widths, plus every other floating-point
  parameter and buffer (biases, norms, embeddings, quantizer steps) at 4 bytes -- the payload a
  deployment stores, without any container overhead (the lowbit ONNX adds its graph on top).
* Paired differences against the baseline: the mean of the per-seed differences and its 95 % t-interval
  (``scipy.stats.t``), the test the final table reads.
"""

from __future__ import annotations

import math
from typing import Optional


def checkpoint_measures(path: str) -> dict:
    """``{"bitops_g": ..., "model_bytes": ..., "w_bits": ..., "a_bits": ...}`` of a trained checkpoint."""
    import torch

    from train.checkpoint import load_converted
    from train.mixedbits import BitOpsCounter, _layer_modules, weight_bits

    model, _ = load_converted(path)
    with torch.no_grad():
        t = BitOpsCounter(model).totals()
        quant_bits, skip = 0.0, set()
        for _, m, _ in _layer_modules(model):
            w = m.weight_int
            rows, cols = weight_bits(m.w_quant, int(w.shape[0]), int(w[0].numel()))
            quant_bits += float(rows.sum() * cols.sum())
            skip.add(id(w))
        rest = sum(p.numel() for p in list(model.parameters()) + list(model.buffers())
                   if p.is_floating_point() and id(p) not in skip)
    return {"bitops_g": round(float(t["bitops"]) / 1e9, 6), "model_bytes": int(math.ceil(quant_bits / 8) + 4 * rest),
            "w_bits": round(float(t["w_bits"]), 4), "a_bits": round(float(t["a_bits"]), 4)}


def paired(values: dict, ref: dict, level: float = 0.95) -> Optional[dict]:
    """Paired difference ``values - ref`` over their common seeds: mean, std, n and the ``level``
    t-interval of the mean (None below two seeds: no interval)."""
    common = sorted(set(values) & set(ref))
    if not common:
        return None
    d = [values[s] - ref[s] for s in common]
    n = len(d)
    mean = sum(d) / n
    out = {"mean": mean, "n": n, "seeds": common}
    if n > 1:
        from scipy.stats import t

        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(std=sd, lo=mean - half, hi=mean + half)
    return out


def paired_text(p: Optional[dict]) -> str:
    """``+0.42 [−0.10, +0.94] (n=5)``; one seed: ``+0.42 (seed 0)``; none: ``–``."""
    if p is None:
        return "–"
    if p["n"] == 1:
        return f"{p['mean']:+.2f} (seed {p['seeds'][0]})"
    return f"{p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}] (n={p['n']})"


def seeds_for(seed_std: float, delta: float = 0.5, level: float = 0.95, most: int = 50) -> int:
    """Paired seeds for the ``level`` t-interval of a difference to be within ±``delta``, when one config's
    seed-to-seed std is ``seed_std`` and the two configs' seeds are uncorrelated (the difference's std is
    then sqrt(2) x ``seed_std``; pairing by teacher and data order can only make it smaller)."""
    from scipy.stats import t

    sd = math.sqrt(2.0) * seed_std
    for n in range(2, most + 1):
        if float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) <= delta:
            return n
    return most
