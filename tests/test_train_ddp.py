"""DDP: two gloo processes on CPU via torchrun train a tiny model; only rank 0 writes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _top1_over_shards(path, meta, world=2, batches=2, batch_size=8):
    import torch

    from train.checkpoint import build_model, load_checkpoint, load_state
    from train.data import build_loaders

    sd, _ = load_checkpoint(path)
    model = build_model(meta)
    load_state(model, sd, path)
    model.eval()
    correct = seen = 0
    for rank in range(world):
        val = build_loaders("synthetic", meta["input_size"], meta["mean"], meta["std"], batch_size, seed=meta["seed"],
                            rank=rank, world_size=world).val
        for i, (x, y) in enumerate(val):
            if i >= batches:
                break
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
            seen += y.numel()
    assert seen == world * batches * batch_size
    return 100.0 * correct / seen


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train", "--data", "synthetic", "--method", "qvit", "--bits", "4", "--epochs", "1",
           "--fp-epochs", "1", "--max-train-batches", "3", "--max-eval-batches", "2", "--batch-size", "8",
           "--calib-batches", "1", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("qat epoch 1/1") == 1  # rank 0 alone reports
    for name in ("best.safetensors", "best.json", "last.state.pt", "metrics.csv", "teacher/best.safetensors"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "best.json").read_text())
    assert meta["world_size"] == 2 and meta["quant"]["w_bits"] == 4 and meta["step"] == 3
    # the reported top-1 is the all-reduced one: both ranks' validation shards, evaluated here again
    assert meta["metrics"]["top1"] == pytest.approx(_top1_over_shards(str(out / "best.safetensors"), meta), abs=1e-9)
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch, written once
    assert (out / "tb").is_dir()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    shutil.rmtree(out)
