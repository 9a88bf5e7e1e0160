"""Your own timm weights in (``--init-from``, ``--pretrained`` from the local cache) and the preprocessing of the
weights' pretrained_cfg end to end.  Every checkpoint here is made by timm.create_model(pretrained=False): no
network."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from qformat.errors import UserError
from train import init_weights
from train.cli import main as train_main
from train.models import create_model, model_spec

#: vit_fmnist's architecture (train.models) as a timm model of its own, like a user's fine-tuned DeiT
VIT_KW = dict(patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)


def timm_vit(num_classes=1000, img_size=28, **kw):
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=num_classes,
                             **dict(VIT_KW, **kw))


def image_folder(root, classes=10, per_class=(2, 1)):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            d = root / split / "class{}".format(c)
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (32, 40, 3), dtype=np.uint8)).save(str(d / "{}.png".format(i)))
    return str(root)


def _write(kind, sd, tmp_path):
    """The on-disk forms --init-from takes; returns the path to give it."""
    if kind == "safetensors":
        save_file(sd, str(tmp_path / "w.safetensors"))
        return str(tmp_path / "w.safetensors")
    if kind == "pth-state_dict":
        torch.save({"state_dict": sd, "epoch": 3}, str(tmp_path / "w.pth"))
        return str(tmp_path / "w.pth")
    if kind == "bin-model":
        torch.save({"model": {"module." + k: v for k, v in sd.items()}}, str(tmp_path / "w.bin"))  # DDP-saved
        return str(tmp_path / "w.bin")
    if kind == "folder":
        (tmp_path / "m").mkdir()
        save_file(sd, str(tmp_path / "m" / "model.safetensors"))
        return str(tmp_path / "m")
    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/pytorch_model.bin}
    snap = tmp_path / "models--me--vit" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--me--vit" / "refs").mkdir()
    (tmp_path / "models--me--vit" / "refs" / "main").write_text("abc123")
    torch.save(sd, str(snap / "pytorch_model.bin"))
    return str(tmp_path / "models--me--vit")


@pytest.mark.parametrize("kind", ["safetensors", "pth-state_dict", "bin-model", "folder", "hf-cache"])
def test_every_form_loads_with_a_fresh_head(kind, tmp_path, capsys):
    src = timm_vit(1000).state_dict()
    model = create_model("vit_fmnist", num_classes=10)
    fresh = init_weights.load_into(model, init_weights.resolve(_write(kind, src, tmp_path)))
    assert fresh == ["head.weight", "head.bias"]
    got = model.state_dict()
    assert all(torch.equal(got[k], src[k]) for k in got if not k.startswith("head."))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 1000 classes, this run has 10" in err[0] and "starts fresh" in err[0]


def test_position_embedding_is_resized_by_timms_filter(tmp_path):
    """A checkpoint trained at 32x32 (8x8 patches) into the 28x28 model (7x7): timm's checkpoint_filter_fn resamples."""
    src = timm_vit(10, img_size=32).state_dict()
    save_file(src, str(tmp_path / "w32.safetensors"))
    model = create_model("vit_fmnist")
    assert init_weights.load_into(model, init_weights.resolve(str(tmp_path / "w32.safetensors"))) == []
    assert tuple(src["pos_embed"].shape) == (1, 65, 96) and tuple(model.pos_embed.shape) == (1, 50, 96)
    assert torch.equal(model.pos_embed[0, 0], src["pos_embed"][0, 0])  # the class token's entry is kept
    assert torch.equal(model.blocks[0].attn.qkv.weight, src["blocks.0.attn.qkv.weight"])


def test_swin_checkpoint_through_swins_filter(tmp_path):
    spec = model_spec("swin_fmnist")
    torch.manual_seed(2)
    src = timm.create_model(spec.timm_name, pretrained=False, **dict(spec.kwargs, num_classes=1000)).state_dict()
    src["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)  # old checkpoints
    torch.save({"model": src}, str(tmp_path / "swin.pth"))
    model = create_model("swin_fmnist")
    assert init_weights.load_into(model, init_weights.resolve(str(tmp_path / "swin.pth")), say=False) == [
        "head.fc.weight", "head.fc.bias"]
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(model.state_dict()[key], src[key])


def test_another_architecture_is_one_error_naming_what_differs(tmp_path, capsys):
    torch.save(timm_vit(10, embed_dim=64, num_heads=2).state_dict(), str(tmp_path / "other.bin"))
    with pytest.raises(SystemExit) as e:
        train_main(["--model", "vit_fmnist", "--method", "fp", "--init-from", str(tmp_path / "other.bin"),
                    "--data", "synthetic", "--batch-size", "8", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --init-from")
    assert "does not fit --model vit_fmnist: cls_token is [1, 1, 64] there, [1, 1, 96] here" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder


@pytest.mark.parametrize("argv,needle", [
    (["--init-from", "/nonexistent/w.pth"], "no such file or folder"),
    (["--init-from", "README.md"], "expected a .safetensors / .pth / .pt / .bin file"),
    (["--init-from", "w.pth", "--checkpoint", "c.pth"], "--init-from and --checkpoint both give"),
])
def test_bad_init_from_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--model", "vit_fmnist", "--data", "synthetic", "--out", "/tmp/never-written"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_ten_classes_of_your_own_get_past_the_first_step(tmp_path, capsys):
    """A 1000-class timm state dict on disk + a 10-class image folder: one line about the head, then training."""
    torch.save({"model": timm_vit(1000).state_dict()}, str(tmp_path / "mine.pth"))
    data = image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert train_main(["--model", "vit_fmnist", "--method", "fp", "--init-from", str(tmp_path / "mine.pth"),
                       "--data", "imagefolder", "--data-dir", data, "--epochs", "1", "--max-train-batches", "1",
                       "--batch-size", "4", "--workers", "0", "--no-tensorboard", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    head = [ln for ln in (captured.out + captured.err).splitlines() if "classifier head" in ln]
    assert len(head) == 1 and "1000 classes, this run has 10" in head[0]
    meta = json.load(open(str(out / "best.json")))
    assert meta["num_classes"] == 10 and meta["class_names"][0] == "class0"
    assert meta["init_from"] == str(tmp_path / "mine.pth")


@pytest.mark.slow
def test_deit_s_state_dict_with_ten_classes(tmp_path, capsys):
    """The issue's user: timm deit_small_patch16_224 (ImageNet, 1000 classes) on disk, ten classes of their own."""
    torch.save(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict(), str(tmp_path / "d.pth"))
    data = image_folder(tmp_path / "data")
    assert train_main(["--model", "deit_s", "--method", "fp", "--init-from", str(tmp_path / "d.pth"), "--data",
                       "imagefolder", "--data-dir", data, "--epochs", "1", "--max-train-batches", "1",
                       "--max-eval-batches", "1", "--batch-size", "2", "--workers", "0", "--no-tensorboard",
                       "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert sum("classifier head" in ln for ln in (captured.out + captured.err).splitlines()) == 1


def _timm_hub_cache(root, hub_id, sd):
    repo = root / "models--{}".format(hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(sd, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_pretrained_reads_the_local_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    timm_name = model_spec("vit_fmnist").timm_name
    with pytest.raises(UserError, match="not in the local cache .*timm.create_model\\('vit_tiny_patch16_224', "
                                        "pretrained=True\\)"):
        init_weights.pretrained(timm_name)
    hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
    src = timm_vit(1000).state_dict()
    _timm_hub_cache(tmp_path, hub_id, src)
    assert init_weights.pretrained(timm_name).path.startswith(str(tmp_path))
    model = create_model("vit_fmnist")
    assert init_weights.load_into(model, init_weights.pretrained(timm_name), say=False) == ["head.weight", "head.bias"]
    assert torch.equal(model.blocks[3].mlp.fc2.weight, src["blocks.3.mlp.fc2.weight"])


def test_imagenet_specs_take_timms_pretrained_cfg():
    for name in ("deit_t", "deit_s", "swin_t"):
        spec = model_spec(name)
        cfg = timm.models.get_pretrained_cfg(spec.timm_name).to_dict()
        assert (spec.input_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct) == (
            tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"], cfg["crop_pct"])
    fm = model_spec("vit_fmnist")
    assert init_weights.with_preprocessing(fm, timm.models.get_pretrained_cfg(fm.timm_name).to_dict()) is fm  # 3x224


def test_pretrained_cfg_flows_to_checkpoint_sidecar_and_runtime(tmp_path, fmnist_dir):
    """A model folder whose config.json carries a pretrained_cfg: its mean/std/interpolation/crop reach the
    checkpoint, the export sidecar, the engine-sidecar subset and the runtime's frame preprocessing."""
    from export.cli import main as export_main
    from runtime import model_meta, preprocess

    folder = tmp_path / "mine"
    folder.mkdir()
    save_file(timm_vit(10).state_dict(), str(folder / "model.safetensors"))
    cfg = {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.25], "interpolation": "bicubic", "crop_pct": 0.875}
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": cfg}))
    data = image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert train_main(["--model", "vit_fmnist", "--method", "baseline", "--init-from", str(folder), "--data",
                       "imagefolder", "--data-dir", data, "--epochs", "1", "--max-train-batches", "1", "--batch-size",
                       "4", "--calib-batches", "1", "--workers", "0", "--no-tensorboard", "--out", str(run)]) == 0
    meta = json.load(open(str(run / "best.json")))
    assert (meta["mean"], meta["std"], meta["interpolation"], meta["crop_pct"]) == ([0.5], [0.25], "bicubic", 0.875)
    assert meta["teacher"] == str(folder / "model.safetensors")  # 10 classes: the weights are the teacher as they are
    assert export_main(["--checkpoint", str(run / "best.safetensors"), "--format", "qdq", "--target", "ort",
                        "--out", str(tmp_path / "art"), "--parity-n", "4"]) in (0, None)
    side = model_meta.load_onnx_meta(str(tmp_path / "art" / "vit_fmnist_w4a4.qdq.onnx"))
    assert (side["mean"], side["interpolation"], side["crop_pct"]) == ([0.5], "bicubic", 0.875)
    assert model_meta.preprocess_subset(side)["crop_pct"] == 0.875
    frame = np.random.RandomState(3).randint(0, 255, (48, 64), dtype=np.uint8)
    x = preprocess.to_input(frame, side)
    import cv2

    short = int(np.floor(28 / 0.875))  # timm: resize the short side to 32, then the centre 28x28
    want = cv2.resize(frame, (int(short * 64 / 48), short), interpolation=cv2.INTER_AREA)[2:30, 7:35]
    np.testing.assert_allclose(x[0], (want / np.float32(255.0) - 0.5) / 0.25, rtol=0, atol=1e-6)
