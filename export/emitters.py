"""One emitter per export format: how each quantized site becomes graph nodes.

An emitter turns one :class:`qformat.SiteSpec` (an activation quantizer, a Linear, a Conv)
into nodes through the graph :class:`~export.graph.Builder`, and records its *parity taps*:
for every activation spec, the graph tensor that holds its integer codes (``"q"``: a
QuantizeLinear output) or the float tensor a node quantizes itself (``"x"``: a low-bit node's
input).  The parity check reads those taps; it never guesses them from node names.

A new format is one subclass registered with :func:`register_emitter` under a name in
:data:`qformat.FORMATS`::

    @register_emitter("qdq")
    class QdqEmitter(Emitter): ...
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import qformat
from qformat.errors import UserError

from .graph import Builder

_EMITTERS: dict[str, type] = {}
_MODULES = ("export.qdq", "export.lowbit", "export.fp32")  # the modules that register the built-in formats


def register_emitter(fmt: str):
    """Class decorator: the emitter of format ``fmt`` (a name of qformat.FORMATS)."""
    if fmt not in qformat.FORMATS:
        raise ValueError(f"format {fmt!r} is not in qformat.FORMATS {qformat.FORMATS}")

    def deco(cls: type) -> type:
        cls.fmt = fmt
        _EMITTERS[fmt] = cls
        return cls
    return deco


def emitter_class(fmt: str) -> type:
    """The emitter class of ``fmt``, or a one-line refusal naming the formats."""
    for mod in _MODULES:
        importlib.import_module(mod)
    if fmt not in _EMITTERS:
        raise UserError(f"unknown --format {fmt!r}: use one of {', '.join(sorted(_EMITTERS))}")
    return _EMITTERS[fmt]


@dataclass
class Options:
    opset: int
    int4: bool  # weights whose groups all fit 4 bits as ONNX INT4 (target and opset allow it)
    uint8: bool  # an unsigned 8-bit activation (softmax output) as UINT8 (ONNX Runtime only)


class Emitter:
    """Base class: subclasses implement :meth:`act`, :meth:`linear` and :meth:`conv`."""

    fmt = "?"
    #: whether per-group activation scales may move behind the MatMul they feed (quantized formats)
    hoists_group_scales = True

    def __init__(self, builder: Builder, opts: Options) -> None:
        self.b, self.opts = builder, opts
        self.taps: dict[str, tuple[str, str]] = {}  # site name -> (graph tensor, "q" codes | "x" float input)
        self.lowbit_nodes = 0

    def act(self, name: str, spec: qformat.TensorSpec, x: str, out: str | None, hoisted: bool = False) -> str:
        """Emit the quantizer ``spec`` of site ``name`` on ``x``; return the (dequantized) result."""
        raise NotImplementedError

    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        raise NotImplementedError

    def conv(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        raise NotImplementedError

    def matmul_add(self, base: str, x: str, w: str, bias, out: str) -> None:
        """``out = x @ w (+ bias)``: the tail every Linear shares."""
        if bias is None:
            self.b.node("MatMul", [x, w], f"{base}/MatMul", out)
            return
        y = self.b.node("MatMul", [x, w], f"{base}/MatMul")
        self.b.node("Add", [y, self.b.const(f"{base}/bias", bias)], f"{base}/Add", out)

    def conv_node(self, site: qformat.SiteSpec, x: str, w: str, out: str) -> None:
        inputs = [x, w]
        if site.bias is not None:
            inputs.append(self.b.const(f"{site.name}/bias", site.bias))
        g = site.conv
        self.b.node("Conv", inputs, f"{site.name}/Conv", out, kernel_shape=g["kernel_shape"], strides=g["strides"],
                    pads=g["pads"], dilations=g["dilations"], group=g["group"])
