"""Strongly typed graphs: FP16 where the engine should run FP16, LayerNorm / IRM / Softmax in FP32 through Casts.

TensorRT 11 has no precision builder flags (and 10.x can build without them): an engine's precision
is the graph's own types.  :func:`to_strongly_typed` rewrites a checked FP32 graph so that

* every float tensor is FP16, except the graph's input and output (FP32 at the boundary, one Cast
  each, so callers feed and read float32 as before);
* *FP32 islands* stay FP32: the nodes of every LayerNorm and IRM (the exporter's ``fp32_layers``),
  every Softmax, and the low-bit plugin node (its reference function body is FP32).  FP16
  LayerNorm overflows in the variance on ViT activations; softmax's exponent sum loses the small
  probabilities the attention quantizer keeps;
* one Cast per tensor and direction sits on every island boundary;
* float constants become FP16 where FP16 nodes read them (refused if a value overflows FP16 or
  a Q/DQ scale flushes to zero); one read on both sides is duplicated;
* Q/DQ take FP16 scales (opset >= 19), so DequantizeLinear yields FP16 and TensorRT sees the
  INT8 (or INT4 weight) MatMuls it fuses.

:func:`half_reference` runs the converted PyTorch model the same way -- FP16 weights and
activations, norms and softmax in FP32 -- the reference the typed parity check compares with.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.overrides import TorchFunctionMode

import qformat

from .graph import producers
from .guard import PREFIX as GUARD_PREFIX

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
_SCALE_INPUTS = {"QuantizeLinear": 1, "DequantizeLinear": 1}


def island_nodes(model: onnx.ModelProto, fp32_layers: list[str]) -> set[str]:
    """Names of the nodes that stay FP32: LayerNorm/IRM nodes, Softmax, the low-bit plugin node, and the
    non-finite guard on the FP32 input and logits (export/guard.py)."""
    keep = set(fp32_layers)
    return {n.name for n in model.graph.node
            if n.name in keep or n.op_type in ("Softmax", "LayerNormalization") or n.domain == qformat.LOWBIT_DOMAIN
            or n.name.startswith(GUARD_PREFIX)}


def _types(g: onnx.GraphProto) -> dict[str, int]:
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


def _constants_to_initializers(g: onnx.GraphProto) -> None:
    """Float ``Constant`` nodes become initializers, so one code path converts every float constant."""
    keep = []
    for n in g.node:
        attr = n.attribute[0] if n.op_type == "Constant" and len(n.attribute) == 1 else None
        if attr is not None and attr.name == "value" and attr.t.data_type == FLOAT:
            t = TensorProto()
            t.CopyFrom(attr.t)
            t.name = n.output[0]
            g.initializer.append(t)
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _fp16(t: onnx.TensorProto, scale: bool) -> onnx.TensorProto:
    a = numpy_helper.to_array(t).astype(np.float32)
    if np.any(np.abs(a) > FP16_MAX):
        raise ValueError(f"{t.name}: |value| up to {np.abs(a).max():.3g} overflows FP16")
    h = a.astype(np.float16)
    if scale and np.any((h == 0) & (a != 0)):
        raise ValueError(f"{t.name}: a Q/DQ scale of {np.abs(a[a != 0]).min():.3g} flushes to 0 in FP16")
    return numpy_helper.from_array(h, t.name + "_fp16")


class _Typer:
    def __init__(self, model: onnx.ModelProto, islands: set[str]) -> None:
        self.g, self.islands = model.graph, islands
        self.types = _types(self.g)
        self.inits = {t.name: t for t in self.g.initializer}
        self.prod = producers(self.g)
        self.new_inits: dict[str, str] = {}
        self.casts: dict[tuple[str, int], str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.n_casts = 0

    def _home(self, name: str) -> int:
        """The type a float tensor has after the pass: FP32 for graph inputs and island outputs."""
        p = self.prod.get(name)
        return FLOAT if p is None or p.name in self.islands else FLOAT16

    def _cast(self, name: str, to: int) -> str:
        key = (name, to)
        if key not in self.casts:
            out = f"{name}/{'fp16' if to == FLOAT16 else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [name], [out], name=out + "/Cast", to=to))
            self.casts[key] = out
            self.n_casts += 1
        return self.casts[key]

    def _const(self, name: str, scale: bool) -> str:
        if name not in self.new_inits:
            t = _fp16(self.inits[name], scale)
            self.g.initializer.append(t)
            self.new_inits[name] = t.name
        return self.new_inits[name]

    def _node(self, n: onnx.NodeProto) -> None:
        want = FLOAT if n.name in self.islands else FLOAT16
        for i, name in enumerate(n.input):
            if not name or self.types.get(name) != FLOAT:
                continue
            if name in self.inits:
                if want == FLOAT16:
                    n.input[i] = self._const(name, _SCALE_INPUTS.get(n.op_type) == i)
            elif self._home(name) != want:
                n.input[i] = self._cast(name, want)
        if want == FLOAT16:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                    a.i = FLOAT16
                if n.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_fp16(a.t, False))
        self.nodes.append(n)

    def run(self) -> int:
        outs = {o.name for o in self.g.output if o.type.tensor_type.elem_type == FLOAT}
        tail = []
        for n in self.g.node:  # an FP16 node writing a graph output writes <out>/fp16, then one Cast to FP32
            if n.name not in self.islands:
                for j, o in enumerate(n.output):
                    if o in outs:
                        n.output[j] = o + "/fp16"
                        tail.append(helper.make_node("Cast", [o + "/fp16"], [o], name=o + "/Cast", to=FLOAT))
                        self.n_casts += 1
        moved = {t.output[0] for t in tail}
        for n in self.g.node:  # nodes that also read a graph output read its FP16 value
            if n.name not in self.islands:
                n.input[:] = [i + "/fp16" if i in moved else i for i in n.input]
        self.prod = producers(self.g)
        for n in list(self.g.node):
            self._node(n)
        used = {i for n in self.nodes + tail for i in n.input}
        del self.g.node[:]
        self.g.node.extend(self.nodes + tail)
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        del self.g.value_info[:]
        return self.n_casts


def to_strongly_typed(model: onnx.ModelProto, fp32_layers: list[str]) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` (a checked FP32 graph at opset >= 19) typed FP16 with FP32 islands; and a summary."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _constants_to_initializers(m.graph)
    islands = island_nodes(m, fp32_layers)
    casts = _Typer(m, islands).run()
    return m, {"fp32_islands": len(islands), "casts": casts}


def typed_violations(model: onnx.ModelProto, fp32_layers: list[str]) -> list[str]:
    """What makes ``model`` not the strongly typed graph :func:`to_strongly_typed` promises (shape-inferred
    model expected): an island computing in FP16, or FP32 compute outside the islands."""
    g = model.graph
    types = _types(g)
    islands = island_nodes(model, fp32_layers)
    io = {v.name for v in list(g.input) + list(g.output)}
    out = []
    for n in g.node:
        if n.op_type == "Cast" or n.domain not in ("", "ai.onnx"):
            continue
        floats = [types.get(i) for i in n.input if types.get(i) in (FLOAT, FLOAT16)]
        if n.name in islands and FLOAT16 in floats:
            out.append(f"{n.name} ({n.op_type}) must compute in FP32 but reads FP16")
        elif n.name not in islands and FLOAT in floats and not set(n.input) & io:
            out.append(f"{n.name} ({n.op_type}) computes in FP32 outside the FP32 islands")
    if not any(t.data_type == FLOAT16 for t in g.initializer) and not any(
            v.type.tensor_type.elem_type == FLOAT16 for v in g.value_info):
        out.append("no FP16 tensor: the graph is not typed FP16")
    return out


# ----------------------------------------------------------------------------- the FP16 PyTorch reference

class _Fp32Softmax(TorchFunctionMode):
    """Softmax of FP16 tensors computed in FP32 and rounded back, as the typed graph's Softmax islands do."""

    _FUNCS = frozenset({torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FUNCS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float16:
            return func(args[0].float(), *args[1:], **kwargs).half()
        return func(*args, **kwargs)


def _fp32_module(module: nn.Module) -> None:
    """Keep ``module`` (a LayerNorm / IRM) in FP32 inside an FP16 model: Cast in, compute, Cast out."""
    module.float()
    module.register_forward_pre_hook(lambda m, args: (args[0].float(),) + tuple(args[1:]))
    module.register_forward_hook(lambda m, args, out: out.half())


@contextlib.contextmanager
def half_reference(model: nn.Module, fp32_modules: list[str]) -> Iterator[nn.Module]:
    """An FP16 copy of the converted ``model`` whose norms (``fp32_modules``) and softmax run in FP32;
    feed it FP16 images.  The original model is untouched."""
    half = copy.deepcopy(model).half().eval()
    for name in fp32_modules:
        _fp32_module(half.get_submodule(name))
    with _Fp32Softmax(), torch.no_grad():
        yield half
