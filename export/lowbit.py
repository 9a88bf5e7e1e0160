"""The ``lowbit`` format: every Linear with packable weights as one ``qvit.edge::QvitLowBitLinear`` node.

The node's attributes come from :func:`qformat.lowbit_attrs` (the one builder, shared with the
CUDA extension and the plugin): 2/3/4-bit weights, or mixed widths per output-row group
(format version 2).  Everything else -- q/k/v and softmax quantizers, 8-bit patch embedding
and head, layers a packed layout cannot hold, a Linear whose input has bits per head (a learned
head output) -- is emitted as the target's ``qdq`` emitter writes it (TensorRT's rules, or the
ONNX Runtime variant for ``--target ort``).  The node quantizes its own float input, so its
parity tap is that input (``"x"``).
"""

from __future__ import annotations

import numpy as np

import qformat
from qformat.errors import UserError

from .emitters import Tap, register_emitter
from .functions import lowbit_node
from .qdq import QdqEmitter
from .qdq_ort import OrtQdqEmitter


def _shared_per_group(scale) -> bool:
    """Whether per-channel ``scale`` entries come in equal-length runs of one value (a learned head output: one
    scale per head of ``head_dim`` channels, whatever the heads' widths), not one scale per channel
    (``granularity=paper``). Either way the Q/DQ fallback is exact; only the latter makes the format pointless."""
    s = np.asarray(scale).reshape(-1)
    runs = np.diff(np.concatenate([[0], np.flatnonzero(s[1:] != s[:-1]) + 1, [s.size]]))
    return bool(runs.min() > 1 and np.all(runs % runs.min() == 0))


class LowbitLinears:
    """Mixin over a Q/DQ emitter: packable Linears become QvitLowBitLinear nodes, the rest stays Q/DQ."""

    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        try:
            attrs = qformat.lowbit_attrs(site)
        except qformat.FormatError:
            # per-head input widths (a learned head output, the input of W_O) need a scale per head, which
            # the node's one input scale cannot hold: that layer goes as Q/DQ, exact like the rest
            if (site.input.scale.size != 1 and site.weight.max_bits in qformat.PACKED_BITS and not site.input.mixed
                    and not _shared_per_group(site.input.scale)):
                raise UserError(f"{site.name}: the lowbit node takes a per-tensor input scale but this model uses "
                                f"per-channel Linear input scales (granularity=paper); export --format qdq") from None
            super().linear(site, x, out)  # no packed layout (e.g. 8-bit head): Q/DQ as in qdq
            return
        self.b.nodes.append(lowbit_node(self.b.unique(f"{site.name}/QvitLowBitLinear"), x, out, attrs))
        self.taps[site.name] = Tap(x, "x")
        self.lowbit_nodes += 1


@register_emitter("lowbit")
class LowbitEmitter(LowbitLinears, QdqEmitter):
    """Packed Linears; the rest under TensorRT's Q/DQ rules."""


@register_emitter("lowbit", variant="ort")
class OrtLowbitEmitter(LowbitLinears, OrtQdqEmitter):
    """Packed Linears; the rest as ONNX Runtime's CPU fusions want it."""
