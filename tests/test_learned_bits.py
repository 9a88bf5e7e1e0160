"""Learned head-wise bit-widths (differentiable Q-ViT, train.mixedbits): the bit STE, switchable
scales, the BitOPs count by hand, the budget penalty, freezing after sigma, checkpoints, the report,
export parity of a mixed model in both formats and the command line's refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import test_images

import qformat
from qformat.errors import UserError
from train.config import MixedBitsConfig, QuantConfig
from train.mixedbits import (
    BitBudget,
    BitOpsCounter,
    LearnedActQuantizer,
    LearnedBits,
    LearnedWeightQuantizer,
    allocation,
    bit_ste,
    budget_penalty,
    fit_to_budget,
    paper_penalty,
    write_report,
)
from train.models import create_model
from train.qat import Objective, convert, prepare
from train.quant import calibrate

TINY = dict(depth=1, embed_dim=12, num_heads=3, mlp_ratio=2.0)  # head_dim 4, MLP 24, 49 patches + cls


def learned_model(budget=4.0, switchable=True, method="baseline", **kw):
    torch.manual_seed(0)
    m = create_model("vit_fmnist", **kw)
    cfg = QuantConfig.for_method(method, int(budget), mixed=MixedBitsConfig(budget=budget, switchable=switchable))
    return prepare(m, cfg)


def set_bits(q, widths):
    q.bit.value.data = torch.tensor(widths, dtype=torch.float32)


# ----------------------------------------------------------------------------- bit STE

def test_bit_ste_rounds_clamps_and_passes_the_gradient_inside_the_range():
    b = torch.tensor([1.2, 2.49, 2.51, 5.5, 6.5, 9.7], requires_grad=True)
    out = bit_ste(b)
    assert out.tolist() == [2, 2, 3, 6, 6, 8]  # half to even, like every rounding of the pipeline
    out.sum().backward()
    assert b.grad.tolist() == [0, 1, 1, 1, 1, 0]  # outside [2, 8] the clamp stops it


def test_clipped_elements_pull_the_bit_width_up():
    """The task loss reaches b~ through the clip bounds: values beyond qmax want more bits."""
    q = LearnedWeightQuantizer(4, 8, init_bits=3, switchable=False)
    w = torch.randn(4, 8)
    q.initialize(w)
    big = w.clone()
    big[:, 0] = 100.0  # far above every row's clip bound
    (-q(big)[:, 0].sum()).backward()  # the loss wants the clipped outputs larger
    assert q.bit.value.grad.item() < 0  # gradient descent raises b~
    q.bit.value.grad = None
    q(w * 1e-3).sum().backward()  # nothing clipped: no pull
    assert q.bit.value.grad.item() == 0


def test_unsigned_map_is_capped_at_7_bits_so_it_fits_int8():
    q = LearnedActQuantizer(False, "head", 3, "attn", init_bits=9, switchable=True, bit_groups=3)
    assert q.bits == 7
    set_bits(q, [8.0, 2.0, 7.4])
    q.bit.project_()
    assert q.bit.value.tolist()[0] == 7 and q.bits == (7, 2, 7)


# ----------------------------------------------------------------------------- switchable scale

def test_switchable_scale_uses_the_scale_of_the_current_width_only():
    q = LearnedActQuantizer(True, "tensor", 1, "act", init_bits=4, switchable=True)
    x = torch.randn(8, 5, 12)
    q.initialize(x)
    s = q.scale.detach()[:, 0]
    assert s.shape == (7,) and bool(torch.all(s[:-1] > s[1:]))  # MSE search: fewer bits, coarser steps
    for bits in (2, 5, 8):
        set_bits(q, [float(bits)])
        q.scale.grad = None
        out = q(x)
        step = s[bits - 2].item()
        codes = out / step + q.zero_point.detach()[bits - 2, 0]
        assert torch.allclose(codes, codes.round(), atol=1e-3), bits  # on the grid of that width's scale
        out.sum().backward()
        used = (q.scale.grad[:, 0] != 0).nonzero().reshape(-1).tolist()
        assert used == [bits - 2], used


def test_one_scale_ablation_keeps_a_single_scale_for_every_width():
    q = LearnedWeightQuantizer(6, 4, init_bits=5, switchable=False)
    w = torch.randn(6, 4)
    assert q.scale.shape == (1, 6, 1)
    q.initialize(w)
    set_bits(q, [2.0])
    q(w).sum().backward()
    assert q.scale.grad.shape == (1, 6, 1) and bool(torch.all(q.scale.grad != 0))


def test_head_wise_groups_follow_the_heads():
    m = learned_model(**TINY)
    attn = m.blocks[0].attn
    set_bits(attn.qkv.w_quant, [2, 3, 4, 5, 6, 7, 8, 2, 3])  # (q | k | v) x 3 heads
    set_bits(attn.proj.w_quant, [2, 4, 8])  # W_O columns of each head
    w = torch.randn(36, 12)
    attn.qkv.w_quant.initialize(w)
    q = attn.qkv.w_quant
    codes = (q(w * 1e3) / q.current_scale(q.bit())).round()  # everything clipped
    for g, b in enumerate([2, 3, 4, 5, 6, 7, 8, 2, 3]):  # 4 rows each, clipped to their own grid
        rows = codes[4 * g: 4 * g + 4]
        assert rows.min() == -(2 ** (b - 1)) and rows.max() == 2 ** (b - 1) - 1, g


# ----------------------------------------------------------------------------- BitOPs

def test_bitops_by_hand_on_a_tiny_model_including_the_attention_matmuls():
    m = learned_model(**TINY)
    a = m.blocks[0].attn
    set_bits(m.patch_embed.proj.w_quant, [6])
    set_bits(m.patch_embed.proj.a_quant, [7])
    wqkv = [2, 3, 4, 5, 6, 7, 8, 2, 3]
    set_bits(a.qkv.w_quant, wqkv)
    set_bits(a.qkv.a_quant, [5])
    q, k, amap, v, wo, ho = [2, 3, 4], [4, 4, 2], [3, 5, 7], [6, 2, 4], [3, 4, 5], [2, 6, 8]
    for quant, widths in ((a.q_quant, q), (a.k_quant, k), (a.attn_quant, amap), (a.v_quant, v),
                          (a.proj.w_quant, wo), (a.proj.a_quant, ho)):
        set_bits(quant, widths)
    mlp = m.blocks[0].mlp
    for quant, b in ((mlp.fc1.w_quant, 4), (mlp.fc1.a_quant, 5), (mlp.fc2.w_quant, 3), (mlp.fc2.a_quant, 6),
                     (m.head.w_quant, 7), (m.head.a_quant, 8)):
        set_bits(quant, [b])
    T, D, d, F, P = 50, 12, 4, 24, 49
    hand = (P * D * 16 * 6 * 7  # patch embedding: 49 positions x 12 out x (1 x 4 x 4) in
            + T * d * D * 5 * sum(wqkv)  # qkv: 9 row groups of head_dim rows
            + T * T * d * sum(x * y for x, y in zip(q, k))  # QK^T per head
            + T * T * d * sum(x * y for x, y in zip(amap, v))  # A.V per head
            + T * D * d * sum(x * y for x, y in zip(wo, ho))  # proj: head i's columns x head i's output
            + T * F * D * 4 * 5 + T * D * F * 3 * 6  # fc1, fc2 (GELU output)
            + 1 * 10 * D * 7 * 8)  # head on the class token
    counter = BitOpsCounter(m)
    assert float(counter.totals()["bitops"]) == hand
    macs = P * D * 16 + T * 3 * D * D + 2 * T * T * D + T * D * D + 2 * T * F * D + 10 * D
    assert counter.macs == macs
    uniform3 = 3 * 3 * (macs - P * D * 16 - 10 * D) + 64 * (P * D * 16 + 10 * D)  # embed and head stay at 8
    assert counter.uniform(3) == uniform3


def test_bitops_count_a_converted_model_the_same():
    m = learned_model(**TINY)
    set_bits(m.blocks[0].attn.qkv.w_quant, [2, 3, 4, 5, 6, 7, 8, 2, 3])
    set_bits(m.blocks[0].attn.attn_quant, [3, 5, 7])
    calibrate(m, [test_images("vit_fmnist", 4)])
    before = allocation(m)
    convert(m)
    after = allocation(m)
    assert after["bitops_g"] == pytest.approx(before["bitops_g"], rel=1e-9)
    assert after["attention"] == before["attention"] and after["layers"] == before["layers"]
    assert m.qvit_allocation["attention"][0]["w_q"] == [2, 3, 4]


# ----------------------------------------------------------------------------- penalty and schedule

def test_penalty_is_the_squared_relative_overshoot_and_size_free():
    c = torch.tensor(100.0)
    assert budget_penalty(torch.tensor(90.0), c, 0.1).item() == 0.0
    assert budget_penalty(torch.tensor(150.0), c, 0.1).item() == pytest.approx(0.1 * 0.25)
    assert budget_penalty(torch.tensor(1.5e12), torch.tensor(1e12), 0.1).item() == pytest.approx(0.1 * 0.25)


def test_paper_penalty_is_eta_times_the_squared_overshoot_in_gbitops():
    c = torch.tensor(2e9)
    assert paper_penalty(torch.tensor(1.5e9), c, 0.1).item() == 0.0
    assert paper_penalty(torch.tensor(3e9), c, 0.1).item() == pytest.approx(0.1 * 1.0)
    assert paper_penalty(torch.tensor(2.2e9), c, 0.1).item() == pytest.approx(0.1 * 0.04)
    # the same 10 % overshoot: the relative form does not see the model's size, the paper's does
    assert budget_penalty(torch.tensor(1.1e11), torch.tensor(1e11), 1.0).item() == pytest.approx(
        budget_penalty(torch.tensor(1.1e9), torch.tensor(1e9), 1.0).item())
    assert paper_penalty(torch.tensor(1.1e11), torch.tensor(1e11), 1.0).item() == pytest.approx(100.0)


def test_bit_penalty_is_selectable_from_the_command_line():
    from train.cli import parse_args
    from train.config import mixed_settings

    args = parse_args(["--method", "mp", "--bits", "3", "--bit-penalty", "paper", "--fp-epochs", "1"])
    assert mixed_settings(args)["penalty"] == "paper"
    with pytest.raises(UserError, match="penalty"):
        MixedBitsConfig(penalty="absolute")
    m = learned_model(budget=3, **TINY)
    calibrate(m, [test_images("vit_fmnist", 4)])
    m.qvit_quant_config["mixed"]["penalty"] = "paper"
    obj = BitBudget(m, log=lambda s: None)
    t = obj.counter.totals()
    assert float(obj.stats()["penalty"]) == pytest.approx(0.1 * ((float(t["bitops"]) - obj.budget) / 1e9) ** 2)


def test_a_frozen_allocation_over_budget_is_lowered_until_it_fits():
    m = learned_model(budget=3, **TINY)
    calibrate(m, [test_images("vit_fmnist", 4)])
    for p in _bits(m):
        p.value.data.fill_(8.0)
    logs = []
    obj = BitBudget(m, log=logs.append)
    before = float(obj.counter.totals()["bitops"])
    assert before > obj.budget
    obj.set_progress(9, 10)  # sigma 0.9 of 10 steps: the search ends here
    after = float(obj.counter.totals()["bitops"])
    assert after <= obj.budget < before and "lowered" in logs[-1]
    assert min(int(v) for p in _bits(m) for v in p.frozen_bits.tolist()) >= 2
    assert fit_to_budget(m, obj.counter, obj.budget) == []  # fitted: nothing more to lower


def test_fit_lowers_the_widest_width_first_then_the_costliest():
    m = learned_model(budget=3, **TINY)
    calibrate(m, [test_images("vit_fmnist", 4)])
    for p in _bits(m):
        p.value.data.fill_(3.0)
    m.blocks[0].mlp.fc1.w_quant.bit.value.data.fill_(8.0)  # one wide weight
    for p in _bits(m):
        p.freeze_()
    counter = BitOpsCounter(m)
    total = float(counter.totals()["bitops"])
    steps = fit_to_budget(m, counter, total - 1.0)  # just over: one step down is enough
    # fc1's *input* width would save more (its MACs x the 8-bit weight), but the widest width goes first
    assert len(steps) == 1 and steps[0][0] == "blocks.0.mlp.fc1.w_quant.bit" and steps[0][2] == 7
    assert float(counter.totals()["bitops"]) < total
    assert fit_to_budget(m, counter, total * 10) == []


def test_fit_spreads_a_large_overshoot_over_every_width():
    m = learned_model(budget=3, **TINY)
    calibrate(m, [test_images("vit_fmnist", 4)])
    for p in _bits(m):
        p.value.data.fill_(8.0)
        p.freeze_()
    counter = BitOpsCounter(m)
    budget = 0.6 * float(counter.totals()["bitops"])
    steps = fit_to_budget(m, counter, budget)
    widths = [int(v) for p in _bits(m) for v in p.frozen_bits.reshape(-1).tolist()]
    assert steps and float(counter.totals()["bitops"]) <= budget
    assert max(widths) - min(widths) <= 1, widths  # no layer taken to its minimum while others stay wide


def test_penalty_pushes_every_bit_width_down_only_while_over_budget():
    m = learned_model(budget=3, **TINY)
    x, y = test_images("vit_fmnist", 8), torch.arange(8) % 10
    calibrate(m, [x])
    obj = Objective(_Zero(m), [BitBudget(m, log=lambda s: None)])
    loss, _, parts = obj(x, y)
    assert parts["bitops_ratio"] > 1  # starts at budget + 1 bits
    loss.backward()
    grads = [p.value.grad for p in _bits(m)]
    assert all(g is not None and bool(torch.all(g >= 0)) for g in grads)
    assert sum(float(g.sum()) for g in grads) > 0
    for p in _bits(m):
        p.value.data.fill_(2.0)
        p.value.grad = None
    loss, _, parts = obj(x, y)
    assert parts["bitops_ratio"] < 1 and parts["bitops_penalty"] == 0.0


class _Zero(torch.nn.Module):
    """An objective that is zero (only the penalty trains)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x)
        return logits.sum() * 0, logits, {}


def _macs(counter, name):
    return next(t.macs for t in counter.terms if t.name == name)


def _bits(m):
    return [q for q in m.modules() if isinstance(q, LearnedBits)]


@pytest.mark.parametrize("sigma,total,first_frozen", [(0.9, 10, 9), (0.5, 7, 4), (1.0, 10, 9)])
def test_bits_freeze_after_sigma_of_the_steps(sigma, total, first_frozen):
    """Frozen at ceil(sigma * steps) (sigma = 1: the last step, so that the final widths are fitted); a
    budget of 8 bits holds every allocation, so nothing is lowered here."""
    m = create_model("vit_fmnist", **TINY)
    prepare(m, QuantConfig(w_bits=4, a_bits=4, mixed=MixedBitsConfig(budget=8, search_ratio=sigma)))
    calibrate(m, [test_images("vit_fmnist", 4)])
    obj = Objective(_Zero(m), [BitBudget(m, log=lambda s: None)])
    qkv = m.blocks[0].attn.qkv.w_quant.bit
    frozen_at = None
    for step in range(total):
        obj.set_progress(step, total)
        if frozen_at is None and bool(qkv.frozen):
            frozen_at = step
        qkv.value.data.fill_(2.0 + 6 * (step % 2))  # an optimizer moving b~ back and forth
    assert frozen_at == first_frozen
    if frozen_at is not None:  # frozen: the widths of the freeze step, whatever b~ does, and no gradient
        held = 2 if (first_frozen - 1) % 2 == 0 else 8
        qkv.value.data.fill_(5.0)
        b = qkv()
        assert b.tolist() == [held] * 9
        b.sum().backward()
        assert float(qkv.value.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- checkpoints and report

def test_checkpoint_round_trip_and_a_mismatched_allocation_is_refused(tmp_path):
    from train.checkpoint import load_converted, load_state, save_checkpoint

    m = learned_model()
    set_bits(m.blocks[1].attn.q_quant, [2, 5, 7])
    calibrate(m, [test_images("vit_fmnist", 4)])
    meta = {"model": "vit_fmnist", "quant": QuantConfig.from_dict(m.qvit_quant_config).to_dict(),
            "input_size": [1, 28, 28], "mean": [0.286], "std": [0.353], "class_names": list("0123456789"),
            "num_classes": 10}
    path = save_checkpoint(str(tmp_path / "mp"), m, meta)
    conv, _ = load_converted(path)
    assert conv.qvit_allocation["attention"][1]["q"] == [2, 5, 7]
    assert conv.blocks[1].attn.q_quant.bits == (2, 5, 7)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["blocks.1.attn.q_quant.bit.value"] = torch.full((2,), 4.0)
    with pytest.raises(UserError, match="does not fit the model: blocks.1.attn.q_quant.bit has 2"):
        load_state(learned_model(), sd, "x.safetensors")
    with pytest.raises(UserError, match="no mixed search"):
        fixed = create_model("vit_fmnist")
        prepare(fixed, QuantConfig(w_bits=4, a_bits=4))
        load_state(fixed, sd, "x.safetensors")


def test_report_lists_every_head_and_layer(tmp_path):
    m = learned_model(**TINY)
    set_bits(m.blocks[0].attn.v_quant, [2, 3, 6])
    set_bits(m.blocks[0].mlp.fc2.a_quant, [7])
    calibrate(m, [test_images("vit_fmnist", 4)])
    paths = write_report(m, str(tmp_path), {"note": "x"})
    rep = json.loads(open(paths[0]).read())
    assert rep["attention"][0]["v"] == [2, 3, 6] and rep["note"] == "x"
    fc2 = [r for r in rep["layers"] if r["name"] == "blocks.0.mlp.fc2"][0]
    assert fc2["a"] == 7 and fc2["w"] == 5  # GELU output learned 7, weights still at the start (budget + 1)
    assert "| blocks.0.attn | 5/5/5 |" in open(paths[1]).read()
    assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- export parity

MIXED_BITS = {"qkv.w": [2, 3, 4, 4, 2, 3, 3, 4, 2], "proj.w": [2, 4, 3], "q": [3, 4, 5], "k": [4, 2, 3],
              "attn": [5, 3, 7], "v": [2, 4, 8], "head_out": [3, 2, 4]}


@pytest.fixture(scope="module")
def mixed_deployable():
    from train.deploy import from_model

    m = learned_model(budget=3).eval()
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        shift = i % 2  # blocks differ
        for q, key in ((a.qkv.w_quant, "qkv.w"), (a.proj.w_quant, "proj.w"), (a.q_quant, "q"), (a.k_quant, "k"),
                       (a.attn_quant, "attn"), (a.v_quant, "v"), (a.proj.a_quant, "head_out")):
            w = MIXED_BITS[key]
            set_bits(q, w[shift:] + w[:shift])
        set_bits(blk.mlp.fc1.w_quant, [3 + shift])
        set_bits(blk.mlp.fc2.a_quant, [6])
    x = test_images("vit_fmnist", 16)
    calibrate(m, [x])
    convert(m)
    meta = {"model": "vit_fmnist", "quant": dict(m.qvit_quant_config), "input_size": [1, 28, 28],
            "mean": [0.2860], "std": [0.3530], "class_names": list("0123456789"), "num_classes": 10, "metrics": {}}
    return from_model(m, meta)


def test_learned_allocation_exports_as_per_row_group_specs(mixed_deployable):
    by = {s.name: s for s in mixed_deployable.specs}
    qkv = by["blocks.0.attn.qkv"]
    assert qkv.weight.bits == tuple(MIXED_BITS["qkv.w"]) and qkv.weight.group_axis == -2
    assert qkv.weight.group_size == 32
    for g, b in enumerate(MIXED_BITS["qkv.w"]):
        rows = qkv.weight_int[32 * g: 32 * g + 32]
        lo, hi = qformat.qrange(b, True)
        assert rows.min() >= lo and rows.max() <= hi
    proj = by["blocks.1.attn.proj"]
    assert proj.weight.bits == (4, 3, 2) and proj.weight.group_axis == -1  # W_O columns of each head
    assert by["blocks.1.attn.proj"].input.bits == (2, 4, 3)  # head output: one width per head
    assert by["blocks.0.attn.attn_quant"].input.bits == (5, 3, 7) and not by["blocks.0.attn.attn_quant"].input.signed
    assert by["blocks.1.mlp.fc1"].weight.bits == 4 and by["blocks.0.mlp.fc2"].input.bits == 6


@pytest.mark.parametrize("fmt,target", [("qdq", "ort"), ("qdq", "trt10"), ("lowbit", "ort")])
def test_mixed_model_exports_with_parity(mixed_deployable, fmt, target):
    from onnx import numpy_helper

    from export.exporter import ParityOptions, build_graph, check_parity

    g = build_graph(mixed_deployable, fmt, target, log=lambda s: None)
    par = check_parity(mixed_deployable, g, fmt, ParityOptions(32, 1e-4, 1e-4, 1.0), log=lambda s: None)
    assert par.passed and par.mismatches == 0, par.line()
    nodes = g.ort.graph.node
    if fmt == "lowbit":
        packed = {n.name.split("/")[0]: n for n in nodes if n.op_type == qformat.LOWBIT_OP}
        attrs = {a.name: a for a in packed["blocks.0.attn.qkv"].attribute}
        assert numpy_helper.to_array(attrs["group_bits"].t).tolist() == MIXED_BITS["qkv.w"]
        assert attrs["group_size"].i == 32
    elif target == "trt10":  # INT4 storage where every group fits 4 bits (qkv of block 0: 2..4 bits)
        int4 = [t.name for t in g.ort.graph.initializer if t.data_type == 22]  # TensorProto.INT4
        assert any("blocks.0.attn.qkv" in n for n in int4), int4[:5]


def test_equal_head_widths_still_export_lowbit():
    """A learned run whose head-output widths came out equal (one width, one scale per head) is a deploy
    granularity model: lowbit exports it (W_O's input as exact Q/DQ), never "granularity=paper"."""
    from export.exporter import ParityOptions, build_graph, check_parity
    from train.deploy import from_model

    m = learned_model(budget=3).eval()
    for blk in m.blocks:
        set_bits(blk.attn.proj.a_quant, [4] * len(blk.attn.proj.a_quant.bit.value))
    calibrate(m, [test_images("vit_fmnist", 16)])
    convert(m)
    meta = {"model": "vit_fmnist", "quant": dict(m.qvit_quant_config), "input_size": [1, 28, 28],
            "mean": [0.2860], "std": [0.3530], "class_names": list("0123456789"), "num_classes": 10, "metrics": {}}
    dep = from_model(m, meta)
    proj = {s.name: s for s in dep.specs}["blocks.0.attn.proj"].input
    assert proj.bits == 4 and proj.scale.size > 1  # one width, a scale per head (repeated per channel)
    g = build_graph(dep, "lowbit", "ort", log=lambda s: None)
    par = check_parity(dep, g, "lowbit", ParityOptions(16, 1e-4, 1e-4, 1.0), log=lambda s: None)
    assert par.passed and par.mismatches == 0 and g.lowbit_nodes > 0, par.line()


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv,needle", [
    (["--method", "mp", "--bitops-budget", "1.5"], "--bitops-budget: must be in [2, 8]"),
    (["--method", "mp", "--bitops-budget", "8.5"], "--bitops-budget: must be in [2, 8]"),
    (["--method", "qvit-mp", "--search-ratio", "0"], "--search-ratio: must be in (0, 1]"),
    (["--method", "mp", "--search-ratio", "1.2"], "--search-ratio: must be in (0, 1]"),
    (["--method", "mp", "--bitops-weight", "-1"], "--bitops-weight: must be >= 0"),
    (["--method", "qvit", "--bitops-budget", "3"], "--bitops-budget belongs to the mixed-bit search"),
    (["--method", "baseline", "--no-switchable-scale"], "--no-switchable-scale belongs to the mixed-bit search"),
    (["--method", "mp", "--w-bits", "3"], "learns them under --bitops-budget"),
])
def test_bad_search_flags_are_one_error_line(expect_error, argv, needle):
    from train.cli import main

    expect_error(main, argv + ["--data", "synthetic", "--out", "/nonexistent/x"], needle)


def test_budget_defaults_to_bits_and_lands_in_the_config():
    from train.cli import parse_args

    args = parse_args(["--method", "qvit-mp", "--bits", "3", "--search-ratio", "0.7"])
    from train.config import mixed_settings

    d = mixed_settings(args)
    assert d["budget"] == 3.0 and d["search_ratio"] == 0.7 and d["switchable"] is True
    cfg = QuantConfig.for_method("qvit-mp", 3, mixed=d)
    assert cfg.irm and cfg.tag == "mp3" and cfg.mixed_bits.init_bits == 4.0


@pytest.mark.slow
def test_mixed_run_trains_reports_and_freezes(tmp_path):
    """A few real steps of --method mp: the bits move under the penalty, freeze, and the report is written."""
    from train.cli import main

    out = tmp_path / "run"
    rc = main(["--model", "vit_fmnist", "--data", "synthetic", "--method", "mp", "--bitops-budget", "2",
               "--bit-lr", "0.5", "--bitops-weight", "10", "--search-ratio", "0.5", "--fp-epochs", "1",
               "--epochs", "1", "--max-train-batches", "6", "--max-eval-batches", "1", "--batch-size", "16",
               "--calib-batches", "1", "--no-tensorboard", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "bits_report.json").read_text())
    assert rep["frozen"] and rep["budget_bits"] == 2
    widths = [w for a in rep["attention"] for k in ("q", "k", "v", "w_q") for w in a[k]]
    assert min(widths) == 2 and np.mean(widths) < 3  # the penalty pulled them below the start (budget + 1)
    assert (out / "bits_allocation.png").is_file() and (out / "bits_report.md").is_file()


def test_exported_files_are_named_by_the_budget():
    from qformat.formats import artifact_stem as stem

    assert stem("deit_s", QuantConfig.for_method("mp", 3, mixed={"budget": 2.5}).bits_summary(), "qdq") == \
        "deit_s_mp2.5.qdq"
    assert stem("deit_s", QuantConfig.for_method("qvit", 3).bits_summary(), "lowbit") == "deit_s_w3a3.lowbit"


def test_ablation_table_and_refusals(expect_error):
    from experiments import mp_ablation

    row = {"test_top1": 80.0, "ratio": 0.98, "bitops_g": 0.2}
    res = {"model": "vit_fmnist", "data": "fmnist", "bits": [4, 3], "fp_test": 90.0,
           "rows": {"lsq": {"4": row, "3": dict(row, test_top1=70.25, ratio=1.0)}, "mp": {"4": row}}}
    table = mp_ablation.markdown(res).splitlines()
    assert table[3] == "| Uniform LSQ+ (baseline) | 80.00 (0.98x) | 70.25 (1.00x) |"
    assert table[6] == "| Mixed search, switchable scale | 80.00 (0.98x) | – |"
    expect_error(mp_ablation.main, ["--rows", "lsq,bogus"], "--rows ['bogus'] unknown")
    expect_error(mp_ablation.main, ["--bits", "4,9"], "--bits must be 2..8")
