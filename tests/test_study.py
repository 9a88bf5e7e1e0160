"""The study runner: choices from validation numbers, skip, resume (also after SIGKILL), test read once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import runner as st
from experiments import study as cli
from qformat.errors import UserError
from qformat.io import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = st.Settings(data="synthetic", holdout=128, teacher_epochs=1, batch_size=16, max_eval_batches=2, chunk=1)
QVIT = {"method": "qvit", "dgd_weight": 0.1}


def _tiny_grid(stage, choices):
    return [st.Group("g", [st.BASELINE, QVIT], final=True)]


def _study(tmp_path, launch=None, **kw):
    counting = {"n": 0}

    def launch_counted(argv, log):
        counting["n"] += 1
        return (launch or st.launch_inprocess)(argv, log)

    s = st.Study(str(tmp_path / "res"), str(tmp_path / "work"), TINY, launch_counted, grid=_tiny_grid, needs=(),
                 **kw)
    return s, counting


# ----------------------------------------------------------------------------- grid and choices (no training)

def _fake(study, cfg, bits, seed, steps, val):
    write_json(study.json_path(cfg, bits, seed, steps),
               {"schema": st.SCHEMA, "settings": study.settings.identity(), "config": cfg, "seed": seed,
                "bits": bits, "steps": steps, "val_top1": val, "wall_s": 1.0})


def test_slug_is_stable_and_distinct():
    assert st.slug({"method": "qvit", "dgd_weight": 0.1, "dgd_on": "q,k"}) == "qvit__dgd_on-q+k__dgd_weight-0.1"
    assert st.slug({"dgd_weight": 0.1, "method": "qvit"}) == st.slug({"method": "qvit", "dgd_weight": 0.1})
    slugs = {st.slug(c) for g in st.stage_groups("stage1", {}) for c in g.configs}
    assert len(slugs) == len({json.dumps(c, sort_keys=True) for g in st.stage_groups("stage1", {})
                              for c in g.configs})


def test_choices_follow_validation_means_and_declare_later_groups(tmp_path):
    study = st.Study(str(tmp_path / "res"), str(tmp_path / "work"), TINY)
    seeds, steps = [0, 1], 250
    assert [g.name for g in st.stage_groups("stage1", {})] == ["reference", "dgd_weight", "irm_variant"]
    sweep = next(g for g in st.stage_groups("stage1", {}) if g.name == "dgd_weight")
    for cfg in sweep.configs:  # w = 0.03 best; IRM alone (w = 0) best of all -> weight 0, positive 0.03
        val = 80.0 if cfg["method"] == "irm" else 70.0 + (5.0 if cfg["dgd_weight"] == 0.03 else 0.0)
        for s in seeds:
            _fake(study, cfg, 2, s, steps, val + s)
    assert st.make_choices(study, 2, seeds, steps).keys() == {"dgd_weight"}  # the rest are incomplete
    _fake(study, sweep.configs[1], 2, 1, steps, 80.0)  # overwriting a seed moves the mean...
    ch = st.make_choices(study, 2, seeds, steps)["dgd_weight"]
    assert ch["dgd_weight"] == 0.0 and ch["dgd_weight_positive"] == 0.03  # ...but not past 0.03's mean
    groups = {g.name: g for g in st.stage_groups("stage1", {"dgd_weight": ch})}
    assert [c["dgd_weight"] for c in groups["dgd_on"].configs] == [0.03] * 3
    for cfg, val in zip(groups["dgd_on"].configs, (77.0, 74.0, 75.0)):  # q only wins
        for s in seeds:
            _fake(study, cfg, 2, s, steps, val)
    for cfg, val in zip(groups["irm_variant"].configs, (80.0, 81.0, 82.5, 79.0, 60.0)):  # per-head std init wins
        for s in seeds:
            _fake(study, cfg, 2, s, steps, val + s)
    ch = st.make_choices(study, 2, seeds, steps)
    assert ch["dgd_on"]["flags"] == {"dgd_on": "q"}
    assert ch["irm"]["flags"] == {"irm_per_head": True, "irm_init": "std"}
    final = st.final_rows(ch)
    assert final == [st.BASELINE, {"method": "irm", "irm_per_head": True, "irm_init": "std"},
                     {"method": "dgd", "dgd_weight": 0.03, "dgd_on": "q"},
                     {"method": "qvit", "irm_per_head": True, "irm_init": "std", "dgd_weight": 0.03, "dgd_on": "q"}
                     ] + list(st.EXTRA_FINAL_ROWS)
    assert [g.name for g in st.stage_groups("stage2", ch)] == ["final"]
    assert [c["method"] for c in st.stage_groups("stage3", ch)[0].configs] == ["baseline", "qvit", "vvtq", "mp", "qvit"]


def test_failed_run_never_wins_and_other_settings_refuse(tmp_path):
    study = st.Study(str(tmp_path / "res"), str(tmp_path / "work"), TINY)
    g = st.Group("x", [st.IRM, QVIT], choose="dgd_weight")
    _fake(study, st.IRM, 2, 0, 5, 50.0)
    write_json(study.json_path(QVIT, 2, 0, 5), {"schema": st.SCHEMA, "settings": TINY.identity(), "seed": 0,
                                                "failed": "error: loss became nan"})
    assert st.choose(study, g, 2, [0], 5)["dgd_weight"] == 0.0
    other = st.Study(study.results, study.work, st.Settings(data="synthetic", holdout=64))
    with pytest.raises(UserError, match="other study settings"):
        st.load_run(other, st.IRM, 2, 0, 5)


def test_budget_must_be_a_multiple_of_the_chunk(tmp_path):
    study = st.Study(str(tmp_path / "r"), str(tmp_path / "w"), st.Settings())
    with pytest.raises(UserError, match="multiple of 250"):
        st.train_argv(study, st.BASELINE, 2, 0, 300, {"path": "t.safetensors"})
    argv = st.train_argv(study, {"method": "qvit", "dgd_on": "q", "irm_per_head": True, "model": "vit_fmnist_irm"},
                         2, 1, 1000, {"path": "t.safetensors"})
    assert argv[argv.index("--epochs") + 1] == "4" and argv[argv.index("--max-train-batches") + 1] == "250"
    assert argv[argv.index("--model") + 1] == "vit_fmnist_irm" and argv.count("--model") == 1
    assert "--irm-per-head" in argv and argv[argv.index("--dgd-on") + 1] == "q"


@pytest.mark.parametrize("args, needle", [(["--stage", "stage9"], "--stage"), (["--seeds", "a"], "--seeds"),
                                          (["--budget", "0"], "--budget"), (["--holdout", "0"], "--holdout")])
def test_bad_flags_are_one_line_errors(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--plan"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


# ----------------------------------------------------------------------------- tiny real study

def test_tiny_study_skips_finished_resumes_unfinished_and_reads_test_once(tmp_path):
    study, launched = _study(tmp_path)
    plan = st.Plan("stage1", [2], [0], 2, 2, 2)
    # a run killed after its first chunk: what the trainer leaves behind
    teacher = st.ensure_teacher(study, "vit_fmnist")
    half = study.run_dir(st.BASELINE, 2, 0, 2)
    assert st.launch_inprocess(st.train_argv(study, st.BASELINE, 2, 0, 2, teacher) +
                               ["--out", half, "--stop-after-epochs", "1"], half + ".log") == 0
    launched["n"] = 0
    assert st.run_stage(study, plan)
    assert launched["n"] == 2  # the half run and the other config; the teacher was reused
    rec = read_json(study.json_path(st.BASELINE, 2, 0, 2))
    assert rec["resumed_from_step"] == 1 and [r["step"] for r in rec["curve"]] == [1, 2]
    assert rec["teacher"]["sha256"] == read_json(study.teacher_json("vit_fmnist"))["sha256"]
    assert "resumed at epoch 1/2" in open(half + ".log").read()
    fresh = read_json(study.json_path(QVIT, 2, 0, 2))
    assert fresh["resumed_from_step"] == 0 and "val_top1" in fresh and "$WORK" in " ".join(fresh["argv"])

    study2, launched2 = _study(tmp_path)
    assert st.run_stage(study2, plan) and launched2["n"] == 0  # everything finished: nothing trains
    assert st.eval_test(study2, plan) == 3  # two runs and the teacher
    first = read_json(study.json_path(QVIT, 2, 0, 2))["test_top1"]
    assert st.eval_test(study2, plan) == 0 and read_json(study.json_path(QVIT, 2, 0, 2))["test_top1"] == first
    text = cli.report(study2, [plan])
    assert "Test top-1" in text and os.path.isfile(os.path.join(study.results, "stage1.png"))
    assert os.path.isfile(os.path.join(study.results, "stage1_test.png"))


def test_time_limit_and_max_runs_end_a_sitting(tmp_path):
    study, launched = _study(tmp_path, max_runs=1)
    plan = st.Plan("stage1", [2], [0], 1, 2, 1)
    assert not st.run_stage(study, plan)
    assert launched["n"] == 2  # the teacher, then one run
    study2, launched2 = _study(tmp_path)
    study2.deadline = time.time() - 1
    assert not st.run_stage(study2, plan) and launched2["n"] == 0
    study3, launched3 = _study(tmp_path)
    open(os.path.join(study3.work, "STOP"), "w").close()
    assert not st.run_stage(study3, plan) and launched3["n"] == 0
    assert not os.path.exists(os.path.join(study3.work, "STOP"))  # honoured once
    assert st.run_stage(study3, plan) and launched3["n"] == 1


def test_extra_final_rows_hook_joins_every_final_table(monkeypatch):
    choices = {"dgd_weight": {"dgd_weight_positive": 0.03}, "dgd_on": {"flags": {}}, "irm": {"flags": {}}}
    assert [r["method"] for r in st.final_rows(choices)][:4] == ["baseline", "irm", "dgd", "qvit"]
    monkeypatch.setattr(st, "EXTRA_FINAL_ROWS", ({"method": "vvtq"},))
    rows = st.final_rows(choices, with_single=False)
    assert [r["method"] for r in rows] == ["baseline", "qvit", "vvtq"] and st.label(rows[-1]) == "VVTQ"
    assert "vvtq" in cli._every_slug(["stage2"])


def test_only_starts_the_named_configs_and_refuses_unknown_names(tmp_path, capsys):
    study, launched = _study(tmp_path, only=("baseline",))
    plan = st.Plan("stage1", [2], [0], 1, 2, 1)
    assert st.run_stage(study, plan)
    assert launched["n"] == 2  # the teacher, then the baseline only
    assert st.load_run(study, st.BASELINE, 2, 0, 1) and st.load_run(study, QVIT, 2, 0, 1) is None
    assert not study.wanted(QVIT) and st.Study("r", "w", TINY, only=("qvit__dgd_weight-*",)).wanted(QVIT)
    with pytest.raises(SystemExit) as e:
        cli.main(["--only", "qvit__dgd_weight-0.3O", "--plan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--only 'qvit__dgd_weight-0.3O'" in err[0]


def test_killed_runner_resumes_the_run_from_its_last_chunk(tmp_path):
    """SIGKILL the real runner (and its trainer) mid-run; the next sitting resumes that run."""
    res, work = str(tmp_path / "res"), str(tmp_path / "work")
    cmd = [sys.executable, "-m", "experiments.study", "--data", "synthetic", "--holdout", "128", "--teacher-epochs",
           "1", "--batch-size", "16", "--max-eval-batches", "2", "--chunk", "1", "--budget", "10", "--seeds", "0",
           "--bits", "2", "--results", res, "--work", work]
    env = dict(os.environ, PYTHONPATH=ROOT)
    run_dir = os.path.join(work, "runs", "s10", "baseline__w2a2__seed0")
    proc = subprocess.Popen(cmd + ["--max-runs", "1"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            meta = st._read_meta(run_dir)
            if meta and meta.get("epoch", 0) >= 1:
                break
            assert proc.poll() is None, "runner ended before its first run checkpointed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = st._read_meta(run_dir)["epoch"]
    if killed_at >= 10:
        pytest.skip("the run finished before the kill landed (machine much faster than expected)")
    assert not os.path.exists(os.path.join(res, "runs", "s10", "baseline__w2a2__seed0.json"))
    r = subprocess.run(cmd + ["--max-runs", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = read_json(os.path.join(res, "runs", "s10", "baseline__w2a2__seed0.json"))
    assert rec["resumed_from_step"] >= killed_at and [c["step"] for c in rec["curve"]] == list(range(1, 11))
