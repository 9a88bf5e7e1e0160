"""Data hygiene: a run whose validation images a teacher (or a soft-label store's teacher) trained on is
refused in one line before any training; a clean pairing passes; an unrecorded teacher gets one note."""

import numpy as np
import pytest
import torch

from train import cli
from train.checkpoint import save_checkpoint
from train.data import stratified_holdout
from train.models import create_model, model_spec
from train.provenance import check_no_leak, index_hash, lineage, overlap, run_images


def _fp_checkpoint(path, **meta):
    """An FP vit_fmnist checkpoint with the metadata a teacher run writes (plus ``meta``)."""
    spec = model_spec("vit_fmnist")
    torch.manual_seed(0)
    base = {"model": "vit_fmnist", "quant": None, "input_size": list(spec.input_size), "mean": list(spec.mean),
            "std": list(spec.std), "num_classes": 10, "class_names": [str(i) for i in range(10)], "method": "fp"}
    return save_checkpoint(str(path), create_model("vit_fmnist"), dict(base, **meta))


def _argv(teacher, holdout, out):
    return ["--model", "vit_fmnist", "--method", "baseline", "--bits", "2", "--teacher", teacher, "--holdout",
            str(holdout), "--epochs", "1", "--max-train-batches", "1", "--out", str(out), "--no-tensorboard"]


def test_record_names_the_split_by_its_index_hash(fmnist_dir):
    _, labels = __import__("train.data", fromlist=["load_fmnist"]).load_fmnist(fmnist_dir, "train")
    tr, va = run_images("fmnist", fmnist_dir, 5000)
    want_tr, want_va = stratified_holdout(labels, 5000)
    assert tr["count"] == 55000 and va["count"] == 5000 and "indices" not in tr
    assert tr["sha256"] == index_hash(want_tr) and va["sha256"] == index_hash(want_va)
    assert run_images("fmnist", fmnist_dir, 5000, seed=3) == (tr, va)  # --seed never moves the split
    assert run_images("fmnist", fmnist_dir, 0)[1]["split"] == "test"


def test_the_issues_leak_is_counted_exactly(fmnist_dir):
    teacher = run_images("fmnist", fmnist_dir, 5000)[0]
    _, val50k = run_images("fmnist", fmnist_dir, 50000)
    _, labels = __import__("train.data", fromlist=["load_fmnist"]).load_fmnist(fmnist_dir, "train")
    want = np.intersect1d(stratified_holdout(labels, 5000)[0], stratified_holdout(labels, 50000)[1]).size
    assert want > 0 and overlap(val50k, teacher, fmnist_dir) == want
    assert overlap(run_images("fmnist", fmnist_dir, 5000)[1], teacher, fmnist_dir) == 0
    assert overlap(run_images("fmnist", fmnist_dir, 0)[1], teacher, fmnist_dir) == 0  # the test split


def test_leaky_teacher_is_refused_before_training(tmp_path, fmnist_dir, expect_error):
    rec = run_images("fmnist", fmnist_dir, 5000)[0]
    teacher = _fp_checkpoint(tmp_path / "teacher", data="fmnist", holdout=5000, images=rec)
    line = expect_error(cli.main, _argv(teacher, 50000, tmp_path / "run"), "validation images")
    assert "--holdout 5000" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_clean_teacher_passes_and_old_teacher_gets_one_note(tmp_path, fmnist_dir, capsys):
    from train.provenance import check_sources

    rec = run_images("fmnist", fmnist_dir, 5000)[0]
    clean = _fp_checkpoint(tmp_path / "clean", data="fmnist", holdout=5000, images=rec)
    check_sources(cli.parse_args(_argv(clean, 5000, tmp_path / "a")))
    assert capsys.readouterr().err == ""
    old = _fp_checkpoint(tmp_path / "old")  # written before any split was recorded
    check_sources(cli.parse_args(_argv(old, 5000, tmp_path / "b")))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be checked" in err[0] and "--holdout 5000" in err[0]


def test_teacher_from_before_the_record_is_rebuilt_from_its_holdout(fmnist_dir):
    # a teacher of issue 13's trainer recorded data and holdout but no image record: still checkable
    old = lineage({"data": "fmnist", "holdout": 5000, "seed": 0, "teacher": None})
    with pytest.raises(Exception, match="validation images"):
        check_no_leak(run_images("fmnist", fmnist_dir, 50000)[1], [("--teacher", "t", old)], fmnist_dir)
    check_no_leak(run_images("fmnist", fmnist_dir, 5000)[1], [("--teacher", "t", old)], fmnist_dir)


def test_soft_label_store_records_its_teachers_images(tmp_path, capsys):
    from train import softlabels

    rec = run_images("synthetic", None, 64)[0]
    assert rec["indices"] and len(rec["indices"]) == 448  # small sets keep the list
    teacher = _fp_checkpoint(tmp_path / "t", data="synthetic", holdout=64, images=rec)
    store = tmp_path / "store"
    softlabels.main(["--teacher", teacher, "--data", "synthetic", "--holdout", "64", "--crops", "1", "--out",
                     str(store), "--quiet"])
    m = softlabels.read_store_manifest(str(store))
    assert m["teacher_images"] == [rec] and m["images"] == rec
    with pytest.raises(SystemExit):  # a store whose teacher saw the validation images of --holdout 256
        softlabels.main(["--teacher", teacher, "--data", "synthetic", "--holdout", "256", "--crops", "1", "--out",
                         str(tmp_path / "s2"), "--quiet"])
    assert "validation images" in capsys.readouterr().err
