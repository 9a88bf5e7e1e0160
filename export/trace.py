"""Trace a converted model into a *skeleton* ONNX graph with one marker node per quantized site.

The float parts of the network (reshapes, LayerNorm, softmax, Swin windows, position
bias, residuals) come from PyTorch's TorchScript-based ONNX exporter, so they follow the
installed timm exactly.  Every quantized piece is traced as a custom-domain marker node
instead (``qvit_export::Act`` / ``Linear`` / ``Conv`` with an ``idx`` attribute pointing
into the list of :class:`Site`), and the format's emitter (:mod:`export.emitters`) replaces
each marker with the exact standard-op (or custom-op) subgraph.  That keeps the quantization
arithmetic in one place we control instead of pattern-matching whatever the tracer emits.

The sites are the model's :class:`qformat.SiteSpec` records (what ``train``'s ``convert``
produced); the module of each is looked up by its path only to route its forward here.
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

import qformat
from qformat.errors import UserError

MARKER_DOMAIN = "qvit_export"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class Site:
    """One quantized place in the model: its spec record and the module that computes it."""

    spec: qformat.SiteSpec
    module: nn.Module

    @property
    def kind(self) -> str:  # "act" | "linear" | "conv"
        return self.spec.op

    @property
    def name(self) -> str:  # module path, e.g. "blocks.3.attn.q_quant"
        return self.spec.name


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


def collect_sites(model: nn.Module, specs: list[qformat.SiteSpec]) -> list[Site]:
    """The spec records paired with their modules (a spec naming no module is a stale checkpoint)."""
    sites = []
    for spec in specs:
        try:
            sites.append(Site(spec, model.get_submodule(spec.name)))
        except AttributeError:
            raise UserError(f"the model has no module {spec.name!r} named by its quantization specs; "
                            "re-create the checkpoint") from None
    return sites


def _shape_only(site: Site):
    """What a marker's forward returns while tracing: a zero tensor of the site's output shape."""
    spec = site.spec
    if site.kind == "act":
        return lambda x: x.clone()
    if site.kind == "linear":
        return lambda x: x.new_zeros(tuple(x.shape[:-1]) + (spec.out_features,))
    g = spec.conv

    def conv(x):
        k, st, pads, dil = g["kernel_shape"], g["strides"], g["pads"], g["dilations"]
        hw = [(int(x.shape[2 + i]) + pads[i] + pads[i + 2] - dil[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(2)]
        return x.new_zeros((x.shape[0], spec.out_features, hw[0], hw[1]))
    return conv


def _float_forward(site: Site):
    """The site without quantization: dequantized weights from the spec, float activations."""
    spec = site.spec
    if site.kind == "act":
        return lambda x: x
    w = torch.from_numpy(spec.dequantized_weight())
    b = None if spec.bias is None else torch.from_numpy(spec.bias)
    if site.kind == "linear":
        return lambda x: nn.functional.linear(x, w.to(x.device), None if b is None else b.to(x.device))
    g = spec.conv
    pads = g["pads"][:2]
    return lambda x: nn.functional.conv2d(x, w.to(x.device), None if b is None else b.to(x.device), g["strides"],
                                          pads, g["dilations"], g["group"])


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
                _OUT[idx] = site.spec.out_features
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
