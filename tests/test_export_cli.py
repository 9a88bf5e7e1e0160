"""``python -m export`` end to end: files, sidecar, checkpoint handling and one-line errors."""

import json
import os

import numpy as np
import onnx
import pytest
import torch

import qformat
from export.cli import main


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_checkpoint_export_writes_graph_and_sidecar(checkpoint, tmp_path, capsys):
    rc = main(["--checkpoint", checkpoint, "--format", "lowbit", "--target", "ort", "--out", str(tmp_path),
               "--parity-n", "16"])
    assert rc == 0
    path = tmp_path / "vit_fmnist_w3a3.lowbit.onnx"
    assert path.is_file() and capsys.readouterr().out.strip() == str(path)
    side = json.loads((tmp_path / "vit_fmnist_w3a3.lowbit.json").read_text())
    assert set(qformat.SIDECAR_KEYS) <= set(side)
    assert side["metrics"] == {"top1": 0.5} and side["bits"]["weight"] == 3 and side["opset"] == 17
    assert side["parity"]["passed"] and side["parity"]["top1_agree"] == 1.0
    assert side["input_name"] == "input" and side["output_name"] == "logits"
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"] and len(m.functions) == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_fresh_export_for_tensorrt_target(tmp_path):
    rc = main(["--model", "swin_fmnist", "--bits", "4", "--format", "qdq", "--target", "tx2", "--out", str(tmp_path),
               "--parity-n", "8"])
    assert rc == 0
    m = onnx.load(str(tmp_path / "swin_fmnist_w4a4.qdq.onnx"))
    assert m.opset_import[0].version == 13
    assert "LayerNormalization" not in {n.op_type for n in m.graph.node}
    side = json.loads((tmp_path / "swin_fmnist_w4a4.qdq.json").read_text())
    assert side["target"] == "tx2" and side["fp32_layers"]


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("argv,match", [
    (["--checkpoint", "/nonexistent/best.safetensors"], "checkpoint not found"),
    (["--model", "vit_fmnist"], "--checkpoint CKPT, or --model NAME --bits B"),
    (["--model", "vit_fmnist", "--bits", "4", "--target", "tx2", "--opset", "21"], "use --opset 13"),
    (["--model", "nope", "--bits", "4"], "unknown model"),
])
def test_one_line_errors(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    line = _error(capsys)
    assert line.startswith("error: ") and match in line


def test_bits_disagreeing_with_checkpoint(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", checkpoint, "--bits", "4", "--out", str(tmp_path)])
    assert e.value.code == 2 and "disagrees with the checkpoint" in _error(capsys)


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(bad), "--out", str(tmp_path)])
    assert e.value.code == 2 and "corrupt" in _error(capsys)


def test_parity_failure_exits_1_and_keeps_canonical_name_free(checkpoint, tmp_path, capsys, monkeypatch):
    from export import exporter

    real = exporter.run_parity

    def failing(*a, **k):  # a graph that disagrees with PyTorch (negative tolerances are refused as input)
        par = real(*a, **k)
        par.passed, par.mismatches = False, 3
        return par

    monkeypatch.setattr(exporter, "run_parity", failing)
    rc = main(["--checkpoint", checkpoint, "--format", "qdq", "--out", str(tmp_path), "--parity-n", "8"])
    assert rc == 1
    assert "parity check failed" in _error(capsys)
    assert not (tmp_path / "vit_fmnist_w3a3.qdq.onnx").exists()
    assert (tmp_path / "vit_fmnist_w3a3.qdq.parity-failed.onnx").exists()


def test_calib_dir_images(checkpoint, tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "out"
    assert main(["--checkpoint", checkpoint, "--format", "fp32", "--out", str(out), "--calib-dir", str(d)]) == 0
    side = json.loads((out / "vit_fmnist_w3a3.fp32.json").read_text())
    assert side["parity"]["n"] == 3 and side["format"] == "fp32"


@pytest.mark.parametrize("name", ["vit_fmnist", "swin_fmnist"])
def test_dynamic_batch(name, converted):
    from export.exporter import build_graph
    from export.parity import ort_session

    dep = converted(name, 4, calib_n=8)
    sess = ort_session(build_graph(dep, "lowbit", "ort", log=lambda s: None).ort)
    x = dep.test_images(3)
    with torch.no_grad():
        want = dep.model(x).numpy()
    for b in (1, 3):  # every batch size gives the PyTorch logits of the same images
        y = sess.run(None, {"input": x[:b].numpy()})[0]
        np.testing.assert_allclose(y, want[:b], rtol=1e-4, atol=1e-4)


def test_calib_dir_skips_undecodable_images(tmp_path, capsys, converted):
    from PIL import Image

    from export.parity import load_images
    from qformat.errors import UserError

    meta = converted("vit_fmnist", 4, calib_n=8)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "a_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "b_empty.png").write_bytes(b"")
    x = load_images(10, meta, str(tmp_path))
    assert x.shape == (3, 1, 28, 28)  # RGB files converted to the model's one channel
    err = capsys.readouterr().err
    assert "skipped 2 of 5 image(s)" in err and "a_corrupt.jpg" in err and "b_empty.png" in err
    for f in tmp_path.glob("*.png"):
        f.write_bytes(b"")
    with pytest.raises(UserError, match="no readable image"):
        load_images(10, meta, str(tmp_path))


def test_weight_only_8bit_model_exports_for_trt10(tmp_path, capsys):
    """An 8-bit model's softmax codes need UINT8, which TensorRT lacks: refused for the formats that quantize
    activations, but a weight-only (woq) graph has no activation quantizer and exports (issue 19's bug)."""
    with pytest.raises(SystemExit) as e:
        main(["--model", "vit_fmnist", "--bits", "8", "--format", "qdq", "--target", "trt10", "--out", str(tmp_path),
              "--parity-n", "0"])
    assert e.value.code == 2 and "no UINT8" in _error(capsys)
    assert main(["--model", "vit_fmnist", "--bits", "8", "--format", "woq", "--target", "trt10", "--out",
                 str(tmp_path), "--parity-n", "4"]) == 0
    side = json.loads((tmp_path / "vit_fmnist_w8a8.woq.json").read_text())
    assert side["format"] == "woq" and side["target"] == "trt10" and side["parity"]["passed"]
    m = onnx.load(str(tmp_path / "vit_fmnist_w8a8.woq.onnx"))
    assert "QuantizeLinear" not in {n.op_type for n in m.graph.node}
