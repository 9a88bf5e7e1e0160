"""Bits per group end to end: per-module overrides by pattern, per-group fake-quant, specs, export parity.

The mixed model of the issue: qkv rows of head 0 at 2 bits and the rest at 4; q and k of head 1
at 3 bits -- trained briefly on real Fashion-MNIST, converted, exported as ``qdq`` and ``lowbit``.
"""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from conftest import converted_model, test_images
from onnx import numpy_helper

import qformat
from qformat.errors import UserError
from train.config import QuantConfig
from train.models import create_model
from train.qat import prepare
from train.quant import check_overrides
from train.quantizers import ActQuantizer, WeightQuantizer

MIXED = {"blocks.*.attn.qkv": {"w_bits": [2, 4, 4]},  # one width per head: head 0's q, k and v rows at 2
         "blocks.*.attn": {"q_bits": [4, 3, 4], "k_bits": [4, 3, 4]}}


# ----------------------------------------------------------------------------- config and patterns

@pytest.mark.parametrize("overrides,match", [
    ({"blocks.*.attn.qkv": {"wbits": 3}}, "unknown key 'wbits'"),
    ({"blocks.*.attn.qkv": {"w_bits": 9}}, "2..8"),
    ({"blocks.*.attn.qkv": {"a_bits": [4, 8]}}, "one integer"),
    ({"blocks.*.attn.qkv": {"w_bits": [4, 1]}}, "2..8"),
    ({"blocks.*.attn.qkv": {"w_group_axis": "rows"}}, "w_group_axis"),
    ({"blocks.*.attn.qkv": {}}, "non-empty"),
    ({"": {"w_bits": 3}}, "non-empty module-name pattern"),
])
def test_bad_override_shapes_are_refused_by_the_config(overrides, match):
    with pytest.raises(UserError, match=match):
        QuantConfig(overrides=overrides)


@pytest.mark.parametrize("overrides,match", [
    ({"blocks.*.atn.qkv": {"w_bits": 3}}, "matches no quantized module"),
    ({"blocks.*.attn": {"w_bits": 3}}, "w_bits applies to none"),
    ({"blocks.*.mlp.fc1": {"q_bits": 3}}, "q_bits applies to none"),
    ({"blocks.*.attn": {"q_bits": [4, 3]}}, "one width per head (3)"),
    ({"blocks.0.mlp.fc1": {"w_bits": [2, 3, 4, 4, 4]}}, "add w_group_size"),
    ({"patch_embed.proj": {"w_bits": [4, 8]}}, "for Linear layers"),
    ({"blocks.0.mlp.fc1": {"w_group_size": 4}}, "need w_bits as a list"),
])
def test_overrides_that_do_not_fit_the_model_are_refused(overrides, match):
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace(")", r"\)")):
        check_overrides(create_model("vit_fmnist"), QuantConfig(overrides=overrides))


def test_per_head_bits_need_per_head_scales():
    cfg = QuantConfig(attn_granularity="tensor", overrides={"blocks.*.attn": {"q_bits": [4, 3, 4]}})
    with pytest.raises(UserError, match="per-head scales"):
        check_overrides(create_model("vit_fmnist"), cfg)


def test_patterns_resolve_in_order_and_per_kind():
    m = create_model("vit_fmnist")
    prepare(m, QuantConfig(w_bits=4, a_bits=4, overrides={
        "blocks.0.*": {"a_bits": 8}, "blocks.*.mlp.fc2": {"w_bits": 3}, "blocks.0.mlp.fc2": {"w_bits": 2},
        "head": {"w_bits": 6}, **MIXED}))
    b0, b1 = m.blocks[0], m.blocks[1]
    assert (b0.attn.qkv.a_quant.bits, b0.mlp.fc1.a_quant.bits, b1.mlp.fc1.a_quant.bits) == (8, 8, 4)
    assert (b0.attn.v_quant.bits, b0.attn.attn_quant.bits, b1.attn.v_quant.bits) == (8, 8, 4)
    assert b0.attn.q_quant.bits == (4, 3, 4)  # the later, more specific pattern wins over a_bits 8
    assert (b0.mlp.fc2.w_quant.bits, b1.mlp.fc2.w_quant.bits, m.head.w_quant.bits, m.head.a_quant.bits) == (2, 3, 6, 8)
    wq = b1.attn.qkv.w_quant  # [2, 4, 4] per head -> (q, k, v) x heads row groups of head_dim rows
    assert wq.bits == (2, 4, 4) * 3 and wq.group_size == 32 and wq.group_axis == -2


# ----------------------------------------------------------------------------- per-group fake-quant

def test_weight_groups_clip_to_their_own_grid_and_scale_gradient_is_lsq_per_group():
    torch.manual_seed(0)
    wq = WeightQuantizer((2, 4), 4, group_axis=-2, group_size=2)
    w = torch.randn(4, 16) * 3
    wq.scale.data = torch.full((4, 1), 0.5)
    wq.initialized.fill_(True)
    w.requires_grad_(True)
    y = wq(w)
    codes = (y / 0.5).detach()
    assert codes[:2].min() >= -2 and codes[:2].max() <= 1 and codes[2:].min() >= -8 and codes[2:].max() <= 7
    assert codes[:2].abs().max() == 2 and codes[2:].abs().max() > 2  # both grids really used
    y.sum().backward()
    v = (w / 0.5).detach()
    qmin = torch.tensor([-2, -2, -8, -8.]).reshape(4, 1)
    qmax = torch.tensor([1, 1, 7, 7.]).reshape(4, 1)
    inside = (v >= qmin) & (v <= qmax)
    q = torch.clamp(v, qmin, qmax).round()
    g = 1 / torch.sqrt(w.numel() * qmax)
    want = (torch.where(inside, q - v, q) * g).sum(dim=1, keepdim=True)
    torch.testing.assert_close(wq.scale.grad, want)
    torch.testing.assert_close(w.grad, inside.float())


def test_column_groups_and_per_head_activation_bits():
    wq = WeightQuantizer((4, 2), 3, group_axis=-1, group_size=4, in_features=8)
    wq.initialize(torch.randn(3, 8))
    codes = wq.integers(torch.randn(3, 8) * 10)
    assert codes[:, :4].abs().max() == 8 and codes[:, 4:].min() == -2 and codes[:, 4:].max() == 1
    aq = ActQuantizer((4, 2, 8), signed=False, grouping="head", groups=3, kind="attn")
    x = torch.rand(2, 3, 5, 5)
    aq.initialize(x)
    out = aq(x) / aq.scale.detach().reshape(1, 3, 1, 1)
    assert [int(out[:, h].round().max()) <= qformat.qrange(b, False)[1] for h, b in enumerate((4, 2, 8))] == [True] * 3
    with pytest.raises(ValueError, match="one width per head group"):
        ActQuantizer((4, 2), grouping="head", groups=3)


# ----------------------------------------------------------------------------- specs and export

def test_convert_produces_the_spec_records():
    dep = converted_model("vit_fmnist", 4, overrides=MIXED)
    by = {s.name: s for s in dep.specs}
    qkv = by["blocks.2.attn.qkv"]
    assert qkv.op == "linear" and qkv.weight.bits == (2, 4, 4) * 3 and qkv.weight.group_size == 32
    assert qkv.weight_int[:32].min() >= -2 and qkv.weight_int[:32].max() <= 1  # head 0's q rows: 2 bits
    q = by["blocks.2.attn.q_quant"].input
    assert (q.kind, q.bits, q.scale_axis, q.group_axis) == ("qkv", (4, 3, 4), -3, -3)
    lo, hi = q.bounds()
    assert lo.shape == (3, 1, 1) and (hi - lo).reshape(-1).tolist() == [15, 7, 15]
    assert by["blocks.2.attn.attn_quant"].input.kind == "attn" and not by["blocks.2.attn.attn_quant"].input.signed
    assert [s.name for s in dep.specs if s.op == "conv"] == ["patch_embed.proj"]


@pytest.mark.slow
def test_mixed_model_trains_converts_and_exports_with_parity(tmp_path, fmnist_dir):
    """A short real run with the overrides from the command line, then both formats with parity."""
    from export.cli import main as export_main
    from train.cli import main as train_main

    out = tmp_path / "run"
    ov = tmp_path / "mixed.json"
    ov.write_text(json.dumps(MIXED))
    rc = train_main(["--model", "vit_fmnist", "--bits", "4", "--method", "qvit", "--fp-epochs", "1", "--epochs", "1",
                     "--max-train-batches", "4", "--max-eval-batches", "2", "--batch-size", "64", "--calib-batches",
                     "1", "--no-tensorboard", "--quant-override", str(ov), "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "best.json").read_text())
    assert meta["quant"]["overrides"] == MIXED  # saved in the checkpoint
    for fmt in ("qdq", "lowbit"):
        assert export_main(["--checkpoint", str(out / "best.safetensors"), "--format", fmt, "--target", "ort",
                            "--out", str(tmp_path / "onnx"), "--parity-n", "64"]) == 0
        side = json.loads((tmp_path / "onnx" / f"vit_fmnist_w4a4.{fmt}.json").read_text())
        assert side["parity"]["passed"] and side["parity"]["mismatches"] == 0 and side["parity"]["n"] == 64
        assert side["quant"]["overrides"] == MIXED and side["format_version"] == qformat.FORMAT_VERSION
        sites = {s["name"]: s for s in side["sites"]}
        assert sites["blocks.0.attn.qkv"]["weight"]["bits"] == [2, 4, 4] * 3
        assert sites["blocks.0.attn.k_quant"]["input"]["bits"] == [4, 3, 4]
    m = onnx.load(str(tmp_path / "onnx" / "vit_fmnist_w4a4.lowbit.onnx"))
    nodes = {n.name.split("/")[0]: n for n in m.graph.node if n.op_type == qformat.LOWBIT_OP}
    qkv = {a.name: a for a in nodes["blocks.0.attn.qkv"].attribute}
    assert tuple(qkv) == qformat.LOWBIT_ATTRS and qkv["bits"].i == 4 and qkv["group_size"].i == 32
    assert numpy_helper.to_array(qkv["group_bits"].t).tolist() == [2, 4, 4] * 3
    assert tuple(a.name for a in nodes["blocks.0.mlp.fc1"].attribute) == qformat.LOWBIT_ATTRS[:12]  # uniform: v1


def test_uint8_codes_never_feed_an_integer_matmul():
    """ONNX Runtime's x86 u8s8 MatMul saturates int16 pair sums: every integer MatMul the ``ort`` graph
    offers it (both inputs DequantizeLinear) is u8 x u8, or u8 x s8 within the pair-sum rule
    (qformat.targets.int_matmul_exact); the parity at 8 bits stays exact."""
    from onnx import numpy_helper

    from export.exporter import ParityOptions, build_graph, check_parity
    from qformat import targets

    dep = converted_model("vit_fmnist", 8)
    g = build_graph(dep, "qdq", "ort", 17, log=lambda s: None)
    prod = {o: n for n in g.ort.graph.node for o in n.output}
    consts = {t.name: t for t in g.ort.graph.initializer}
    checked = 0
    for n in g.ort.graph.node:
        dqs = [prod.get(i) for i in n.input]
        if n.op_type != "MatMul" or not all(p is not None and p.op_type == "DequantizeLinear" for p in dqs):
            continue
        types = [consts[p.input[2]].data_type for p in dqs]
        if onnx.TensorProto.INT8 in types and onnx.TensorProto.UINT8 in types:
            w = dqs[types.index(onnx.TensorProto.INT8)]
            w_max = int(np.abs(numpy_helper.to_array(consts[w.input[0]]).astype(np.int64)).max()) \
                if w.input[0] in consts else 8  # INT4 storage behind a Cast: |w| <= 8
            assert targets.int_matmul_exact(255, w_max, targets.INT16_MAX), n.name
        checked += 1
    assert checked > 0  # the test saw integer MatMuls
    par = check_parity(dep, g, "qdq", ParityOptions(16, 1e-5, 1e-5, 1.0), log=lambda s: None)
    assert par.passed and par.mismatches == 0, par.line()
    assert math.isfinite(par.max_abs) and np.isfinite(test_images("vit_fmnist", 2).numpy()).all()
