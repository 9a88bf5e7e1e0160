"""Trace a converted model into a *skeleton* ONNX graph with one marker node per quantized site.

The float parts of the network (reshapes, LayerNorm, softmax, Swin windows, position
bias, residuals) come from PyTorch's TorchScript-based ONNX exporter, so they follow the
installed timm exactly.  Every quantized piece is traced as a custom-domain marker node
instead (``qvit_export::Act`` / ``Linear`` / ``Conv`` with an ``idx`` attribute pointing
into :class:`Site`), and :mod:`export.qdq` / :mod:`export.lowbit` replace each marker with
the exact standard-op (or custom-op) subgraph.  That keeps the quantization arithmetic in
one place we control instead of pattern-matching whatever the tracer emits.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from train.quant import QuantConv2d, QuantLinear
from train.quantizers import ActQuantizer

MARKER_DOMAIN = "qvit_export"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class Site:
    """One quantized place in the model: an activation quantizer, a QuantLinear or a QuantConv2d."""

    kind: str  # "act" | "linear" | "conv"
    name: str  # qualified module name, e.g. "blocks.3.attn.q_quant"
    module: nn.Module


def _marker(kind: str):
    class _Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, idx):  # only the output shape matters to the tracer
            return _REAL[idx](x)

        @staticmethod
        def symbolic(g, x, idx):
            y = g.op(f"{MARKER_DOMAIN}::{kind}", x, idx_i=idx)
            try:  # give the tracer the output type so it does not warn about missing shape inference
                sizes = x.type().varyingSizes()
                out = _OUT.get(idx)
                if out is not None and sizes is not None:
                    sizes = list(sizes[:-1]) + [out] if kind == "Linear" else None
                y.setType(x.type() if kind == "Act" else x.type().with_sizes(sizes))
            except (RuntimeError, TypeError, AttributeError):
                pass
            return y

    _Mark.__name__ = f"Mark{kind}"
    return _Mark


_REAL: dict[int, object] = {}  # idx -> shape-only forward while tracing (autograd.Function takes no callables)
_OUT: dict[int, int] = {}  # idx -> Linear out_features while tracing
_MARKS = {"act": _marker("Act"), "linear": _marker("Linear"), "conv": _marker("Conv")}


def collect_sites(model: nn.Module) -> list[Site]:
    """Every quantized site in module order (Linear/Conv input quantizers belong to their layer)."""
    sites: list[Site] = []
    owned = set()
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            if not getattr(m, "converted", False):
                raise ValueError(f"{name} is not converted: call train.quant.convert(model) first")
            sites.append(Site("conv" if isinstance(m, QuantConv2d) else "linear", name, m))
            owned.add(id(m.a_quant))
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer) and id(m) not in owned:
            sites.append(Site("act", name, m))
    return sites


def _shape_only(site: Site):
    """What a marker's forward returns while tracing: a zero tensor of the site's output shape."""
    m = site.module
    if site.kind == "act":
        return lambda x: x.clone()
    if site.kind == "linear":
        return lambda x: x.new_zeros(tuple(x.shape[:-1]) + (m.out_features,))

    def conv(x):
        hw = [(int(x.shape[2 + i]) + 2 * int(m.padding[i]) - int(m.dilation[i]) * (int(m.kernel_size[i]) - 1) - 1)
              // int(m.stride[i]) + 1 for i in range(2)]
        return x.new_zeros((x.shape[0], m.out_channels, hw[0], hw[1]))
    return conv


def _float_forward(site: Site):
    m = site.module
    if site.kind == "act":
        return lambda x: x
    if site.kind == "linear":
        return lambda x: nn.functional.linear(x, m.dequantized_weight(), m.bias)
    return lambda x: m._conv_forward(x, m.dequantized_weight(), m.bias)


@contextlib.contextmanager
def patched(model: nn.Module, sites: list[Site], float_mode: bool = False) -> Iterator[None]:
    """Route each site's forward through its marker (tracing) or its float version (``float_mode``)."""
    saved = []
    for idx, site in enumerate(sites):
        m = site.module
        saved.append((m, m.__dict__.get("forward")))
        if float_mode:
            m.forward = _float_forward(site)
        else:
            _REAL[idx] = _shape_only(site)
            if site.kind == "linear":
                _OUT[idx] = int(site.module.out_features)
            m.forward = (lambda x, idx=idx, mark=_MARKS[site.kind]: mark.apply(x, idx))
    try:
        yield
    finally:
        _REAL.clear()
        _OUT.clear()
        for m, prev in reversed(saved):
            m.__dict__.pop("forward", None)
            if prev is not None:
                m.forward = prev


def skeleton(model: nn.Module, sites: list[Site], example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """TorchScript-trace ``model`` with markers; dynamic batch; constants folded by the tracer."""
    from qformat.errors import UserError

    buf = io.BytesIO()
    with patched(model, sites), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            _export(model, example, buf, opset)
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot trace {type(model).__name__} to ONNX opset {opset} ({first}); "
                            "an op without an ONNX mapping needs a newer --opset or a supported model") from None
    return onnx.load_from_string(buf.getvalue())


def _export(model: nn.Module, example: torch.Tensor, buf: io.BytesIO, opset: int) -> None:
    """The TorchScript exporter (deprecated since torch 2.9 but present in 2.14): it traces in
    ~0.3 s, emits opset 13 with LayerNorm decomposed for TensorRT 8.2, and maps an
    ``autograd.Function.symbolic`` straight to a custom node -- the dynamo exporter needs
    opset >= 18 plus down-conversion and takes ~10x longer."""
    torch.onnx.export(
        model, (example,), buf, dynamo=False, opset_version=opset,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        custom_opsets={MARKER_DOMAIN: 1}, do_constant_folding=True)


@torch.no_grad()
def float_reference(model: nn.Module, sites: list[Site], x: torch.Tensor) -> torch.Tensor:
    """The converted model with every quantizer removed (dequantized weights, float activations)."""
    with patched(model, sites, float_mode=True):
        return model(x)
