"""Nothing lost, nothing silent (2): one test per failure class, with real faults.

Resume cannot drift (every flag hashed) / one writer per folder (flock) / every output atomic under
injected ENOSPC and EIO (os.write, os.fsync) and a video writer that writes nothing / path limits of
every written file / one door for user files / sweeps keep what they measured.
(The non-finite guard of exported graphs: tests/test_runtime_inputs.py.)
"""

import errno
import json
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import make_toy_model

from qformat import io as qio
from qformat import lock
from qformat.errors import OutputError, UserError
from qformat.paths import check_out_dir, check_out_file
from train import checkpoint as ckpt
from train.cli import parse_args
from train.trainer import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--method", "fp", "--epochs", "2", "--batch-size", "8", "--max-train-batches", "2",
        "--max-eval-batches", "1", "--no-tensorboard", "--workers", "0", "--seed", "5"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- 1. resume cannot drift

def _with(argv, flag, value):
    """``argv`` with ``flag`` set to ``value`` (replaced where it is there, added where not)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


def test_resume_refuses_every_changed_flag_and_allows_the_listed_ones(tmp_path, capsys):
    out = str(tmp_path / "run")
    run(parse_args(TINY + ["--out", out, "--stop-after-epochs", "1"]))
    before = os.path.getmtime(os.path.join(out, "last.state.pt"))
    for flag, value, diff in (("--lr", "1e-3", "--lr 0.0005 -> 0.001"),
                              ("--max-train-batches", "1", "--max-train-batches 2 -> 1"),
                              ("--smoothing", "0.1", "--smoothing 0.0 -> 0.1")):
        argv = _with(TINY, flag, value) + ["--out", out, "--resume"]
        with pytest.raises(UserError, match="started with other flags") as e:
            run(parse_args(argv))
        assert diff in str(e.value) and "\n" not in str(e.value)
    assert os.path.getmtime(os.path.join(out, "last.state.pt")) == before  # refused before any work
    # the allow-list: workers, stop-after-epochs, logging may differ
    run(parse_args(TINY + ["--out", out, "--resume", "--workers", "1"]))
    assert torch.load(os.path.join(out, "last.state.pt"), weights_only=True)["epoch"] == 2


def test_a_run_saved_before_the_hash_is_compared_on_what_it_has(tmp_path, capsys):
    out = str(tmp_path / "run")
    run(parse_args(TINY + ["--out", out, "--stop-after-epochs", "1"]))
    state = torch.load(os.path.join(out, "last.state.pt"), weights_only=True)
    del state["meta"]["run_config"], state["meta"]["run_config_hash"]
    ckpt.save_state(os.path.join(out, "last.state.pt"), state)
    ckpt.save_checkpoint(os.path.join(out, "last"), state["model"], state["meta"])
    capsys.readouterr()
    run(parse_args(TINY + ["--out", out, "--resume"]))
    err = capsys.readouterr().err
    assert "saved before runs recorded their full configuration" in err
    with pytest.raises(UserError, match="epochs"):  # what an old run has is still compared
        run(parse_args(_with(TINY, "--epochs", "3") + ["--out", out, "--resume"]))


# ----------------------------------------------------------------------------- 2. one writer per folder

def _holder(folder, inside=True):
    """A process that holds ``folder``'s lock until killed."""
    code = ("import sys, time\nfrom qformat import lock\nlock.hold(sys.argv[1], inside=sys.argv[2] == '1')\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, folder, "1" if inside else "0"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    holder = _holder(out)
    try:
        with pytest.raises(UserError, match=r"--out .* is in use by pid {} on ".format(holder.pid)):
            run(parse_args(TINY + ["--out", out, "--epochs", "1"]))
        assert ckpt.run_files(out) == []  # the refused writer wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run(parse_args(TINY + ["--out", out, "--epochs", "1"]))  # a dead holder's lock is gone with it
    assert "last.state.pt" in os.listdir(out)
    lock.hold(out)  # this process took and gave back the lock; taking it again works (and is re-entrant)
    lock.hold(out)
    lock.release(out)


def test_export_and_demo_outputs_have_one_writer(tmp_path, demo_model, frames, expect_error, tiny_checkpoint):
    from export.cli import main as export_main
    from runtime import demo

    out = str(tmp_path / "artifacts")
    holder = _holder(out)
    try:
        expect_error(export_main, ["--checkpoint", tiny_checkpoint, "--parity-n", "0", "--out", out],
                     "is in use by pid {}".format(holder.pid))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    video = str(tmp_path / "v.avi")
    holder = _holder(video, inside=False)
    try:
        expect_error(demo.main, ["--onnx", demo_model, "--headless", "--source", frames, "--out", video],
                     "is in use by pid {}".format(holder.pid))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not os.path.exists(video)


# ----------------------------------------------------------------------------- 3. every output atomic

def _fault(monkeypatch, name, err, after=0):
    """Make ``os.<name>`` fail with ``err`` after ``after`` successful calls."""
    real, calls = getattr(os, name), []

    def failing(*a):
        calls.append(1)
        if len(calls) > after:
            raise OSError(err, os.strerror(err))
        return real(*a)
    monkeypatch.setattr(os, name, failing)


@pytest.mark.parametrize("name,err,after", [("write", errno.ENOSPC, 1), ("fsync", errno.EIO, 0)])
def test_a_write_fault_keeps_the_previous_file(tmp_path, monkeypatch, name, err, after):
    path = tmp_path / "model.onnx"
    qio.atomic_write(str(path), b"old model")
    big = bytes(range(256)) * 64
    real_write = os.write
    if name == "write":  # short writes: the rest must be written, not lost
        monkeypatch.setattr(os, "write", lambda fd, b: real_write(fd, bytes(b)[:1000]))
        qio.atomic_write(str(path), big)
        assert path.read_bytes() == big
        qio.atomic_write(str(path), b"old model")
    _fault(monkeypatch, name, err, after)
    with pytest.raises(OutputError) as e:
        qio.atomic_write(str(path), big)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith("cannot write {}: {}".format(path, os.strerror(err))) and "previous file is unchanged" in msg
    assert path.read_bytes() == b"old model" and os.listdir(tmp_path) == ["model.onnx"]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return make_toy_model(tmp_path_factory.mktemp("m"), "toy_w4a4.qdq")


@pytest.fixture
def frames(tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / "f{}.png".format(i)), np.full((40, 40, 3), 60 * i, np.uint8))
    return str(src)


def _demo(model, source, out, *extra):
    from runtime import demo

    return demo.run(demo.parse_args(["--onnx", model, "--headless", "--source", source, "--out", out] + list(extra)),
                    log=lambda *a: None)


def test_a_video_the_writer_did_not_write_keeps_the_previous_one(demo_model, frames, tmp_path, monkeypatch):
    out = str(tmp_path / "v.avi")
    _demo(demo_model, frames, out)
    good = open(out, "rb").read()
    assert len(good) > 0 and cv2.VideoCapture(out).read()[0]

    class FullDisk:  # what OpenCV does on a full disk: opens, accepts frames, writes nothing usable
        def __init__(self, path, *a):
            open(path, "wb").close()

        def isOpened(self):
            return True

        def write(self, img):
            pass

        def release(self):
            pass
    monkeypatch.setattr(cv2, "VideoWriter", FullDisk)
    with pytest.raises(OutputError, match=r"cannot write .*v\.avi: the video writer produced no data for 3 "
                                          r"frame\(s\).*previous video is unchanged"):
        _demo(demo_model, frames, out)
    assert open(out, "rb").read() == good
    assert not [n for n in os.listdir(tmp_path) if n.endswith(qio.TEMP_SUFFIX)]


def test_a_png_folder_is_replaced_whole_or_refused(demo_model, frames, tmp_path, monkeypatch):
    out = tmp_path / "pngs"
    out.mkdir()
    (out / "old_frame.png").write_bytes(b"an earlier run")
    with pytest.raises(UserError, match="already holds files: --force replaces the whole folder"):
        _demo(demo_model, frames, str(out))
    _fault(monkeypatch, "write", errno.ENOSPC, after=2)  # the 2nd PNG hits a full disk
    with pytest.raises(OutputError, match="No space left on device"):
        _demo(demo_model, frames, str(out), "--force")
    monkeypatch.undo()
    assert os.listdir(out) == ["old_frame.png"]  # the earlier folder, untouched
    _demo(demo_model, frames, str(out), "--force")
    assert sorted(os.listdir(out)) == ["f0.png", "f1.png", "f2.png"]  # replaced as a whole: no leftover frame
    assert not [n for n in os.listdir(tmp_path) if n.endswith(qio.TEMP_SUFFIX)]


# ----------------------------------------------------------------------------- 4. path limits of every file

def _long_path(base, total):
    """A path under ``base`` of ``total`` bytes, in components of at most 200 bytes (each legal)."""
    parts, left = [], total - len(os.fsencode(str(base))) - 1
    while left > 0:
        n = min(200, left)
        if left - n == 1:  # never leave a 0-byte component
            n -= 2
        parts.append("d" * n)
        left -= n + 1
    return os.path.join(str(base), *parts)


def test_every_written_path_fits_the_file_systems_limit(tmp_path):
    limit = os.pathconf(str(tmp_path), "PC_PATH_MAX")
    out = _long_path(tmp_path, limit - 40)  # the folder is legal; teacher/.last.state.pt.<pid>-<rand>.tmp is not
    assert len(os.fsencode(out)) < limit
    with pytest.raises(UserError, match=r"the file teacher.* would be a \d+-byte path, over this system's limit"):
        run(parse_args(TINY + ["--out", out]))
    assert not os.path.exists(os.path.join(str(tmp_path), "d" * 200))  # refused before anything was created
    check_out_dir(_long_path(tmp_path, limit - 200), "--out", files=["model.json"])  # what fits is accepted
    with pytest.raises(UserError, match="temporary name"):
        check_out_file(os.path.join(_long_path(tmp_path, limit - 12), "b.json"), "--json")


def test_export_checks_its_files_before_tracing(tiny_checkpoint, tmp_path, capsys):
    from export.cli import main

    limit = os.pathconf(str(tmp_path), "PC_PATH_MAX")
    out = _long_path(tmp_path, limit - 30)
    with pytest.raises(SystemExit):
        main(["--checkpoint", tiny_checkpoint, "--out", out, "--parity-n", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity-failed.onnx" in err[0] and "traced" not in err[0]


# ----------------------------------------------------------------------------- 5. one door for user files

def test_every_reader_names_what_a_wrong_file_is(tmp_path, demo_model, expect_error, tiny_checkpoint):
    from experiments import ort_compare
    from runtime import bench, build, demo
    from runtime.backends import open_backend

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about the run\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(open(demo_model, "rb").read()[:100])
    for fn, argv in ((bench.main, ["--onnx", str(notes)]), (build.main, ["--onnx", str(notes), "--print-only"]),
                     (ort_compare.main, ["--fp32", str(notes)]), (demo.main, ["--onnx", str(notes), "--headless",
                                                                              "--out", str(tmp_path / "o")])):
        expect_error(fn, argv, "notes.txt is not a readable ONNX model: it is a text file")
    expect_error(ort_compare.main, ["--fp32", str(empty)], "is not a readable ONNX model: it is an empty file")
    expect_error(ort_compare.main, ["--fp32", str(trunc)], "is not a readable ONNX model")
    expect_error(ort_compare.main, ["--fp32", demo_model], "it is a quantized graph, not an FP32 baseline")
    with pytest.raises(UserError, match="notes.txt is not a readable checkpoint: it is a text file"):
        ckpt.load_checkpoint(str(notes))
    with pytest.raises(UserError, match="is not a readable checkpoint: it is an ONNX model"):
        ckpt.load_checkpoint(_copy(demo_model, tmp_path / "model.ckpt"))
    with pytest.raises(UserError, match="runs a TensorRT engine and .* is an ONNX model"):
        open_backend("trt", demo_model)
    with pytest.raises(UserError, match="is not a readable ONNX model: it is a checkpoint"):
        open_backend("ort", _copy(tiny_checkpoint, tmp_path / "weights.onnx"))


def _copy(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    with open(str(dst), "wb") as f:
        f.write(data)
    return str(dst)


# ----------------------------------------------------------------------------- 6. sweeps keep what they measured

def test_a_failed_sweep_point_keeps_the_measured_ones(demo_model, tmp_path, capsys, monkeypatch):
    from runtime import backends, bench

    real = backends.OrtBackend._run

    def oom_at_4(self, x):
        if x.shape[0] == 4:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory\nmore lines")
        return real(self, x)
    monkeypatch.setattr(backends.OrtBackend, "_run", oom_at_4)
    out = tmp_path / "sweep.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--onnx", demo_model, "--batch", "1,2,4,8", "--iters", "3", "--warmup", "1", "--threads", "1",
                    "--json", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b4 failed (RuntimeError: [ONNXRuntimeError]" in err[0] and "2 point(s) measured" in err[0]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["batch"], r["status"]) for r in runs] == [(1, "ok"), (2, "ok"), (4, "failed"), (8, "skipped")]
    backend = backends.open_backend("ort", demo_model)
    with pytest.raises(UserError, match=r"empty input batch \(0 images\)"):
        backend.run(np.zeros((0, 3, 32, 32), np.float32))
    backend.close()


# ----------------------------------------------------------------------------- 8. no silent choices

def _retarget(onnx_path, target):
    side = onnx_path[:-len(".onnx")] + ".json"
    meta = json.loads(open(side).read())
    meta["target"] = target
    qio.write_json(side, meta)


def test_every_choice_is_said(tmp_path, capsys, expect_error):
    from export.cli import main as export_main
    from runtime import build

    export_main(["--model", "vit_fmnist", "--bits", "4", "--format", "woq", "--target", "orin-jp6", "--parity-n", "0",
                 "--out", str(tmp_path / "woq")])
    err = capsys.readouterr().err
    assert "--format woq at opset 17 stores the weights" in err and "add --opset 21 for INT4" in err
    export_main(["--model", "vit_fmnist", "--bits", "4", "--format", "qdq", "--target", "tx2", "--parity-n", "0",
                 "--out", str(tmp_path / "tx2")])
    assert "--target tx2 has no fast INT8" in capsys.readouterr().err
    # build --print-only plans what the real build would do, and says what it would say
    qdq = make_toy_model(tmp_path / "q", "toy_w4a4.qdq")
    _retarget(qdq, "tx2")
    expect_error(build.main, ["--onnx", qdq, "--print-only"], "no fast INT8")
    low = make_toy_model(tmp_path / "l", "toy_w4a4.lowbit", fmt="lowbit")
    assert build.main(["--onnx", low, "--print-only"]) == 0
    out = capsys.readouterr().out
    assert "exported for ONNX Runtime" in out and "the build needs its plugin" in out
    _retarget(low, "tx2")
    assert build.main(["--onnx", low, "--print-only", "--plugins", "x.so"]) == 0
    out = capsys.readouterr().out
    assert "FP16-only GPU of --target tx2" in out and "FP16 engine + low-bit weight plugins" in out
    assert "the build needs its plugin" not in out


def test_capped_validation_of_a_class_sorted_folder_sees_every_class(tmp_path):
    from train.data import build_loaders

    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(4):
                cv2.imwrite(str(d / "{}.png".format(i)), np.full((8, 8, 3), 40 * i, np.uint8))
    loaders = build_loaders("imagefolder", (3, 8, 8), (0.5,) * 3, (0.5,) * 3, 4, data_dir=str(tmp_path), workers=0)
    first = next(iter(loaders.val))[1].tolist()
    assert len(set(first)) > 1  # ImageFolder order would give [0, 0, 0, 0]
    again = next(iter(build_loaders("imagefolder", (3, 8, 8), (0.5,) * 3, (0.5,) * 3, 4, data_dir=str(tmp_path),
                                    workers=0, seed=7).val))[1].tolist()
    assert again == first  # deterministic, whatever the seed
    assert sorted(y for _, ys in loaders.val for y in ys.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
