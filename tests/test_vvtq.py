"""VVTQ: module-dependent scale gradients against their closed form, OBR on a hand example, the λ
schedule, the oscillation counter on constructed sequences, SDAM, and the switches end to end
(train -> checkpoint -> export with parity in both formats)."""

import csv
import json
import math
import os
import statistics

import numpy as np
import pytest
import torch

from train.cli import main as train_main
from train.cli import parse_args
from train.config import QuantConfig, VvtqConfig
from train.models import create_model
from train.qat import prepare
from train.quant import calibrate
from train.quantizers import ActQuantizer, WeightQuantizer
from train.trainer import run
from train.vvtq import OscillationTracker, obr_lambda, obr_layer, obr_loss, oscillation_step, quantized_layers, sdam

# ----------------------------------------------------------------------------- module-dependent gradient scale


def _lsq_ds(w, s, qmin, qmax, r):
    """Closed form of d(sum r * fake_quant(w))/ds per element, before the gradient scale: round(v) - v inside
    the grid, the bound outside (LSQ)."""
    v = w / s
    inside = (v >= qmin) & (v <= qmax)
    return r * np.where(inside, np.round(np.clip(v, qmin, qmax)) - v, np.clip(v, qmin, qmax))


@pytest.mark.parametrize("scale_per", ["row", "module"])
def test_module_scale_gradient_is_the_closed_form(scale_per):
    torch.manual_seed(0)
    rows, k, mrows, bits = 6, 5, 2, 3  # three modules of two rows
    w = torch.randn(rows, k) * 0.3
    r = torch.randn(rows, k)
    q = WeightQuantizer(bits, rows, module_rows=mrows, grad_norm="l1", scale_per=scale_per)
    q.initialize(w)
    with torch.no_grad():
        q.scale.mul_(torch.linspace(0.7, 1.3, q.scale.numel()).reshape(-1, 1))  # put a few weights outside the grid
    (q(w) * r).sum().backward()
    qp = 2 ** (bits - 1) - 1
    s_row = q.row_scale().detach().numpy()
    ds = _lsq_ds(w.numpy(), s_row, -qp - 1, qp, r.numpy())
    l1 = np.abs(w.numpy()).reshape(rows // mrows, -1).sum(1)  # ||w_m||_1 of each module
    g = 1.0 / np.sqrt(qp * np.repeat(l1, mrows))  # VVTQ: 1 / sqrt(Qp ||w_m||_1), per row of module m
    want = (ds * g[:, None]).sum(1)
    if scale_per == "module":  # the rows of a module share one step: their gradients add up
        want = want.reshape(-1, mrows).sum(1)
    assert np.allclose(q.scale.grad.numpy().reshape(-1), want, rtol=1e-5, atol=1e-7)
    lsq = WeightQuantizer(bits, rows)  # and LSQ keeps 1 / sqrt(N Qp)
    lsq.scale.data.copy_(torch.from_numpy(s_row))
    lsq.initialized.fill_(True)
    (lsq(w) * r).sum().backward()
    assert np.allclose(lsq.scale.grad.numpy().reshape(-1), ds.sum(1) / math.sqrt(w.numel() * qp), rtol=1e-5,
                       atol=1e-7)


def test_per_head_activation_scale_gradient_uses_each_heads_l1_per_sample():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 2)  # [B, H, N, d]
    r = torch.randn_like(x)
    q = ActQuantizer(3, signed=True, grouping="head", groups=3, grad_norm="l1")
    q.initialize(x)
    (q(x) * r).sum().backward()
    s = q.scale.detach().reshape(1, 3, 1, 1).numpy()
    z = torch.round(q.zero_point.detach()).reshape(1, 3, 1, 1).numpy()
    ds = _lsq_ds(x.numpy(), s, -4 - z, 3 - z, r.numpy())
    l1 = np.abs(x.numpy()).sum(axis=(0, 2, 3)) / x.shape[0]
    want = ds.sum(axis=(0, 2, 3)) / np.sqrt(3 * l1)
    assert np.allclose(q.scale.grad.reshape(-1).numpy(), want, rtol=1e-5, atol=1e-7)


def test_module_scales_reach_the_quantizers_per_module():
    m = create_model("vit_fmnist")
    prepare(m, QuantConfig(w_bits=3, a_bits=3, module_scales=True, weight_scale="module"))
    qkv, fc1 = m.blocks[0].attn.qkv.w_quant, m.blocks[0].mlp.fc1.w_quant
    assert (qkv.n_modules, qkv.module_rows, qkv.scale.shape[0]) == (9, 32, 9)  # q, k, v of 3 heads
    assert (fc1.n_modules, fc1.scale.shape[0]) == (1, 1)
    assert m.blocks[0].attn.q_quant.grad_norm == "l1" and m.blocks[0].attn.q_quant.grouping == "head"
    assert m.blocks[0].attn.qkv.a_quant.grad_norm == "lsq"  # Linear inputs keep LSQ+
    plain = create_model("vit_fmnist")
    prepare(plain, QuantConfig(w_bits=3, a_bits=3))
    wq = plain.blocks[0].attn.qkv.w_quant
    assert wq.grad_norm == "lsq" and wq.scale.shape[0] == 288


# ----------------------------------------------------------------------------- OBR


class _Fixed(WeightQuantizer):
    """A 2-bit quantizer with given per-row steps."""

    def __init__(self, scales, module_rows=None):
        super().__init__(2, len(scales), module_rows=module_rows)
        self.scale.data.copy_(torch.tensor(scales).reshape(-1, 1))
        self.initialized.fill_(True)


def test_obr_on_a_hand_example_skips_bins_with_two_weights_or_fewer():
    # 2 bits: codes -2..1. Step 1 per row. Row 0: code 0 holds {0.1, 0.2, -0.1}; code 1 holds {0.9, 1.0 (1.3 clipped),
    # 0.6}. Row 1: code 0 holds {0.4, 0, 0.2}; code -1 holds {-0.6, -1.4} (two: skipped); code 1 holds {1.0} (skipped).
    w = torch.tensor([[0.1, 0.2, -0.1, 0.9, 1.3, 0.6], [0.4, -0.6, 0.0, 0.2, -1.4, 2.0]], requires_grad=True)
    clipped = [[0.1, 0.2, -0.1, 0.9, 1.0, 0.6], [0.4, -0.6, 0.0, 0.2, -1.4, 1.0]]
    codes = [[0, 0, 0, 1, 1, 1], [0, -1, 0, 0, -1, 1]]
    err = [c - q for rc, rq in zip(clipped, codes) for c, q in zip(rc, rq)]
    variances = [statistics.variance([0.1, 0.2, -0.1]), statistics.variance([0.9, 1.0, 0.6]),
                 statistics.variance([0.4, 0.0, 0.2])]
    one_module = math.sqrt(sum(e * e for e in err)) + sum(variances)
    assert obr_layer(w, _Fixed([1.0, 1.0])).item() == pytest.approx(one_module, rel=1e-5)
    per_row = sum(math.sqrt(sum(e * e for e in err[i * 6:(i + 1) * 6])) for i in range(2)) + sum(variances)
    assert obr_layer(w, _Fixed([1.0, 1.0], module_rows=1)).item() == pytest.approx(per_row, rel=1e-5)
    obr_layer(w, _Fixed([1.0, 1.0])).backward()
    assert w.grad[1, 5] == 0 and w.grad[0, 4] == 0  # clipped weights: no pull from inside the grid
    assert w.grad[0, 0] != 0


def test_obr_bins_are_per_row_intervals_not_codes_pooled_over_rows():
    # every weight has code 0, but row 0's bin is 0.1 wide and row 1's is 1.0 wide: two bins, not one
    r0, r1 = [0.01, 0.02, -0.01], [0.3, 0.4, -0.2]
    w = torch.tensor([r0, r1])
    dist = math.sqrt(sum(v * v for v in r0 + r1))  # w_q = 0 everywhere
    per_row = dist + statistics.variance(r0) + statistics.variance(r1)
    pooled = dist + statistics.variance(r0 + r1)
    got = obr_layer(w, _Fixed([0.1, 1.0])).item()
    assert got == pytest.approx(per_row, rel=1e-5) and abs(got - pooled) > 1e-3


def test_obr_loss_is_zero_on_weights_at_their_codes():
    m = create_model("vit_fmnist")
    prepare(m, QuantConfig(w_bits=2, a_bits=4))
    calibrate(m, [torch.randn(4, 1, 28, 28)])
    with torch.no_grad():
        for _, layer in quantized_layers(m):
            s = layer.w_quant._scale_like(layer.weight, layer.w_quant.row_scale())
            layer.weight.copy_(layer.w_quant.integers(layer.weight).float() * s)
    assert obr_loss(m).item() < 1e-3  # only the eps under the square roots remains


def test_lambda_schedule_is_zero_then_half_a_cosine_to_lambda():
    total, lam = 101, 0.01
    values = [obr_lambda(t, total, lam, 0.25) for t in range(total)]
    assert all(v == 0.0 for v in values[:26]) and values[26] > 0  # 0 until 25 % of the steps
    assert values[-1] == pytest.approx(lam)
    assert values[63] == pytest.approx(lam / 2, rel=2e-2)  # half-way through the ramp
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert obr_lambda(50, 100, 0.0) == 0.0 and obr_lambda(0, 10, 1.0, 0.0) == 0.0


# ----------------------------------------------------------------------------- oscillation and SDAM


def _run(seq, momentum=0.5):
    codes = torch.tensor(seq, dtype=torch.int8).T  # [steps, weights]
    prev, last, freq = codes[0].clone(), torch.zeros_like(codes[0]), torch.zeros(codes.shape[1])
    events = [oscillation_step(prev, last, freq, c, momentum).tolist() for c in codes[1:]]
    return np.array(events, dtype=int).T, freq


def test_oscillation_counter_on_constructed_sequences():
    events, freq = _run([
        [0, 1, 0, 1, 0, 1],  # back and forth between two adjacent codes: every change after the first
        [0, 1, 2, 3, 3, 3],  # a drift: never
        [2, 2, 2, 2, 2, 2],  # static: never
        [0, 1, 1, 1, 0, 0],  # one reversal after a pause (t_prev is the last change, Eq. 10)
        [0, -1, -1, -2, -1, -1],  # down, down, up: one
    ])
    assert events.tolist() == [[0, 1, 1, 1, 1], [0] * 5, [0] * 5, [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]
    assert freq[0] == pytest.approx(0.5 + 0.25 + 0.125 + 0.0625)  # EMA of the events, m = 0.5
    assert freq[3] == pytest.approx(0.25) and freq[1] == 0 and freq[2] == 0


def test_tracker_rate_counts_oscillating_weights():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([[0.2, 1.2, -1.0, 0.0]]))
            self.w_quant = _Fixed([1.0])

    layer = Layer()
    tracker = OscillationTracker([("l", layer)], momentum=0.1, threshold=0.05)
    tracker.update()
    for step in range(6):  # weight 0 flips 0 <-> 1; weight 1 sits at 1; weight 2 drifts -1 -> -2 once
        with torch.no_grad():
            layer.weight[0, 0] = 0.7 if step % 2 == 0 else 0.2
            layer.weight[0, 2] = -1.0 if step < 3 else -1.7
        tracker.update()
    assert tracker.rate() == pytest.approx(25.0)
    state = tracker.state_dict()
    again = OscillationTracker([("l", layer)], 0.1, 0.05)
    again.load_state_dict(state, torch.device("cpu"))
    assert again.rate() == tracker.rate()


def test_sdam_is_the_std_of_module_absolute_means():
    m = create_model("vit_fmnist")
    prepare(m, QuantConfig(w_bits=4, a_bits=4, module_scales=True))
    with torch.no_grad():
        for i, (_, layer) in enumerate(quantized_layers(m, "block")):
            layer.weight.fill_(0.01 * (i + 1))  # every module of layer i has mean |w| = 0.01 (i + 1)
    means = []
    for i, (_, layer) in enumerate(quantized_layers(m, "block")):
        means += [0.01 * (i + 1)] * layer.w_quant.n_modules
    assert sdam(m) == pytest.approx(statistics.stdev(means), rel=1e-5)


# ----------------------------------------------------------------------------- the switches, end to end

TINY = ["--data", "synthetic", "--batch-size", "16", "--max-eval-batches", "2", "--no-tensorboard", "--workers", "0",
        "--seed", "5", "--calib-batches", "1"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def vvtq_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vvtq") / "run")
    run(parse_args(TINY + ["--method", "vvtq", "--bits", "2", "--epochs", "2", "--fp-epochs", "1",
                           "--max-train-batches", "4", "--obr-start", "0", "--weight-scale", "module", "--out", out]))
    return out


def test_vvtq_run_logs_oscillation_sdam_and_obr(vvtq_run):
    rows = _rows(os.path.join(vvtq_run, "metrics.csv"))
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= float(r["osc_rate"]) <= 100.0 and float(r["sdam"]) > 0
        assert float(r["train_ce"]) == 0.0 and float(r["train_kd"]) > 0  # VVTQ distils with KD alone
    assert float(rows[-1]["obr_lambda"]) == pytest.approx(0.01)
    assert float(rows[-1]["train_obr"]) > 0


def test_vvtq_switches_are_stored_in_the_checkpoint(vvtq_run):
    from train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(os.path.join(vvtq_run, "last.safetensors"))
    assert meta["method"] == "vvtq" and meta["quant"]["module_scales"] and meta["quant"]["weight_scale"] == "module"
    assert meta["vvtq"]["obr"] and meta["vvtq"]["obr_lambda"] == 0.01 and meta["vvtq"]["obr_start"] == 0.0
    assert meta["distill"]["ce_weight"] == 0.0 and not meta["distill"]["dgd"]


@pytest.mark.parametrize("fmt", ["qdq", "lowbit"])
def test_module_scales_export_exactly_with_parity(vvtq_run, tmp_path, fmt, fmnist_dir):
    """One learned step per module (q, k, v of each head) reaches the ONNX as per-row scales, exactly."""
    import onnx
    from onnx import numpy_helper

    from export.cli import main as export_main
    from train.checkpoint import load_checkpoint

    assert export_main(["--checkpoint", os.path.join(vvtq_run, "last.safetensors"), "--format", fmt, "--target", "ort",
                        "--out", str(tmp_path), "--parity-n", "64"]) == 0
    side = json.loads((tmp_path / f"vit_fmnist_w2a2.{fmt}.json").read_text())
    assert side["parity"]["passed"] and side["parity"]["mismatches"] == 0 and side["quant"]["module_scales"]
    sd, _ = load_checkpoint(os.path.join(vvtq_run, "last.safetensors"))
    learned = sd["blocks.1.attn.qkv.w_quant.scale"].reshape(-1).numpy()  # 9 modules
    graph = onnx.load(str(tmp_path / f"vit_fmnist_w2a2.{fmt}.onnx"))
    if fmt == "qdq":  # a DequantizeLinear scale initializer
        inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
        rows = next(v for k, v in inits.items() if k.startswith("blocks.1.attn.qkv") and "weight_scale" in k)
    else:  # an attribute of the packed low-bit node
        node = next(n for n in graph.graph.node if n.name == "blocks.1.attn.qkv/QvitLowBitLinear")
        attr = next(a for a in node.attribute if a.name == "weight_scale")
        rows = numpy_helper.to_array(attr.t) if attr.type == onnx.AttributeProto.TENSOR else np.array(attr.floats)
    assert np.array_equal(rows.reshape(-1).astype(np.float32), np.repeat(learned, 32).astype(np.float32))


def test_resume_keeps_the_oscillation_state(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = TINY + ["--method", "vvtq", "--bits", "3", "--epochs", "2", "--fp-epochs", "1", "--max-train-batches", "3",
                     "--obr-start", "0"]
    run(parse_args(common + ["--out", a]))
    run(parse_args(common + ["--out", b, "--stop-after-epochs", "1"]))
    run(parse_args(common + ["--out", b, "--resume"]))
    ra, rb = _rows(os.path.join(a, "metrics.csv")), _rows(os.path.join(b, "metrics.csv"))
    assert [r["osc_rate"] for r in ra] == [r["osc_rate"] for r in rb]
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb]


@pytest.mark.parametrize("argv,needle", [
    (["--method", "fp", "--obr"], "--obr needs a quantized --method"),
    (["--method", "vvtq", "--obr-lambda", "-1"], "--obr-lambda"),
    (["--method", "vvtq", "--obr-start", "1"], "--obr-start"),
    (["--method", "vvtq", "--osc-momentum", "0"], "--osc-momentum"),
    (["--method", "vvtq", "--weight-scale", "head"], "--weight-scale"),
    (["--method", "vvtq", "--multicrop-kd", "/nonexistent/store", "--teacher", "x.safetensors"],
     "no soft-label store there"),
])
def test_bad_vvtq_flags_are_one_error_line(expect_error, argv, needle, tmp_path):
    expect_error(train_main, argv + ["--out", str(tmp_path / "r")], needle)


def test_vvtq_config_ranges():
    with pytest.raises(Exception, match="obr_start"):
        VvtqConfig(obr_start=1.5)
    assert VvtqConfig.for_method("vvtq").obr and not VvtqConfig.for_method("qvit").obr
    assert VvtqConfig.for_method("fp") is None
    assert QuantConfig.for_method("vvtq", 3).module_scales and not QuantConfig.for_method("qvit", 3).module_scales


def test_vvtq_ablation_rows_and_refusals(expect_error, tmp_path):
    from experiments.vvtq_ablation import ROWS, markdown
    from experiments.vvtq_ablation import main as ablation_main

    assert [k for k in ROWS] == ["lsqkd", "vvtq", "vvtq-mckd", "vvtq-ms", "vvtq-obr", "qvit", "vvtq+qvit"]
    for key, (_, flags) in ROWS.items():  # every row is a valid command line of python -m train
        args = parse_args([f.replace("{store}", "s") for f in flags] + ["--bits", "3"])
        on = {"obr": args.obr, "ms": args.module_scales, "mckd": args.multicrop_kd}
        if key.startswith("vvtq-"):
            assert on[key[5:]] is False or (key == "vvtq-mckd" and on["mckd"] is None)
    res = {"bits": [2], "rows_order": ["vvtq"], "rows": {"vvtq": {"2": {"val_top1": 80.0, "test_top1": 79.5,
                                                                         "osc_rate": 1.25, "sdam": 0.012}}}}
    assert "| VVTQ | 80.00 / 79.50 | 1.25 | 1.20e-02 |" in markdown(res)
    teacher = str(tmp_path / "t.safetensors")
    expect_error(ablation_main, ["--teacher", teacher, "--rows", "vvtq,nope"], "unknown --rows ['nope']")
    expect_error(ablation_main, ["--teacher", teacher], "does not exist")
