"""One emitter per export format: how each quantized site becomes graph nodes.

An emitter turns one :class:`qformat.SiteSpec` (an activation quantizer, a Linear, a Conv)
into nodes through the graph :class:`~export.graph.Builder`, and records its *parity taps*:
for every activation spec, the graph tensor that holds its integer codes (``"q"``: a
QuantizeLinear output) or the float tensor a node quantizes itself (``"x"``: a low-bit node's
input).  The parity check reads those taps; it never guesses them from node names.

A new format is one subclass registered with :func:`register_emitter` under a name in
:data:`qformat.FORMATS`; a runtime that wants a format written differently registers a
*variant* under the name its target row gives (:attr:`qformat.targets.Target.emitter`)::

    @register_emitter("qdq")
    class QdqEmitter(Emitter): ...          # TensorRT's rules (every TensorRT row)

    @register_emitter("qdq", variant="ort")
    class OrtQdqEmitter(QdqEmitter): ...    # what ONNX Runtime's CPU fusions want
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import qformat
from qformat import formats
from qformat.errors import UserError

from .graph import Builder

_EMITTERS: dict[tuple[str, str | None], type] = {}
# the modules that register the built-in formats and their variants
_MODULES = ("export.qdq", "export.qdq_ort", "export.lowbit", "export.fp32", "export.woq")


def register_emitter(fmt: str, variant: str | None = None):
    """Class decorator: the emitter of format ``fmt`` (a name of qformat.FORMATS), or its variant
    for the targets whose row says ``emitter=variant``."""
    if fmt not in qformat.FORMATS:
        raise ValueError(f"format {fmt!r} is not in qformat.FORMATS {qformat.FORMATS}")

    def deco(cls: type) -> type:
        cls.fmt = fmt
        cls.quantizes_activations = formats.quantizes_activations(fmt)  # the contract's fact, not a copy
        _EMITTERS[(fmt, variant)] = cls
        return cls
    return deco


def emitter_class(fmt: str, variant: str | None = None) -> type:
    """The emitter class of ``fmt`` (its ``variant`` where one is registered), or a one-line
    refusal naming the formats."""
    for mod in _MODULES:
        importlib.import_module(mod)
    if (fmt, None) not in _EMITTERS:
        raise UserError(f"unknown --format {fmt!r}: use one of {', '.join(sorted(f for f, _ in _EMITTERS))}")
    return _EMITTERS.get((fmt, variant), _EMITTERS[(fmt, None)])


@dataclass
class Options:
    opset: int
    int4: bool  # weights whose groups all fit 4 bits as ONNX INT4 (target and opset allow it)
    uint8: bool  # an unsigned 8-bit activation (softmax output) as UINT8 (ONNX Runtime only)
    #: the target's integer-MatMul pair-sum limit (qformat.targets.Target.pair_sum_max; None: exact)
    pair_sum_max: int | None = None


class Tap(NamedTuple):
    """Where parity reads one site's activation codes."""

    tensor: str  # the graph tensor
    kind: str  # "q": integer codes (a QuantizeLinear output) | "x": the float input a low-bit node quantizes
    zero_point: Any = 0  # what to subtract from "q" codes (UINT8 zero-points, broadcast like the spec's scale)


class Emitter:
    """Base class: subclasses implement :meth:`act`, :meth:`linear` and :meth:`conv`."""

    fmt = "?"
    #: whether per-group activation scales may move behind the MatMul they feed (quantized formats)
    hoists_group_scales = True
    #: whether the graph quantizes activations (parity against the converted model); False: against the model
    #: with its activation quantizers removed (dequantized weights, float activations).  Set by
    #: :func:`register_emitter` from :data:`qformat.formats.FORMAT_FACTS`, which the runtime reads too.
    quantizes_activations = True

    @classmethod
    def check_target(cls, target) -> None:
        """Refuse (UserError) a target this format cannot run on, before any tracing."""

    def __init__(self, builder: Builder, opts: Options) -> None:
        self.b, self.opts = builder, opts
        self.taps: dict[str, Tap] = {}  # site name -> where its codes are
        self.lowbit_nodes = 0

    def can_hoist(self, spec: qformat.TensorSpec) -> bool:
        """Whether this per-group quantizer may hand its scale to the MatMul it feeds (see export.rewrite)."""
        return self.hoists_group_scales and spec.scale_axis is not None and not spec.needs_uint8

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
