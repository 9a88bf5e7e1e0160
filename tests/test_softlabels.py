"""The multi-crop soft-label store (train/softlabels.py): round trip against the teacher, resume equals
one go, checksums, refusal of other data / another teacher, and training from it without a teacher forward."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from qformat.errors import UserError
from train.checkpoint import save_checkpoint
from train.data import build_datasets
from train.models import create_model, model_spec
from train.softlabels import (
    MANIFEST,
    Augment,
    MultiCropDataset,
    SoftLabelStore,
    Source,
    collate_crops,
    recover,
    render,
    store_header,
    write_store,
)
from train.softlabels import main as softlabels_main

SPEC = model_spec("vit_fmnist")


def _teacher(tmp_path, seed=0):
    torch.manual_seed(seed)
    m = create_model("vit_fmnist", num_classes=10).eval()
    meta = {"model": "vit_fmnist", "num_classes": 10, "input_size": list(SPEC.input_size), "mean": list(SPEC.mean),
            "std": list(SPEC.std), "method": "fp", "quant": None}
    return m, save_checkpoint(str(tmp_path / f"teacher{seed}"), m, meta), meta


def _source(n=40, seed=0, holdout=0):
    tr, _, _ = build_datasets("synthetic", SPEC.input_size, SPEC.mean, SPEC.std, seed=seed,
                              synthetic_size=(n, 8), holdout=holdout)
    return Source(tr)


def _write(out, teacher, path, meta, source, chunk=16, crops=3, topk=4, seed=0):
    header = store_header(source, path, meta, crops, topk, Augment(flip=0.5), seed, chunk, "synthetic", 0)
    return write_store(str(out), teacher, source, header, batch_size=32, progress=False)


def test_store_round_trip_matches_the_teacher_on_each_stored_crop(tmp_path):
    teacher, path, meta = _teacher(tmp_path)
    src = _source()
    manifest = _write(tmp_path / "s", teacher, path, meta, src)
    assert manifest["complete"] and [c["count"] for c in manifest["chunks"]] == [16, 16, 8]
    store = SoftLabelStore(str(tmp_path / "s"))
    assert store.box.shape == (40, 3, 4) and store.topk_prob.shape == (40, 3, 4)
    top, left, h, w = (store.box[..., i].long() for i in range(4))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert (h * w >= 0.5 * 28 * 28 * 0.9).all()  # --scale 0.5..1 (rounding of the side lengths aside)
    assert 0 < int(store.flip.sum()) < store.flip.numel()
    for i, m in ((0, 0), (17, 2), (39, 1)):  # the stored labels are the teacher's on the stored crop
        x = render(src, i, store.box[i, m], int(store.flip[i, m]))
        with torch.no_grad():
            p = teacher(x[None]).softmax(-1)[0]
        top4 = p.topk(4)
        assert torch.equal(store.topk_index[i, m].long(), top4.indices)
        assert torch.allclose(store.topk_prob[i, m], top4.values, atol=1e-6)
    ds = MultiCropDataset(src, store)
    x, y, soft = collate_crops([ds[0], ds[5]])
    assert x.shape == (6, 1, 28, 28) and y.tolist() == [src.label(0)] * 3 + [src.label(5)] * 3
    assert torch.allclose(soft.sum(-1), torch.ones(6), atol=1e-5)


def test_recover_keeps_topk_and_spreads_the_rest_evenly():
    p = recover(torch.tensor([[2, 0]]), torch.tensor([[0.6, 0.2]]), 5)
    assert torch.allclose(p, torch.tensor([[0.2, 0.2 / 3, 0.6, 0.2 / 3, 0.2 / 3]]))


def test_interrupted_store_resumes_to_the_same_crops_and_labels(tmp_path):
    teacher, path, meta = _teacher(tmp_path)
    src = _source()
    whole = _write(tmp_path / "a", teacher, path, meta, src)
    part = tmp_path / "b"
    _write(part, teacher, path, meta, src)
    man = json.loads((part / MANIFEST).read_text())  # as if stopped after the first chunk
    os.remove(part / man["chunks"][2]["file"])
    man["chunks"], man["complete"] = man["chunks"][:1], False
    (part / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(UserError, match="unfinished"):
        SoftLabelStore(str(part))

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.seen = inner, 0

        def forward(self, x):
            self.seen += x.shape[0]
            return self.inner(x)

    counted = Counting(teacher)
    again = _write(part, counted, path, meta, src)
    assert counted.seen == (16 + 8) * 3  # only the two missing chunks were labelled
    assert [c["count"] for c in again["chunks"]] == [c["count"] for c in whole["chunks"]]
    a, b = SoftLabelStore(str(tmp_path / "a")), SoftLabelStore(str(part))
    assert torch.equal(a.box, b.box) and torch.equal(a.flip, b.flip)  # same crops: seeded by (seed, chunk)
    # same labels (not the same bytes: the CPU GEMM may differ in the last bit with the buffers' alignment)
    assert torch.allclose(recover(a.topk_index, a.topk_prob, 10), recover(b.topk_index, b.topk_prob, 10), atol=1e-6)


def test_a_corrupt_chunk_fails_its_checksum(tmp_path):
    teacher, path, meta = _teacher(tmp_path)
    _write(tmp_path / "s", teacher, path, meta, _source())
    chunk = tmp_path / "s" / "chunk-00001.safetensors"
    blob = bytearray(chunk.read_bytes())
    blob[-3] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="chunk-00001.safetensors fails its checksum"):
        SoftLabelStore(str(tmp_path / "s"))


def test_store_refuses_other_data_and_another_teacher(tmp_path):
    teacher, path, meta = _teacher(tmp_path)
    _write(tmp_path / "s", teacher, path, meta, _source())
    store = SoftLabelStore(str(tmp_path / "s"))
    store.check(_source(), path, SPEC.input_size, SPEC.mean, SPEC.std)  # the data and teacher it was made with
    for other in (_source(seed=1), _source(holdout=8), _source(n=41)):
        with pytest.raises(UserError, match="this run trains on .* other images"):
            store.check(other, path, SPEC.input_size, SPEC.mean, SPEC.std)
    _, path2, _ = _teacher(tmp_path, seed=1)
    with pytest.raises(UserError, match="holds the labels of teacher"):
        store.check(_source(), path2, SPEC.input_size, SPEC.mean, SPEC.std)
    with pytest.raises(UserError, match="rendered for model input"):
        store.check(_source(), path, (3, 32, 32), SPEC.mean, SPEC.std)


def test_fmnist_fingerprint_tells_a_changed_image_apart(fmnist_dir):
    tr, _, _ = build_datasets("fmnist", SPEC.input_size, SPEC.mean, SPEC.std, data_dir=fmnist_dir, holdout=59000)
    a = Source(tr).fingerprint()
    tr.images[7, 3, 3] += 1
    assert Source(tr).fingerprint() != a


def test_cli_writes_the_store_and_a_rerun_with_other_settings_is_refused(tmp_path, expect_error, capsys):
    _, path, _ = _teacher(tmp_path)
    argv = ["--teacher", path, "--data", "synthetic", "--out", str(tmp_path / "s"), "--crops", "2", "--topk", "3",
            "--chunk-size", "200", "--quiet", "--seed", "5"]
    assert softlabels_main(argv) == 0
    assert "512 images x 2 crops" in capsys.readouterr().out
    assert softlabels_main(argv) == 0  # finished: nothing to redo
    other = list(argv)
    other[other.index("--topk") + 1] = "4"
    expect_error(softlabels_main, other, "made with other settings (topk: 3 vs 4)")
    expect_error(softlabels_main, argv + ["--topk", "11"], "--topk 11 is above the teacher's 10 classes")
    expect_error(softlabels_main, argv + ["--scale", "0.9", "0.2"], "--scale 0.9 0.2: the low end")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_from_the_store_runs_no_teacher_forward(tmp_path, monkeypatch):
    from train.cli import parse_args
    from train.distill import Distiller
    from train.trainer import run

    _, path, _ = _teacher(tmp_path)
    store = str(tmp_path / "s")
    assert softlabels_main(["--teacher", path, "--data", "synthetic", "--out", store, "--crops", "2", "--quiet",
                            "--seed", "5"]) == 0
    calls = []
    real = Distiller.forward

    def spy(self, images, labels, soft=None):
        calls.append(soft is not None)
        self.teacher[0].forward = lambda *a: pytest.fail("the teacher ran although soft labels were given")
        return real(self, images, labels, soft)

    monkeypatch.setattr(Distiller, "forward", spy)
    out = str(tmp_path / "run")
    run(parse_args(["--data", "synthetic", "--batch-size", "16", "--max-eval-batches", "1", "--no-tensorboard",
                    "--seed", "5", "--calib-batches", "1", "--method", "baseline", "--bits", "4", "--epochs", "1",
                    "--max-train-batches", "3", "--teacher", path, "--multicrop-kd", store, "--out", out]))
    assert calls == [True] * 3
    row = _rows(os.path.join(out, "metrics.csv"))[0]
    assert float(row["train_kd"]) > 0 and float(row["train_ce"]) == 0.0
    meta = json.loads(open(os.path.join(out, "last.json")).read())
    assert meta["vvtq"]["multicrop_kd"] == store and len(meta["vvtq"]["store_digest"]) == 64
    bad = str(tmp_path / "run2")
    with pytest.raises(UserError, match="this run trains on"):  # the store of seed 5's images, a run on seed 6's
        run(parse_args(["--data", "synthetic", "--batch-size", "16", "--no-tensorboard", "--seed", "6",
                        "--method", "baseline", "--bits", "4", "--epochs", "1", "--teacher", path,
                        "--multicrop-kd", store, "--out", bad]))
    assert not np.any([f.endswith(".safetensors") for f in os.listdir(bad)] if os.path.isdir(bad) else [])
