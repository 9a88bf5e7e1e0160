"""Checkpoints: round trip, atomic writes, clear errors on corrupt/foreign files, load_converted."""

import json
import os

import pytest
import torch

from qformat.errors import UserError
from train import checkpoint as ckpt
from train.models import create_model, model_spec

META = {"model": "vit_fmnist", "num_classes": 10, "input_size": [1, 28, 28], "mean": [0.286], "std": [0.353],
        "class_names": [str(i) for i in range(10)], "quant": None, "metrics": {"top1": 1.0}}


def test_roundtrip_and_sidecar(tmp_path):
    m = create_model("vit_fmnist")
    path = ckpt.save_checkpoint(str(tmp_path / "best"), m, META)
    assert path.endswith("best.safetensors") and os.path.isfile(tmp_path / "best.json")
    for p in (path, str(tmp_path / "best"), str(tmp_path / "best.json")):
        sd, meta = ckpt.load_checkpoint(p)
        assert meta["model"] == "vit_fmnist" and meta["format"] == ckpt.FORMAT
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    os.unlink(tmp_path / "best.json")  # the header copy makes a lone .safetensors self-describing
    assert ckpt.load_checkpoint(path)[1]["metrics"] == {"top1": 1.0}
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    m = create_model("vit_fmnist")
    ckpt.save_checkpoint(str(tmp_path / "last"), m, META)
    before = (tmp_path / "last.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(str(tmp_path / "last"), create_model("vit_fmnist"), META)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_state(str(tmp_path / "last.state.pt"), {"epoch": 1})
    assert (tmp_path / "last.safetensors").read_bytes() == before  # old checkpoint intact
    assert sorted(os.listdir(tmp_path)) == ["last.json", "last.safetensors"]  # no temp or partial files


def test_truncated_safetensors(tmp_path):
    ckpt.save_checkpoint(str(tmp_path / "c"), create_model("vit_fmnist"), META)
    b = (tmp_path / "c.safetensors").read_bytes()
    for cut in (4, 100, len(b) // 2):
        (tmp_path / "c.safetensors").write_bytes(b[:cut])
        with pytest.raises(UserError, match="corrupt or truncated"):
            ckpt.load_checkpoint(str(tmp_path / "c.safetensors"))


def test_garbage_json(tmp_path):
    ckpt.save_checkpoint(str(tmp_path / "c"), create_model("vit_fmnist"), META)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_checkpoint(str(tmp_path / "c.safetensors"))


def test_missing_and_foreign(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="not found"):
        ckpt.load_checkpoint(str(tmp_path / "nope.safetensors"))
    m = create_model("vit_fmnist")
    save_file(m.state_dict(), str(tmp_path / "timm.safetensors"))
    with pytest.raises(UserError, match="not a qvit-edge checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "timm.safetensors"))
    sd, meta = ckpt.load_checkpoint(str(tmp_path / "timm.safetensors"), require_meta=False)
    assert meta == {} and sd.keys() == m.state_dict().keys()
    torch.save({"model": m.state_dict(), "epoch": 3}, tmp_path / "deit.pth")  # DeiT-release layout
    sd, _ = ckpt.load_checkpoint(str(tmp_path / "deit.pth"), require_meta=False)
    assert sd.keys() == m.state_dict().keys()
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_checkpoint(str(tmp_path / "junk.pth"), require_meta=False)


def test_load_state_names_mismatch():
    m = create_model("vit_fmnist")
    sd = create_model("vit_fmnist", num_classes=3).state_dict()
    with pytest.raises(UserError, match="shape mismatch: head.weight"):
        ckpt.load_state(m, sd, "x")


def test_load_converted_quantized(tmp_path):
    from train.config import QuantConfig
    from train.qat import prepare
    from train.quant import calibrate

    spec = model_spec("vit_fmnist")
    qcfg = QuantConfig.for_method("qvit", 3)
    m = prepare(create_model("vit_fmnist"), qcfg)
    x = torch.randn(8, *spec.input_size)
    calibrate(m, [x])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("a_quant.scale"):
                p.mul_(1.1)  # trained scales must survive the trip (no re-initialisation on load)
    m.eval()
    ref = m(x)
    ckpt.save_checkpoint(str(tmp_path / "best"), m, dict(META, quant=qcfg.to_dict()))
    model, meta = ckpt.load_converted(str(tmp_path / "best.safetensors"))
    assert not model.training and getattr(model, "qvit_converted", False)
    assert meta["input_size"] == [1, 28, 28] and meta["quant"]["w_bits"] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_load_converted_fp_and_missing_meta(tmp_path):
    ckpt.save_checkpoint(str(tmp_path / "fp"), create_model("vit_fmnist"), META)
    model, _ = ckpt.load_converted(str(tmp_path / "fp.safetensors"))
    assert not model.training
    meta = json.loads((tmp_path / "fp.json").read_text())
    del meta["class_names"]
    (tmp_path / "fp.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="class_names"):
        ckpt.load_converted(str(tmp_path / "fp.safetensors"))


def test_code_revision(tmp_path):
    """The checkout's short HEAD (this test runs in a git checkout), and "unknown" outside one."""
    import subprocess

    from qformat.io import REPO_ROOT, code_revision

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert head.returncode == 0, "the test suite runs in a git checkout"
    assert code_revision() == head.stdout.strip()
    assert code_revision(str(tmp_path)) == "unknown"
