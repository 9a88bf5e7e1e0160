"""A checkpoint is committed as one unit, --resume never mixes epochs, a rerun never silently replaces a run.

The kill tests interrupt the trainer at every file it renames into place (a hook in the writer),
then resume, and require the result to be bit-identical to an uninterrupted run; one test uses a
real SIGKILL between writing a temp file and renaming it, which leaves the temp file behind.
"""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qformat import io as qio
from qformat.errors import UserError
from qformat.lock import LOCK_NAME
from train import checkpoint as ckpt
from train.cli import parse_args
from train.models import create_model
from train.trainer import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--method", "fp", "--epochs", "2", "--batch-size", "8", "--max-train-batches", "2",
        "--max-eval-batches", "1", "--no-tensorboard", "--workers", "0", "--seed", "5"]


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way handles it."""


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the OMP_NUM_THREADS=1 subprocess below: bitwise equal runs
    yield
    torch.set_num_threads(n)
    qio.WRITE_HOOKS.clear()


def _fingerprint(out):
    """What an uninterrupted run leaves: final weights, state counters, metrics rows, best checkpoint."""
    w = load_file(os.path.join(out, "last.safetensors"))
    state = torch.load(os.path.join(out, "last.state.pt"), weights_only=True)
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        rows = [(r["epoch"], r["val_loss"], r["train_loss"]) for r in csv.DictReader(f)]
    best_sd, best_meta = ckpt.load_checkpoint(os.path.join(out, "best.safetensors"))
    assert best_meta["save_id"] == ckpt.header_meta(os.path.join(out, "best.safetensors"))["save_id"]
    assert ckpt.is_current(os.path.join(out, "last"), state["meta"]["save_id"])
    return ({k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in w.items()},
            (state["epoch"], state["step"], state["best_top1"]), rows,
            {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in best_sd.items()}, best_meta["epoch"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    events = []
    qio.WRITE_HOOKS.append(lambda event, path: events.append(os.path.basename(path)) if event == "committed" else 0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(parse_args(TINY + ["--out", out]))
    finally:
        qio.WRITE_HOOKS.clear()
        torch.set_num_threads(n)
    return out, events, _fingerprint(out)


def test_state_file_is_the_commit(reference):
    out, events, _ = reference
    # per epoch: best (new file), then the state that commits the epoch, then the copies derived from it
    assert events[:6] == ["best.safetensors", "best.json", "last.state.pt", "last.safetensors", "last.json",
                          "metrics.csv"]
    state = torch.load(os.path.join(out, "last.state.pt"), weights_only=True)
    assert {"model", "meta", "rows", "optimizer", "rng"} <= set(state) and len(state["rows"]) == 2


def _kill_at(k):
    """A write hook that 'kills' the process right after the k-th file was renamed into place."""
    seen = []

    def hook(event, path):
        if event == "committed":
            seen.append(path)
            if len(seen) == k:
                raise Killed(path)
    return hook


def test_kill_at_every_commit_then_resume_is_bit_identical(reference, tmp_path):
    _, events, want = reference
    for k in range(1, len(events) + 1):
        out = str(tmp_path / "k{}".format(k))
        qio.WRITE_HOOKS.append(_kill_at(k))
        with pytest.raises(Killed):
            run(parse_args(TINY + ["--out", out]))
        qio.WRITE_HOOKS.clear()
        run(parse_args(TINY + ["--out", out, "--resume"]))
        assert _fingerprint(out) == want, "killed after {} ({}th write)".format(events[k - 1], k)
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_real_sigkill_between_write_and_rename(reference, tmp_path, capsys):
    """SIGKILL with epoch 2's state complete in its temp file, not yet renamed: the temp file is left behind,
    --resume removes it and replays epoch 2 bit-identically."""
    _, _, want = reference
    out = str(tmp_path / "run")
    driver = ("import os, signal, sys\n"
              "from qformat import io\n"
              "n = []\n"
              "def hook(event, path):\n"
              "    if event == 'written' and path.endswith('last.state.pt'):\n"
              "        n.append(path)\n"
              "        if len(n) == 2:\n"
              "            os.kill(os.getpid(), signal.SIGKILL)\n"
              "io.WRITE_HOOKS.append(hook)\n"
              "from train.__main__ import main\n"
              "main(sys.argv[1:])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", driver] + TINY + ["--out", out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".last.state.pt.")
    assert torch.load(os.path.join(out, "last.state.pt"), weights_only=True)["epoch"] == 1
    capsys.readouterr()
    run(parse_args(TINY + ["--out", out, "--resume"]))
    assert "removed {}, left by an interrupted save".format(os.path.join(out, left[0])) in capsys.readouterr().err
    assert _fingerprint(out) == want
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_resume_refuses_a_mixed_set_and_advises_no_deletion(reference, tmp_path):
    """A state file from before checkpoints were one unit (no weights in it), one epoch behind last.safetensors."""
    out = str(tmp_path / "run")
    run(parse_args(TINY + ["--out", out, "--stop-after-epochs", "1"]))
    state = torch.load(os.path.join(out, "last.state.pt"), weights_only=True)
    legacy = {k: v for k, v in state.items() if k not in ("model", "meta", "rows")}
    ckpt.save_state(os.path.join(out, "last.state.pt"), legacy)
    ref_out = reference[0]
    for name in ("last.safetensors", "last.json"):  # epoch-2 weights beside the epoch-1 state
        with open(os.path.join(ref_out, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
            dst.write(src.read())
    def files():  # the lock file records who holds the folder: it is not part of the run
        return {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n != LOCK_NAME}
    before = files()
    with pytest.raises(UserError) as e:
        run(parse_args(TINY + ["--out", out, "--resume"]))
    msg = str(e.value)
    assert "mixed checkpoint set" in msg and "epoch 2" in msg and "epoch 1" in msg
    assert "best.safetensors, epoch 1, is intact" in msg and "delete" not in msg
    assert files() == before


def test_a_stale_sidecar_is_recognised_and_repaired(tmp_path, capsys):
    m = create_model("vit_fmnist")
    meta = {"model": "vit_fmnist", "num_classes": 10, "input_size": [1, 28, 28], "mean": [0.3], "std": [0.3],
            "class_names": list("abcdefghij"), "epoch": 1}
    ckpt.save_checkpoint(str(tmp_path / "best"), m, meta)
    old_json = (tmp_path / "best.json").read_text()
    ckpt.save_checkpoint(str(tmp_path / "best"), m, dict(meta, epoch=2))
    (tmp_path / "best.json").write_text(old_json)  # the kill came between the two renames
    assert ckpt.load_checkpoint(str(tmp_path / "best.safetensors"))[1]["epoch"] == 2
    assert "is from an earlier save" in capsys.readouterr().err
    assert ckpt.read_meta(str(tmp_path / "best.json"))["epoch"] == 2
    assert ckpt.repair_sidecar(str(tmp_path / "best")) and not ckpt.repair_sidecar(str(tmp_path / "best"))
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    edited = dict(json.loads((tmp_path / "best.json").read_text()), class_names=list("ABCDEFGHIJ"))
    (tmp_path / "best.json").write_text(json.dumps(edited))  # an edited sidecar of the same save still wins
    assert ckpt.load_checkpoint(str(tmp_path / "best"))[1]["class_names"][0] == "A"


def test_rerun_into_a_run_folder_refuses_force_replaces(reference, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY[:]
    args[args.index("--epochs") + 1] = "1"
    run(parse_args(args + ["--out", str(out)]))
    (out / "notes.txt").write_text("mine")
    snapshot = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(UserError, match=r"already holds a run \(epoch 1/1\).*--resume.*--force.*new --out"):
        run(parse_args(args + ["--out", str(out), "--lr", "1e-3"]))
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == snapshot
    with pytest.raises(UserError, match="--resume continues .* --force replaces"):
        parse_args(args + ["--out", str(out), "--resume", "--force"])
    with pytest.raises(UserError, match="lies inside --out .* which --force would delete"):
        run(parse_args(args + ["--out", str(out), "--force", "--checkpoint", str(out / "best.safetensors")]))
    capsys.readouterr()
    run(parse_args(args + ["--out", str(out), "--force", "--lr", "1e-3"]))
    assert "--force: removed the earlier run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"  # not ours: left alone
    assert ckpt.read_meta(str(out / "last.json"))["save_id"] != json.loads(snapshot["last.json"])["save_id"]
