"""``python -m train`` on bad input: one ``error: ...`` line naming the fix, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--epochs", "1", "--max-train-batches", "1", "--max-eval-batches", "1",
        "--batch-size", "8", "--no-tensorboard"]


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    """One tiny FP run; its checkpoint is corrupted in different ways by the tests below."""
    out = tmp_path_factory.mktemp("good")
    r = _cli(*TINY, "--method", "fp", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("args,needles", [
    (["--bits", "1"], ["argument --bits", "[2, 8]", "got 1"]),
    (["--bits", "9"], ["[2, 8]"]),
    (["--bits", "4", "--a-bits", "9"], ["argument --a-bits", "[2, 8]", "got 9"]),
    (["--model", "resnet50"], ["unknown model", "vit_fmnist", "deit_s"]),
    (["--method", "lsq"], ["invalid choice", "python -m train --help"]),
    (["--data-dir", "/nonexistent/fmnist"], ["apt-get install dataset-fashion-mnist", "--data-dir"]),
    (["--method", "qvit", "--fp-epochs", "0"], ["--teacher", "--fp-epochs"]),
    (["--quant-override", '{"blocks.*.attn.qkv": {"wbits": 3}}'], ["unknown key 'wbits'", "w_bits"]),
    (["--quant-override", '{"blocks.*.attn.qkv": {"w_bits": [2, 9]}}'], ["w_bits=9", "2..8"]),
    (["--quant-override", "{not json"], ["not valid JSON"]),
    (["--method", "fp", "--obr"], ["--obr", "needs a quantized --method", "mp"]),
    (["--quant-override", "/nonexistent/mixed.json"], ["no such file"]),
    (["--quant-override", '{"blocks.*.atn": {"w_bits": 3}}', *TINY], ["matches no quantized module", "blocks.0"]),
    (["--quant-override", '{"blocks.*.attn": {"q_bits": [4, 3]}}', *TINY], ["one width per head (3)"]),
])
def test_bad_arguments(tmp_path, args, needles):
    _assert_one_line_error(_cli(*args, "--out", str(tmp_path / "o")), *needles)
    assert not (tmp_path / "o").exists()  # refused before any work: no run folder


def test_resume_without_run(tmp_path):
    _assert_one_line_error(_cli(*TINY, "--method", "fp", "--resume", "--out", str(tmp_path / "none")), "--resume")


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "not_ours"])
def test_corrupt_checkpoint(tmp_path, good_ckpt, damage):
    st = (good_ckpt / "best.safetensors").read_bytes()
    js = (good_ckpt / "best.json").read_text()
    if damage == "truncate":
        (tmp_path / "c.safetensors").write_bytes(st[: len(st) // 3])
        (tmp_path / "c.json").write_text(js)
        needles = ["corrupt or truncated", "c.safetensors"]
    elif damage == "garbage_json":
        (tmp_path / "c.safetensors").write_bytes(st)
        (tmp_path / "c.json").write_text("{\"model\": ")
        needles = ["corrupt", "c.json"]
    else:
        (tmp_path / "c.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        needles = ["corrupt", "c.safetensors"]
    r = _cli(*TINY, "--method", "baseline", "--checkpoint", str(tmp_path / "c.safetensors"), "--out",
             str(tmp_path / "o"))
    _assert_one_line_error(r, *needles)
