"""The budget and final stages, the batch path (several trainer processes at once, a hard time limit) and the
README's generated tables -- with a fake trainer process (no training), so they run in seconds."""

import json
import math
import os
import sys
import threading
import time

import pytest
import torch
from scipy.stats import t as student_t

from experiments import batch, tables
from experiments import runner as st
from experiments import study as cli
from qformat.io import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = st.Settings(data="synthetic", holdout=128)

#: a stand-in for ``python -m train``: reads the flags the study passes, sleeps, writes what the trainer
#: leaves (last.json, last.safetensors, metrics.csv); accuracy rises with the budget and flattens after 2,000
FAKE = r"""
import json, os, sys, time
a = sys.argv[1:]
get = lambda f, d=None: a[a.index(f) + 1] if f in a else d
out, epochs = get("--out"), int(get("--epochs"))
steps = epochs * int(get("--max-train-batches", "1"))
if get("--method") == "fp":
    val = 87.5
else:
    base = {"2": 80.0, "4": 85.0}.get(get("--bits"), 83.0)
    gain = {1000: 0.0, 2000: 1.0, 4000: 1.1, 8000: 1.15}.get(steps, 0.0)
    val = base + gain - (5.0 if "--quant-override" in a else 0.0) + 0.1 * int(get("--seed"))
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.2")))
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "last.safetensors"), "wb").write(b"fake")
meta = {"format": "qvit-edge-checkpoint", "epoch": epochs, "epochs": epochs, "metrics": {"top1": val},
        "code_revision": "fake"}
json.dump(meta, open(os.path.join(out, "last.json"), "w"))
open(os.path.join(out, "metrics.csv"), "w").write("step,val_top1,time_s\n%d,%s,1.0\n" % (steps, val))
"""


class FakeLauncher:
    """Spawns FAKE as a real process (so --hard-limit can stop it) and counts how many ran at once."""

    def __init__(self):
        self.lock, self.now, self.peak, self.calls = threading.Lock(), 0, 0, 0

    def __call__(self, argv, log):
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
        try:
            return st.spawn([sys.executable, "-c", FAKE] + list(argv), log)
        finally:
            with self.lock:
                self.now -= 1


def _study(tmp_path, launch=None):
    return st.Study(str(tmp_path / "res"), str(tmp_path / "work"), SETTINGS, launch or FakeLauncher())


def _budget_plans(seeds=(0, 1, 2)):
    return [st.Plan("budget", [2, 4], list(seeds), n, 2, 250) for n in st.BUDGETS]


def test_batch_runs_budgets_concurrently_and_stops_once_the_curve_is_flat(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.3")
    study = _study(tmp_path)
    t0 = time.time()
    written = batch.run_batch(study, _budget_plans(), jobs=4)
    assert study.launch.peak > 1  # several trainer processes at once
    assert st.converged_budget(study, st.BUDGET_SEEDS) == 2000  # 1000 -> 2000 moves 1.0, 2000 -> 4000 0.1
    per_budget = {n: sum(1 for cfg in (st.BASELINE, st.HARD) for b in (2, 4) for s in (0, 1, 2)
                         if st.load_run(study, cfg, b, s, n)) for n in st.BUDGETS}
    assert per_budget == {1000: 12, 2000: 12, 4000: 12, 8000: 0}  # 8,000 steps never started
    assert len(written) == 36 and all(os.path.isfile(p) for p in written)
    rec = read_json(study.json_path(st.HARD, 2, 1, 2000))
    override = json.loads(rec["argv"][rec["argv"].index("--quant-override") + 1])
    assert override == {"patch_embed.proj": {"w_bits": 2, "a_bits": 2}, "head": {"w_bits": 2, "a_bits": 2}}
    assert rec["val_top1"] == pytest.approx(80.0 + 1.0 - 5.0 + 0.1)
    # the sequential runner agrees: nothing left to do, the 8,000-step plan is skipped
    again = _study(tmp_path)
    st.run_plans(again, _budget_plans())
    assert again.launch.calls == 0
    dest = tmp_path / "out"
    assert batch.copy_runs(study, t0, str(dest)) == 37  # the runs and the teacher's record
    assert batch.copy_runs(study, time.time() + 60, str(tmp_path / "none")) == 1  # nothing new: the teacher
    assert (dest / "runs" / "s2000" / "baseline__edges-2__w2a2__seed1.json").is_file()


def test_hard_limit_stops_running_trainers_and_writes_nothing_half_done(tmp_path, monkeypatch):
    study = _study(tmp_path)
    st.ensure_teacher(study, "vit_fmnist")  # fast: before the slow fake
    monkeypatch.setenv("FAKE_SLEEP", "60")
    t0 = time.time()
    written = batch.run_batch(study, _budget_plans((0,))[:1], jobs=2, hard_limit=time.time() + 2)
    assert time.time() - t0 < 30 and written == [] and not st.LIVE
    assert not os.path.isdir(os.path.join(study.results, "runs"))  # a stopped run is not a result


def _final_records(study, steps, vals):
    for cfg, per_seed in vals:
        for seed, v in enumerate(per_seed):
            write_json(study.json_path(cfg, 2, seed, steps),
                       {"schema": st.SCHEMA, "settings": SETTINGS.identity(), "config": cfg, "seed": seed, "bits": 2,
                        "steps": steps, "val_top1": v, "wall_s": 10.0})


def test_tables_recompute_from_the_jsons_with_paired_t_intervals(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0")
    study = _study(tmp_path)
    batch.run_batch(study, _budget_plans()[:3], jobs=3)
    base = [81.0, 81.1, 81.2, 80.9, 81.3]
    qvit = [81.5, 81.4, 81.9, 81.2, 81.6]
    # the budget stage's own runs cover seeds 0-2 of the baseline at B; the final table adds seeds 3 and 4
    _final_records(study, 2000, [(st.BASELINE, base), ({"method": "qvit"}, qvit)])
    text = tables.block(study.results)
    assert "B = 2,000 QAT steps" in text and "Baseline (embed+head 2-bit)" in text
    assert "W2A2 std 0.10 -> 3" in text  # fake seeds 81.0, 81.1, 81.2 at B
    d = [q - b for q, b in zip(qvit, base)]
    m, sd = sum(d) / 5, math.sqrt(sum((x - sum(d) / 5) ** 2 for x in d) / 4)
    half = student_t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}] (n=5)" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tables.BEGIN}\nstale 99.99\n{tables.END}\noutro\n")
    assert tables.write_readme(str(readme), study.results)
    assert tables.current_block(readme.read_text()) == text and "stale" not in readme.read_text()
    assert not tables.write_readme(str(readme), study.results)  # a fixed function of the files


def test_the_readme_tables_are_what_the_committed_runs_give():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        current = tables.current_block(f.read())
    assert current is not None, "README.md lost its generated study block"
    assert current == tables.block(os.path.join(ROOT, "docs", "study")), \
        "README's study tables differ from docs/study/runs: qvit study --report --stage budget,final --readme README.md"


def test_seeds_for_a_half_point_interval():
    from experiments.measures import seeds_for

    assert seeds_for(0.1) == 3 and seeds_for(0.0) == 2
    n = seeds_for(0.4)  # the spread the W2A2 baseline showed at 250 steps
    sd = math.sqrt(2) * 0.4
    assert student_t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= 0.5 < student_t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1)


def test_plan_lists_stages_in_order_with_a_time_estimate(tmp_path, capsys):
    cli.main(["--stage", "budget,final", "--plan", "--data", "synthetic", "--holdout", "128", "--results",
             str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert "final   waits for the converged budget B" in out and "W2A2 x 5 seeds, W4A4 x 3 seeds" in out
    assert f"the assumed {st.DEFAULT_SPS:.2f} s/step" in out
    first = out.index("seeds [0, 1, 2]: 12 runs of 1000 steps")
    assert first < out.index("12 runs of 8000 steps")


def test_final_plans_put_w2a2_with_five_seeds_first(tmp_path):
    study = _study(tmp_path)
    args = cli.build_parser().parse_args(["--stage", "final", "--budget", "2000"])
    args.seeds_given = False
    plans = cli.final_plans(study, args, [2, 4, 3], 2, [0, 1, 2])
    assert [(p.bits, p.seeds, p.steps) for p in plans] == [([2], [0, 1, 2, 3, 4], 2000), ([4], [0, 1, 2], 2000),
                                                           ([3], [0, 1, 2], 2000)]
    rows = st.stage_groups("final", {})[0].configs
    assert [st.label(r) for r in rows] == ["Baseline", "+IRM+DGD", "VVTQ (4-crop KD)", "Learned bits",
                                           "+IRM+DGD (VVTQ scales + OBR, 4-crop KD)"]


def test_the_harder_setting_is_accepted_by_the_train_cli(tmp_path):
    from train.cli import parse_args

    argv = st.train_argv(_study(tmp_path), st.HARD, 2, 0, 1000, {"path": "t.safetensors"})
    args = parse_args(argv + ["--out", str(tmp_path / "o")])
    assert set(args.quant_override) == {"patch_embed.proj", "head"}


def test_vvtq_rows_get_the_teachers_soft_label_store_made_once(tmp_path):
    """A real (tiny) store: the study writes it with python -m train.softlabels and points the run at it."""
    from train.checkpoint import save_checkpoint
    from train.models import create_model, model_spec
    from train.provenance import run_images

    study = _study(tmp_path)
    spec = model_spec("vit_fmnist")
    os.makedirs(study.teacher_dir("vit_fmnist"))
    torch.manual_seed(0)
    ckpt = save_checkpoint(os.path.join(study.teacher_dir("vit_fmnist"), "last"), create_model("vit_fmnist"),
                           {"model": "vit_fmnist", "quant": None, "input_size": list(spec.input_size),
                            "mean": list(spec.mean), "std": list(spec.std), "num_classes": 10, "method": "fp",
                            "images": run_images("synthetic", None, 128)[0]})
    write_json(study.teacher_json("vit_fmnist"), {"schema": st.SCHEMA, "settings": SETTINGS.identity(),
                                                  "model": "vit_fmnist", "sha256": "x", "val_top1": 50.0})
    cfg = {"method": "vvtq", "crops": 1}
    teacher = st.ensure_inputs(study, cfg)
    store = study.store_dir("vit_fmnist", 1)
    manifest = read_json(os.path.join(store, "manifest.json"))
    assert teacher["path"] == ckpt and manifest["complete"] and manifest["data"]["holdout"] == 128
    assert manifest["teacher_images"] == [run_images("synthetic", None, 128)[0]]
    argv = st.train_argv(study, cfg, 2, 0, 250, teacher)
    assert argv[argv.index("--multicrop-kd") + 1] == store and "--crops" not in argv
    mtime = os.path.getmtime(os.path.join(store, "manifest.json"))
    st.ensure_inputs(study, cfg)  # made once
    assert os.path.getmtime(os.path.join(store, "manifest.json")) == mtime


def _checkpoint(path, bits):
    from conftest import test_images

    from train.checkpoint import save_checkpoint
    from train.config import QuantConfig
    from train.models import create_model, model_spec
    from train.qat import prepare
    from train.quant import calibrate

    spec = model_spec("vit_fmnist")
    torch.manual_seed(0)
    m = create_model("vit_fmnist").eval()
    cfg = QuantConfig.for_method("baseline", bits)
    prepare(m, cfg)
    calibrate(m, [test_images("vit_fmnist", 8)])
    meta = {"model": "vit_fmnist", "quant": cfg.to_dict(), "input_size": list(spec.input_size), "mean": list(spec.mean),
            "std": list(spec.std), "num_classes": 10, "class_names": [str(i) for i in range(10)]}
    return save_checkpoint(str(path), m, meta), m


def test_final_rows_report_bitops_and_model_bytes(tmp_path):
    from experiments.measures import checkpoint_measures
    from train.mixedbits import _layer_modules

    p3, m3 = _checkpoint(tmp_path / "w3", 3)
    p4, _ = _checkpoint(tmp_path / "w4", 4)
    a, b = checkpoint_measures(p3), checkpoint_measures(p4)
    block_weights = sum(m.weight.numel() for _, m, role in _layer_modules(m3) if role == "block")
    assert b["model_bytes"] - a["model_bytes"] == block_weights // 8  # one bit more per block weight
    assert b["bitops_g"] > a["bitops_g"] > 0 and a["w_bits"] < b["w_bits"]
