"""Parity matrix: bits 2/3/4/8 x qdq/lowbit x DeiT/Swin tiny configs x opset 17/21 in ONNX Runtime.

Models are built (prepare -> calibrate on real images -> convert) once per (model, bits)
and each graph is checked against the converted PyTorch model on real Fashion-MNIST test
images.  "Exact" means the integer codes match: logits agree to float precision unless a
float tie upstream flips one code, which the code-level test below bounds.
"""

import functools

import numpy as np
import pytest

from export.exporter import build_graph
from export.parity import load_images, run_parity
from export.source import fresh

MODELS = ("vit_fmnist", "swin_fmnist")
N_IMAGES = 16


@functools.cache
def model_and_meta(name, bits):
    return fresh(name, bits, calib_n=16)


@functools.cache
def images(name):
    _, meta = model_and_meta(name, 4)
    return load_images(N_IMAGES, meta)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("fmt", ["qdq", "lowbit"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("name", MODELS)
def test_parity(name, bits, fmt, opset):
    model, meta = model_and_meta(name, bits)
    g = build_graph(model, meta["input_size"], fmt, "ort", opset, log=lambda s: None)
    if fmt == "lowbit":
        assert g.lowbit_nodes == (0 if bits == 8 else sum(1 for _ in _block_linears(model)))
        assert len(g.ort.functions) == (1 if g.lowbit_nodes else 0)
    par = run_parity(model, g.ort, images(name), atol=1e-5, rtol=1e-5, min_agree=1.0)
    assert par.passed and par.aligned and par.mismatches == 0, par.line()
    assert par.codes > 100_000 and par.ties <= 1e-4 * par.codes, par.line()
    assert par.top1_agree >= 0.9, par.line()  # plain, unaligned decisions too


def _block_linears(model):
    from train.quant import QuantLinear

    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.w_quant.bits < 8:
            yield n


@pytest.mark.parametrize("name", MODELS)
def test_fp32_graph_matches_dequantized_float_model(name):
    from export import trace

    model, meta = model_and_meta(name, 4)
    g = build_graph(model, meta["input_size"], "fp32", "ort", 17, log=lambda s: None)
    sites = trace.collect_sites(model)
    par = run_parity(lambda x: trace.float_reference(model, sites, x), g.ort, images(name), 1e-4, 1e-4, 1.0)
    assert par.passed, par.line()


def test_a_wrong_scale_is_caught():
    """Sanity of the check itself: a graph with one activation scale off by 1% fails as mismatches."""
    import onnx
    from onnx import numpy_helper

    model, meta = model_and_meta("vit_fmnist", 4)
    g = build_graph(model, meta["input_size"], "qdq", "ort", 17, log=lambda s: None)
    bad = onnx.ModelProto()
    bad.CopyFrom(g.ort)
    for t in bad.graph.initializer:
        if t.name == "blocks.1.mlp.fc2.a_quant/scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
            break
    else:
        raise AssertionError("scale initializer not found")
    par = run_parity(model, bad, images("vit_fmnist")[:4], 1e-3, 1e-2, 0.0)
    assert not par.passed and par.mismatches > 100, par.line()


def test_paper_granularity_and_lsq_plus_offsets_are_exact():
    """Per-channel Linear inputs and per-head q/k/v with non-zero integer zero-points."""
    import torch

    from train.config import QuantConfig
    from train.data import eval_images
    from train.models import create_model
    from train.quant import calibrate, convert, prepare

    torch.manual_seed(1)
    model = create_model("vit_fmnist").eval()
    prepare(model, QuantConfig.for_method("qvit", 4, granularity="paper", irm_per_head=True))
    x, _ = eval_images(16, split="train", model="vit_fmnist")
    calibrate(model, [x])
    convert(model)
    zps = [float(m.zero_point.abs().max()) for n, m in model.named_modules() if n.endswith("a_quant")]
    assert max(zps) > 0  # LSQ+ offsets really present
    g = build_graph(model, [1, 28, 28], "qdq", "ort", 17, log=lambda s: None)
    par = run_parity(model, g.ort, images("vit_fmnist"), 1e-5, 1e-5, 1.0)
    assert par.passed and par.mismatches == 0, par.line()
    with pytest.raises(Exception, match="per-tensor input scale"):
        build_graph(model, [1, 28, 28], "lowbit", "ort", 17, log=lambda s: None)


@pytest.mark.parametrize("overrides", [
    {"attn_granularity": "tensor"},  # per-tensor q/k/v/softmax: standard Clip/Q(s)/DQ(s) on the MatMul inputs
    {"irm": False},  # baseline: no IRM, Identity q_norm/k_norm
    {"act_init": "lsq", "attn_bits": 3, "qkv_bits": 2},  # mixed widths
])
def test_config_variants(overrides):
    import torch

    from train.config import QuantConfig
    from train.data import eval_images
    from train.models import create_model
    from train.quant import calibrate, convert, prepare

    torch.manual_seed(2)
    model = create_model("swin_fmnist").eval()
    prepare(model, QuantConfig.for_method("qvit", 4, **overrides))
    x, _ = eval_images(16, split="train", model="swin_fmnist")
    calibrate(model, [x])
    convert(model)
    for fmt in ("qdq", "lowbit"):
        g = build_graph(model, [1, 28, 28], fmt, "ort", 17, log=lambda s: None)
        par = run_parity(model, g.ort, images("swin_fmnist"), 1e-5, 1e-5, 1.0)
        assert par.passed and par.mismatches == 0, par.line()


def test_parity_reports_failure():
    from export.parity import compare

    ref = np.array([[1.0, 2.0], [3.0, 0.0]])
    assert compare(ref, ref, 0, 0, 1.0).passed
    bad = compare(ref, ref[:, ::-1].copy(), 1e-3, 1e-3, 0.0)
    assert not bad.passed and bad.top1_agree == 0.0
