"""The deployer figure: every point exported, timed in one bench run, sized; missing runs refused up front."""

import os

import pytest

from experiments import deploy_figure as df
from experiments import runner as st
from qformat.io import read_json

TINY = st.Settings(data="synthetic", holdout=128, teacher_epochs=1, batch_size=16, max_eval_batches=2, chunk=1)


def test_deploy_figure_from_a_tiny_study(tmp_path, capsys):
    res, work = str(tmp_path / "res"), str(tmp_path / "work")
    study = st.Study(res, work, TINY, st.launch_inprocess, grid=lambda s, c: [st.Group("g", [st.BASELINE])], needs=())
    assert st.run_stage(study, st.Plan("stage1", [2], [0], 1, 2, 1))
    common = ["--results", res, "--work", work, "--steps", "1", "--duration", "0.2", "--parity-n", "4"]
    with pytest.raises(SystemExit) as e:  # no W3A3 run: refused before any export
        df.main(common + ["--bits", "2,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "w3a3" in err[0] and not os.path.isdir(os.path.join(work, "deploy"))
    assert df.main(common + ["--bits", "2"]) == 0
    rec = read_json(os.path.join(res, "deploy.json"))
    names = [p["name"] for p in rec["points"]]
    assert names == ["FP32", "W2A2 qdq", "W2A2 lowbit"]
    by = {p["name"]: p for p in rec["points"]}
    assert all(p["img_s"] > 0 and p["bytes"] > 0 for p in rec["points"])
    assert by["W2A2 lowbit"]["bytes"] < by["W2A2 qdq"]["bytes"] < by["FP32"]["bytes"]
    assert by["W2A2 qdq"]["val_top1"] == read_json(study.json_path(st.BASELINE, 2, 0, 1))["val_top1"]
    assert by["FP32"]["val_top1"] == read_json(study.teacher_json("vit_fmnist"))["val_top1"]
    assert os.path.isfile(os.path.join(res, "deploy.png"))
    assert "| W2A2 lowbit |" in open(os.path.join(res, "deploy.md")).read()
