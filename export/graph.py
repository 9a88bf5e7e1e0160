"""Small raw-protobuf graph helpers: a node/initializer builder and the dead-code passes.

Raw ``onnx`` protos (not graphsurgeon) for the rewrite itself, because the result carries
INT4 initializers, tensor-valued node attributes and model-local functions, which must
survive untouched; graphsurgeon does the skeleton clean-up (:mod:`export.cleanup`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """Collects new nodes and initializers with unique, human-readable names."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used = {n.name for n in graph.node if not n.domain.startswith("qvit_export")}
        self.used |= {t.name for t in graph.initializer}
        for n in graph.node:
            self.used.update(n.output)
        self.used.update(i.name for i in graph.input)

    def unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name

    def const(self, name: str, value, dtype=None) -> str:
        arr = np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)
        name = self.unique(name)
        self.inits.append(numpy_helper.from_array(arr, name=name))
        return name

    def tensor(self, tensor: onnx.TensorProto) -> str:
        """Add a ready-made initializer (e.g. INT4) under a unique name."""
        tensor.name = self.unique(tensor.name)
        self.inits.append(tensor)
        return tensor.name

    def node(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out if out is not None else self.unique(f"{name}_output")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.unique(name), **attrs))
        return out


def int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """Signed 4-bit ``codes`` as an INT4 initializer: raw bytes, two codes per byte, the first in the
    low nibble (ONNX's packing) -- half the size of INT8, not the varint ``int32_data`` of make_tensor."""
    codes = np.asarray(codes)
    flat = codes.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nib = (flat.view(np.uint8) & 0x0F).astype(np.uint8)
    raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), raw, raw=True)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            users[i].append(n)
    return users


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def remove_identities(graph: onnx.GraphProto) -> None:
    """Bypass Identity nodes (the tracer leaves them around dropout and aliased biases)."""
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for n in graph.node:
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def eliminate_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)
