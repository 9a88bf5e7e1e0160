"""Parity matrix: bits 2/3/4/8 x qdq/lowbit x DeiT/Swin tiny configs x opset 17/21 in ONNX Runtime.

Models are built (prepare -> calibrate on real images -> convert) once per (model, bits)
and each graph is checked against the converted PyTorch model on real Fashion-MNIST test
images.  "Exact" means the integer codes match: logits agree to float precision unless a
float tie upstream flips one code, which the code-level test below bounds.
"""

import functools

import numpy as np
import pytest
from conftest import converted_model

from export.exporter import ParityOptions, build_graph, check_parity
from export.parity import run_parity

MODELS = ("vit_fmnist", "swin_fmnist")
N_IMAGES = 16


@functools.cache
def images(name):
    return converted_model(name, 4).test_images(N_IMAGES)


def parity(dep, g, name, atol=1e-5, rtol=1e-5, min_agree=1.0):
    """The exporter's own check: emitter taps, the deployable's specs, real test images."""
    return run_parity(dep.model, g.ort, images(name), atol, rtol, min_agree, taps=g.taps,
                      sites=[s.spec for s in g.sites])


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("fmt", ["qdq", "lowbit"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("name", MODELS)
def test_parity(name, bits, fmt, opset):
    dep = converted_model(name, bits)
    g = build_graph(dep, fmt, "ort", opset, log=lambda s: None)
    if fmt == "lowbit":
        assert g.lowbit_nodes == (0 if bits == 8 else len(_block_linears(dep)))
        assert len(g.ort.functions) == (1 if g.lowbit_nodes else 0)
    par = parity(dep, g, name)
    assert par.passed and par.aligned and par.mismatches == 0, par.line()
    assert par.codes > 100_000 and par.ties <= 1e-4 * par.codes, par.line()
    assert par.top1_agree >= 0.9, par.line()  # plain, unaligned decisions too
    assert set(g.taps) == {s.name for s in dep.specs}  # every site's codes are compared


def _block_linears(dep):
    return [s.name for s in dep.specs if s.op == "linear" and s.weight.max_bits < 8]


@pytest.mark.parametrize("name", MODELS)
def test_fp32_graph_matches_dequantized_float_model(name):
    dep = converted_model(name, 4)
    g = build_graph(dep, "fp32", "ort", 17, log=lambda s: None)
    assert g.taps == {}
    par = check_parity(dep, g, "fp32", ParityOptions(N_IMAGES, 1e-4, 1e-4, 1.0), log=lambda s: None)
    assert par.passed and not par.aligned, par.line()


def test_a_wrong_scale_is_caught():
    """Sanity of the check itself: a graph with one activation scale off by 1% fails as mismatches."""
    import onnx
    from onnx import numpy_helper

    dep = converted_model("vit_fmnist", 4)
    g = build_graph(dep, "qdq", "ort", 17, log=lambda s: None)
    bad = onnx.ModelProto()
    bad.CopyFrom(g.ort)
    for t in bad.graph.initializer:
        if t.name == "blocks.1.mlp.fc2/input/scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
            break
    else:
        raise AssertionError("scale initializer not found")
    g.ort = bad
    par = parity(dep, g, "vit_fmnist", 1e-3, 1e-2, 0.0)
    assert not par.passed and par.mismatches > 100, par.line()


def test_paper_granularity_and_lsq_plus_offsets_are_exact():
    """Per-channel Linear inputs and per-head q/k/v with non-zero integer zero-points."""
    dep = converted_model("vit_fmnist", 4, seed=1, granularity="paper", irm_per_head=True)
    zps = [int(np.abs(s.input.zero_point).max()) for s in dep.specs if s.op == "linear"]
    assert max(zps) > 0  # LSQ+ offsets really present
    g = build_graph(dep, "qdq", "ort", 17, log=lambda s: None)
    par = parity(dep, g, "vit_fmnist")
    assert par.passed and par.mismatches == 0, par.line()
    with pytest.raises(Exception, match="per-tensor input scale"):
        build_graph(dep, "lowbit", "ort", 17, log=lambda s: None)


@pytest.mark.parametrize("overrides", [
    {"attn_granularity": "tensor"},  # per-tensor q/k/v/softmax: standard Clip/Q(s)/DQ(s) on the MatMul inputs
    {"irm": False},  # baseline: no IRM, Identity q_norm/k_norm
    {"act_init": "lsq", "attn_bits": 3, "qkv_bits": 2},  # mixed widths
])
def test_config_variants(overrides):
    dep = converted_model("swin_fmnist", 4, seed=2, **overrides)
    for fmt in ("qdq", "lowbit"):
        g = build_graph(dep, fmt, "ort", 17, log=lambda s: None)
        par = parity(dep, g, "swin_fmnist")
        assert par.passed and par.mismatches == 0, par.line()


def test_parity_reports_failure():
    from export.parity import compare

    ref = np.array([[1.0, 2.0], [3.0, 0.0]])
    assert compare(ref, ref, 0, 0, 1.0).passed
    bad = compare(ref, ref[:, ::-1].copy(), 1e-3, 1e-3, 0.0)
    assert not bad.passed and bad.top1_agree == 0.0
