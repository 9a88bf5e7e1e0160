"""One command (``qvit``) over the stages; every old entry point and make target still works."""

import glob
import os
import subprocess
import sys

import pytest

from qvit.cli import STAGES, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _run(args, cwd=ROOT, timeout=120):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_qvit_is_a_project_script():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"] == {"qvit": "qvit.cli:main"}


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert [name for name, _, _ in STAGES] == ["train", "softlabels", "study", "export", "build", "bench", "demo",
                                               "bench-qat"]
    assert all(f"  {name} " in out for name, _, _ in STAGES)


@pytest.mark.parametrize("argv,needle", [
    (["nope"], "unknown stage 'nope'"),
    (["train", "--bits", "9"], "argument --bits: must be in [2, 8]"),
    (["study", "--seeds", "a", "--plan"], "--seeds"),
    (["export", "--format", "int2"], "invalid choice"),
    (["bench", "--batch", "0", "--onnx", "x.onnx"], "must be >= 1"),
    (["build"], "the following arguments are required: --onnx"),
    (["softlabels", "--out", "s"], "the following arguments are required: --teacher"),
    (["demo", "--onnx", "m.onnx", "--headless"], "--headless needs --out"),
    (["bench-qat", "--modes", "jit"], "--modes takes"),
])
def test_each_stage_refuses_bad_flags_in_one_line(argv, needle):
    r = _run([sys.executable, "-m", "qvit"] + argv)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr


@pytest.mark.parametrize("argv", [
    ["-m", "train", "--help"], ["-m", "export", "--help"], ["-m", "runtime.build", "--help"],
    ["runtime/bench.py", "--help"], ["runtime/demo.py", "--help"], ["-m", "qvit", "train", "--help"],
])
def test_old_entry_points_still_work(argv):
    r = _run([sys.executable] + argv)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_scripts_do_not_edit_sys_path():
    sources = []
    for d in ("qformat", "train", "export", "runtime", "jetson", "qvit"):
        sources += glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)
    assert len(sources) > 40
    assert [s for s in sources if "sys.path" in open(s).read()] == []


def test_script_outside_an_install_says_how_to_fix_it(tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "runtime", "bench.py"), "--help"], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot import qformat") and "PYTHONPATH" in r.stderr


@pytest.mark.slow
def test_make_export_without_a_checkpoint_says_so_first(tmp_path):
    """`make export MODEL=.. BITS=..` exports runs/<model>_w<bits>/best.safetensors when it exists;
    otherwise its first line says the weights are random and how to train them."""
    make = ["make", "-s", "-f", os.path.join(ROOT, "Makefile"), "-o", "install"]
    r = subprocess.run(make + ["export", "MODEL=vit_fmnist", "BITS=4", "OUT=out", "FORMAT=fp32", "TARGET=ort"],
                       cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("note: no checkpoint") and "RANDOM weights" in first
    assert "make train MODEL=vit_fmnist BITS=4" in first
    (tmp_path / "runs" / "vit_fmnist_w4").mkdir(parents=True)
    (tmp_path / "runs" / "vit_fmnist_w4" / "best.safetensors").write_bytes(b"")
    dry = subprocess.run(make + ["-n", "export", "MODEL=vit_fmnist", "BITS=4"], cwd=str(tmp_path), env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert "--checkpoint runs/vit_fmnist_w4/best.safetensors" in dry.stdout
