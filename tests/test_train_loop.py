"""The training loop end to end on tiny budgets: loss falls, resume is bit-identical, teacher reuse."""

import csv
import os

import pytest
import torch
from safetensors.torch import load_file

from train.cli import parse_args
from train.trainer import WarmupCosine, run

TINY = ["--data", "synthetic", "--batch-size", "16", "--max-eval-batches", "4", "--no-tensorboard",
        "--workers", "0", "--seed", "3"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fp_loss_falls(tmp_path):
    out = str(tmp_path / "fp")
    run(parse_args(TINY + ["--method", "fp", "--epochs", "3", "--max-train-batches", "16", "--lr", "2e-3",
                           "--warmup-epochs", "0.2", "--out", out]))
    rows = _rows(os.path.join(out, "metrics.csv"))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) * 0.8
    assert float(rows[-1]["val_top1"]) > 40.0  # 10 classes: chance is 10 %
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "last.state.pt"):
        assert os.path.isfile(os.path.join(out, name))


def _qvit(out, *extra):
    return parse_args(TINY + ["--method", "qvit", "--bits", "3", "--epochs", "2", "--fp-epochs", "1",
                              "--max-train-batches", "3", "--calib-batches", "1", "--out", out, *extra])


def test_resume_is_bit_identical(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run(_qvit(a))
    stopped = run(_qvit(b, "--stop-after-epochs", "1"))
    assert stopped.get("stopped")
    assert len(_rows(os.path.join(b, "metrics.csv"))) == 1
    run(_qvit(b, "--resume"))
    assert "fp-teacher: reusing" in capsys.readouterr().out  # the teacher from the first invocation
    wa, wb = load_file(os.path.join(a, "last.safetensors")), load_file(os.path.join(b, "last.safetensors"))
    assert wa.keys() == wb.keys()
    assert any("a_quant.scale" in k for k in wa)  # quantizer steps are part of the weights
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(os.path.join(a, "last.state.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "last.state.pt"), weights_only=True)
    assert sa["step"] == sb["step"] == 6 and sa["epoch"] == sb["epoch"] == 2
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])
    ra, rb = _rows(os.path.join(a, "metrics.csv")), _rows(os.path.join(b, "metrics.csv"))
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb]


def test_resume_refuses_other_run(tmp_path):
    from qformat.errors import UserError

    out = str(tmp_path / "r")
    run(parse_args(TINY + ["--method", "fp", "--epochs", "1", "--max-train-batches", "1", "--out", out]))
    with pytest.raises(UserError, match="--resume"):
        run(parse_args(TINY + ["--method", "fp", "--epochs", "1", "--max-train-batches", "1", "--out", out,
                               "--seed", "4", "--resume"]))


def test_param_groups_split_quantizers():
    from train.config import QuantConfig
    from train.models import create_model
    from train.qat import prepare
    from train.quant import quant_parameters
    from train.trainer import param_groups

    m = prepare(create_model("vit_fmnist"), QuantConfig.for_method("qvit", 4))
    groups = {g["name"]: g for g in param_groups(m, 1e-3, 0.05, 1e-4, 0.0)}
    assert {id(p) for p in groups["quant"]["params"]} == {id(p) for p in quant_parameters(m)}
    assert groups["quant"]["lr"] == 1e-4 and groups["quant"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable


def test_warmup_cosine():
    s = WarmupCosine(warmup_steps=4, total_steps=20, min_ratio=0.01)
    assert s(0) == pytest.approx(0.25) and s(3) == pytest.approx(1.0)
    assert s(4) == pytest.approx(1.0) and s(20) == pytest.approx(0.01)
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


def test_trained_checkpoint_converts(tmp_path):
    """A QAT checkpoint from the trainer rebuilds via load_converted and scores what the trainer logged."""
    from train.checkpoint import load_converted
    from train.data import build_loaders
    from train.evaluate import evaluate

    out = str(tmp_path / "q")
    run(parse_args(TINY + ["--method", "irm", "--bits", "4", "--epochs", "1", "--fp-epochs", "1",
                           "--max-train-batches", "3", "--calib-batches", "1", "--out", out]))
    model, meta = load_converted(os.path.join(out, "best.safetensors"))
    assert meta["method"] == "irm" and meta["bits"]["weight"] == 4 and meta["code_revision"]
    assert meta["class_names"] == [f"class_{i}" for i in range(10)] and meta["input_size"] == [1, 28, 28]
    ld = build_loaders("synthetic", meta["input_size"], meta["mean"], meta["std"], 16, seed=3)
    ev = evaluate(model, ld.val, torch.device("cpu"), max_batches=4)
    assert abs(ev["top1"] - meta["metrics"]["top1"]) <= 100.0 / 64 + 1e-6  # at most one of 64 images flips


def test_stop_and_resume_inside_teacher_phase(tmp_path):
    out = str(tmp_path / "t")
    args = TINY + ["--method", "dgd", "--epochs", "1", "--fp-epochs", "2", "--max-train-batches", "2",
                   "--calib-batches", "1", "--stop-after-epochs", "1", "--out", out]
    assert run(parse_args(args)) == {"stopped": True}
    assert not os.path.exists(os.path.join(out, "last.json"))  # QAT has not started
    run(parse_args(args + ["--resume"]))  # teacher epoch 2, then the (1-epoch) QAT phase
    assert [r["epoch"] for r in _rows(os.path.join(out, "teacher", "metrics.csv"))] == ["1", "2"]
    assert len(_rows(os.path.join(out, "metrics.csv"))) == 1
