"""The ``lowbit`` format: every Linear with packable weights as one ``qvit.edge::QvitLowBitLinear`` node.

The node's attributes come from :func:`qformat.lowbit_attrs` (the one builder, shared with the
CUDA extension and the plugin): 2/3/4-bit weights, or mixed widths per output-row group
(format version 2).  Everything else -- q/k/v and softmax quantizers, 8-bit patch embedding
and head, layers a packed layout cannot hold -- is emitted as in ``qdq``.  The node quantizes
its own float input, so its parity tap is that input (``"x"``).
"""

from __future__ import annotations

import qformat

from .emitters import register_emitter
from .functions import lowbit_node
from .qdq import QdqEmitter


@register_emitter("lowbit")
class LowbitEmitter(QdqEmitter):
    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        try:
            attrs = qformat.lowbit_attrs(site)
        except qformat.FormatError:
            if site.input.scale.size != 1 and site.weight.max_bits in qformat.PACKED_BITS:
                from qformat.errors import UserError

                raise UserError(f"{site.name}: the lowbit node takes a per-tensor input scale but this model uses "
                                f"per-channel Linear input scales (granularity=paper); export --format qdq") from None
            super().linear(site, x, out)  # no packed layout (e.g. 8-bit head): Q/DQ as in qdq
            return
        self.b.nodes.append(lowbit_node(self.b.unique(f"{site.name}/QvitLowBitLinear"), x, out, attrs))
        self.taps[site.name] = (x, "x")
        self.lowbit_nodes += 1
