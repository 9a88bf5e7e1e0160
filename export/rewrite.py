"""Walk the traced skeleton and hand every marker node to the format's emitter.

Two graph-level moves serve every quantized format (see :mod:`export.qdq` for the picture):
``Act -> Transpose`` becomes ``Transpose -> Act`` (kᵀ), and when both inputs of a MatMul come
from per-group quantizers (QKᵀ, A·V) their per-group scales move behind the MatMul, so the
MatMul reads DequantizeLinear outputs directly -- what TensorRT fuses into an INT8 MatMul.

Codes above INT8 (an unsigned 8-bit softmax output, ONNX Runtime only) keep their scale in front
of the MatMul, which then runs in float: ORT's x86 u8s8 integer kernels (VPMADDUBSW) saturate
int16 pair sums, which is not the trained arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx

from .emitters import Emitter, Options, emitter_class
from .graph import Builder, consumers, producers
from .trace import MARKER_DOMAIN, Site

_PASS = ("Transpose", "Identity")


def _idx(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "idx":
            return int(a.i)
    raise ValueError(f"marker {node.name} has no idx")


def _is_act_marker(n: onnx.NodeProto) -> bool:
    return n.domain == MARKER_DOMAIN and n.op_type == "Act"


class Rewriter:
    """Turns a skeleton with markers into the final graph of one format."""

    def __init__(self, model: onnx.ModelProto, sites: list[Site], fmt: str, opts: Options) -> None:
        self.model, self.sites = model, sites
        self.emitter: Emitter = emitter_class(fmt)(Builder(model.graph), opts)

    def _spec(self, idx: int):
        return self.sites[idx].spec.input

    def _transpose_first(self) -> None:
        """``Act -> Transpose`` becomes ``Transpose -> Act`` so DQ feeds the MatMul directly.

        (K^T in QK^T.)  Exact: quantization is elementwise, and the per-head/per-channel scale
        axes are kept in place by the permutation (checked).  It also sidesteps ONNX Runtime's
        transpose optimizer, which at opset 21 rewrites ``DQ -> Transpose`` into a Q node with
        a mismatched ``output_dtype``.
        """
        g = self.model.graph
        users = consumers(g)
        order = list(g.node)
        for n in [m for m in order if _is_act_marker(m)]:
            us = users.get(n.output[0], [])
            if len(us) != 1 or us[0].op_type != "Transpose":
                continue
            t = us[0]
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
            axis = self._spec(_idx(n)).scale_axis
            if perm is None or (axis is not None and perm[len(perm) + axis] != len(perm) + axis):
                continue
            x, a, b = n.input[0], n.output[0], t.output[0]
            t.input[0], t.output[0] = x, a
            n.input[0], n.output[0] = a, b
            order.remove(t)
            order.insert(order.index(n), t)
        del g.node[:]
        g.node.extend(order)

    def _hoist_plan(self) -> tuple[set[int], dict[str, list[int]]]:
        """Per-group act markers whose scale can move behind the MatMul they feed."""
        g = self.model.graph
        prod, users = producers(g), consumers(g)

        def source(name: str):
            n = prod.get(name)
            while n is not None and n.op_type in _PASS:
                if len(users[n.output[0]]) != 1:
                    return None
                n = prod.get(n.input[0])
            return n if n is not None and _is_act_marker(n) else None

        hoisted: set[int] = set()
        matmuls: dict[str, list[int]] = {}
        if not self.emitter.hoists_group_scales:
            return hoisted, matmuls
        for n in g.node:
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
                continue
            srcs = [source(i) for i in n.input]
            if any(s is None for s in srcs):
                continue
            groups = [_idx(s) for s in srcs if len(users[s.output[0]]) == 1 and self._spec(_idx(s)).scale_axis
                      and not self._spec(_idx(s)).needs_uint8]
            if groups:
                matmuls[n.output[0]] = groups
                hoisted.update(groups)
        return hoisted, matmuls

    def _group_scale(self, n: onnx.NodeProto, idxs: list[int]) -> None:
        """MatMul of integer-grid inputs, then ``Mul`` by the product of their per-group scales."""
        b, out = self.emitter.b, n.output[0]
        tmp = b.unique(out + "_int")
        n.output[0] = tmp
        b.nodes.append(n)
        scale = np.float32(1.0)
        for i in idxs:
            scale = scale * self._spec(i).scale_view().astype(np.float32)
        label = n.name.rsplit("/", 1)[0] if "/" in n.name else n.name
        b.node("Mul", [tmp, b.const(f"{label}/group_scales", np.asarray(scale, np.float32))], f"{label}/GroupScale",
               out)

    def run(self) -> onnx.ModelProto:
        g, em = self.model.graph, self.emitter
        self._transpose_first()
        hoisted, matmuls = self._hoist_plan()
        for n in g.node:
            if n.domain == MARKER_DOMAIN:
                i = _idx(n)
                site, x, y = self.sites[i].spec, n.input[0], n.output[0]
                if site.op == "act":
                    em.act(site.name, site.input, x, y, hoisted=i in hoisted)
                elif site.op == "linear":
                    em.linear(site, x, y)
                else:
                    em.conv(site, x, y)
            elif n.output and n.output[0] in matmuls:
                self._group_scale(n, matmuls[n.output[0]])
            else:
                em.b.nodes.append(n)
        del g.node[:]
        g.node.extend(em.b.nodes)
        g.initializer.extend(em.b.inits)
        return self.model

    @property
    def taps(self) -> dict[str, tuple[str, str]]:
        return self.emitter.taps

    @property
    def lowbit_nodes(self) -> int:
        return self.emitter.lowbit_nodes
