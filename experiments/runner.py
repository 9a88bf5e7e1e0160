"""The seeded, resumable study behind ``qvit study`` (:mod:`experiments.study` is its command line): the grid,
the runs, their records, the choices and the budget stage.

Stages: ``budget`` (the LSQ+ baseline and the harder embed+head setting at growing QAT budgets until the
validation curve is flat: the converged budget B), ``stage1``-``stage3`` (IRM/DGD choices, run at B with
``--budget B --choose-at B``) and ``final`` (every method at B, W2A2 with 5 paired seeds first).
The grid (configs x seeds x bits x QAT steps) is declared below in :func:`stage_groups`.  Every
run trains through the stable CLI (``python -m train``, one subprocess per run) on the training
split less a fixed, stratified 5,000-image validation split (``--holdout``); every choice is made
on those validation numbers, and the test split is read only by ``--eval-test``, once per run of
a stage's ``final`` group.

Resumable by construction:

* each finished run is one JSON file under ``--results`` (atomic write); a rerun skips it;
* a run is trained in chunks of :data:`CHUNK` QAT steps (one trainer "epoch" each, with its
  checkpoint and validation), so a killed run restarts from its last chunk (``--resume``);
* ``--time-limit``, ``--max-runs`` or a file ``WORK/STOP`` end a sitting cleanly (no run starts
  after them; the running one finishes); the next sitting continues.

One FP teacher per model (seed 0, shared by every seed and row): the seeds vary the QAT (data
order, calibration batches, quantizer init), so configs are compared on paired runs from the
same teacher.  Choices (DGD weight, DGD on q/k, IRM variant) are made at the stage's first
bit-width (W2A2), where the paper claims the largest gains; the other bit-widths check them.

Optuna (SQLite) was considered: a declared grid with per-run JSON files (required: they are
committed under ``docs/``) needs no sampler or trial database, and a file per run is what makes
skip/resume obvious and merge-friendly, so the runner keeps to the standard library.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from qformat.errors import UserError
from qformat.io import read_json, write_json

#: QAT steps per trainer epoch: every run is checkpointed and validated every CHUNK steps
CHUNK = 250
SCHEMA = "qvit-study-run/1"
#: flag name in a config -> ``python -m train`` option
FLAGS = {"method": "--method", "model": "--model", "dgd_weight": "--dgd-weight", "dgd_on": "--dgd-on",
         "irm_per_head": "--irm-per-head", "irm_init": "--irm-init", "irm_blend_steps": "--irm-blend-steps",
         "module_scales": "--module-scales", "obr": "--obr", "obr_lambda": "--obr-lambda",
         "bit_penalty": "--bit-penalty", "bitops_weight": "--bitops-weight", "bit_lr": "--bit-lr"}
#: config key -> ``python -m train`` flags built from its value: ``edges: 2`` quantizes the patch embedding
#: and the head at 2 bits too (the harder setting; by default they stay at 8 bits)
EXPANDS = {"edges": lambda b: ["--quant-override", json.dumps({m: {"w_bits": int(b), "a_bits": int(b)}
                                                                for m in ("patch_embed.proj", "head")})]}
DGD_WEIGHTS = (0.01, 0.03, 0.1, 0.3, 1.0)
BASELINE = {"method": "baseline"}
IRM = {"method": "irm"}
IRM_VARIANTS = ({"irm_per_head": True}, {"irm_per_head": True, "irm_init": "std"}, {"irm_blend_steps": 100},
                {"model": "vit_fmnist_irm"})
#: the choices stage 1 makes, which the final rows of every stage need
NEEDS = ("dgd_weight", "dgd_on", "irm")
#: Rows that join every stage's final table once their methods are on main: issue #11's learned
#: head-wise bit-widths and issue #12's VVTQ (e.g. ``{"method": "mp"}``, ``{"method": "vvtq"}`` with their
#: best settings as flags, as in ``FLAGS``), trained with the same seeds, teacher and budget as the rest.
#: Empty until they land: neither was on main when this study ran.
#: ``mp`` learns the widths under the BitOPs of the cell's uniform width (W4A4 column: the BitOPs of uniform
#: 4 bits, W3A3: 3 bits); VVTQ distils from a 4-crop soft-label store of the teacher; the combination row is
#: Q-ViT with VVTQ's three parts (module scales, OBR, multi-crop KD).
VVTQ = {"method": "vvtq", "crops": 4}
MP = {"method": "mp"}
COMBO = {"method": "qvit", "module_scales": True, "obr": True, "crops": 4}
EXTRA_FINAL_ROWS: tuple = (VVTQ, MP, COMBO)
#: the harder setting: patch embedding and head quantized at 2 bits too
HARD = {"method": "baseline", "edges": 2}
#: QAT steps the budget stage tries, in order (each with its own cosine schedule)
BUDGETS = (1000, 2000, 4000, 8000)
#: the budget stage stops once the baseline's mean validation top-1 moves by at most this between budgets
FLAT = 0.2
#: seeds per bit-width of the final table, in the order compute goes to them (W2A2 first)
FINAL_SEEDS = {2: 5, 4: 3, 3: 3}
#: seconds per QAT step assumed by ``--plan`` before any run has finished: vit_fmnist, batch 128, one
#: thread of a 2-core AMD EPYC (../shared/notes/convergence-w2a2.md: 2.7 min per 430 steps)
DEFAULT_SPS = 0.38
STAGES = {"stage1": dict(steps=250, bits=(2, 3)), "stage2": dict(steps=1000, bits=(2, 3)),
          "stage3": dict(steps=4000, bits=(2,)), "budget": dict(steps=BUDGETS, bits=(2, 4)),
          "final": dict(steps="B", bits=tuple(FINAL_SEEDS))}
#: stages whose groups need no stage-1 choice (the final stage uses the presets until the choices exist)
FREE_STAGES = ("budget", "final")


# ----------------------------------------------------------------------------- the grid

@dataclass
class Group:
    """Configs compared together; ``choose`` names the choice their validation numbers make."""

    name: str
    configs: list[dict]
    choose: Optional[str] = None
    final: bool = False  # the rows of the stage's result table (``--eval-test`` reads the test set for them)


def slug(cfg: dict) -> str:
    """Stable, file-name-safe name of a config: ``qvit__dgd_on-q__dgd_weight-0.1``."""
    parts = [cfg["method"]] + [f"{k}-{_fmt(v)}" for k, v in sorted(cfg.items()) if k != "method"]
    return "__".join(parts)


def _fmt(v: Any) -> str:
    if v is True:
        return "1"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace(",", "+")


def label(cfg: dict) -> str:
    """Row label people read: ``+IRM+DGD (w=0.1, q)``."""
    names = {"baseline": "Baseline", "irm": "+IRM", "dgd": "+DGD", "qvit": "+IRM+DGD", "vvtq": "VVTQ",
             "mp": "Learned bits"}
    opts = []
    if "dgd_weight" in cfg:
        opts.append(f"w={cfg['dgd_weight']:g}")
    if "dgd_on" in cfg:
        opts.append(f"on {cfg['dgd_on']}")
    if cfg.get("irm_per_head"):
        opts.append("per-head")
    if cfg.get("irm_init") == "std":
        opts.append("std init")
    if cfg.get("irm_blend_steps"):
        opts.append(f"blend {cfg['irm_blend_steps']}")
    if cfg.get("model", "").endswith("_irm"):
        opts.append("IRM at FP")
    if cfg.get("module_scales") and cfg.get("obr"):
        opts.append("VVTQ scales + OBR")
    if "crops" in cfg:
        opts.append(f"{cfg['crops']}-crop KD")
    if "edges" in cfg:
        opts.append(f"embed+head {cfg['edges']}-bit")
    opts += [f"{k.replace('_', ' ')} {_fmt(cfg[k])}" for k in ("obr_lambda", "bit_penalty", "bitops_weight", "bit_lr")
             if k in cfg]
    return names.get(cfg["method"], cfg["method"]) + (f" ({', '.join(opts)})" if opts else "")


def stage_groups(stage: str, choices: dict) -> list[Group]:
    """The groups of ``stage`` that can be declared given the ``choices`` made so far (in order)."""
    if stage == "budget":
        return [Group("budget", [BASELINE, HARD])]
    if stage == "final":
        return [Group("final", final_rows(choices, with_single=False, presets=True), final=True)]
    if stage == "stage1":
        groups = [Group("reference", [BASELINE, IRM]),
                  Group("dgd_weight", [IRM] + [{"method": "qvit", "dgd_weight": w} for w in DGD_WEIGHTS],
                        choose="dgd_weight"),
                  Group("irm_variant", [IRM] + [{"method": "irm", **v} for v in IRM_VARIANTS], choose="irm")]
        if "dgd_weight" in choices:
            w = choices["dgd_weight"]["dgd_weight_positive"]
            groups.insert(2, Group("dgd_on", [{"method": "qvit", "dgd_weight": w, "dgd_on": on}
                                              for on in ("q", "k", "q,k")], choose="dgd_on"))
    else:
        groups = []
    if set(NEEDS) <= set(choices):
        groups.append(Group("final", final_rows(choices, with_single=stage != "stage3"), final=True))
    return groups


def final_rows(choices: dict, with_single: bool = True, presets: bool = False) -> list[dict]:
    """Baseline / +IRM / +DGD / +IRM+DGD with the chosen settings (only baseline and both at stage 3),
    then :data:`EXTRA_FINAL_ROWS`; ``presets``: the methods' defaults while a choice is missing."""
    if presets and not set(NEEDS) <= set(choices):
        return [BASELINE, {"method": "qvit"}] + [dict(r) for r in EXTRA_FINAL_ROWS]
    dgd = {"dgd_weight": choices["dgd_weight"]["dgd_weight_positive"], **choices["dgd_on"]["flags"]}
    irm = dict(choices["irm"]["flags"])
    rows = [BASELINE]
    if with_single:
        rows += [{"method": "irm", **irm}, {"method": "dgd", **dgd}]
    return rows + [{"method": "qvit", **irm, **dgd}] + [dict(r) for r in EXTRA_FINAL_ROWS]


# ----------------------------------------------------------------------------- runs on disk

@dataclass
class Settings:
    """Everything the runs of one study share; a run's JSON records it, and a rerun with other
    settings refuses to mix its numbers with the stored ones."""

    model: str = "vit_fmnist"
    data: str = "fmnist"
    data_dir: Optional[str] = None
    holdout: int = 5000
    teacher_epochs: int = 10
    teacher_lr: float = 2e-3
    batch_size: int = 128
    max_eval_batches: Optional[int] = None
    chunk: int = CHUNK

    def identity(self) -> dict:
        d = dict(self.__dict__)
        d.pop("data_dir")
        return d


@dataclass
class Study:
    """Where a study lives and how it runs (the small state object passed around)."""

    results: str  # per-run JSON files (committed)
    work: str  # run folders with checkpoints and logs (not committed)
    settings: Settings
    launch: Callable[[list, str], int] = None  # type: ignore[assignment]
    #: (stage, choices) -> groups; the declared grid unless a test swaps in a tiny one
    grid: Callable[[str, dict], list] = None  # type: ignore[assignment]
    needs: tuple = NEEDS
    deadline: float = math.inf
    max_runs: Optional[int] = None  # runs this sitting may start (None: all)
    started: int = 0
    #: ``--only``: fnmatch patterns over config slugs; the runs of other configs are not started
    only: tuple = ()
    #: ``--device`` of every run (None: the trainer's auto); not part of the settings, but recorded per run
    device: Optional[str] = None

    def wanted(self, cfg: dict) -> bool:
        return not self.only or any(fnmatch.fnmatchcase(slug(cfg), p) for p in self.only)

    def __post_init__(self) -> None:
        self.launch = self.launch or launch_subprocess
        self.grid = self.grid or stage_groups

    def run_name(self, cfg: dict, bits: int, seed: int, steps: int) -> str:
        return f"s{steps}/{slug(cfg)}__w{bits}a{bits}__seed{seed}"

    def json_path(self, cfg: dict, bits: int, seed: int, steps: int) -> str:
        return os.path.join(self.results, "runs", self.run_name(cfg, bits, seed, steps) + ".json")

    def run_dir(self, cfg: dict, bits: int, seed: int, steps: int) -> str:
        return os.path.join(self.work, "runs", self.run_name(cfg, bits, seed, steps))

    def teacher_dir(self, model: str) -> str:
        return os.path.join(self.work, "teachers", model)

    def store_dir(self, model: str, crops: int) -> str:
        return os.path.join(self.work, "stores", f"{model}_crops{crops}")

    def teacher_json(self, model: str) -> str:
        return os.path.join(self.results, "teachers", model + ".json")


def load_run(study: Study, cfg: dict, bits: int, seed: int, steps: int) -> Optional[dict]:
    """The finished run's record, or None; a record made with other settings is an error."""
    path = study.json_path(cfg, bits, seed, steps)
    if not os.path.isfile(path):
        return None
    rec = read_json(path, "study run")
    if rec.get("schema") != SCHEMA or rec.get("settings") != study.settings.identity():
        raise UserError(f"{path} was made with other study settings ({rec.get('settings')}); use another "
                        "--results folder, or delete it to redo that run")
    return rec


# ----------------------------------------------------------------------------- launching training

def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the trainer gets SIGTERM when the runner dies, so no orphan trains behind a rerun."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_subprocess(argv: list, log_path: str) -> int:
    """``python -m train ARGV`` with this checkout first on the path; output appended to ``log_path``."""
    return spawn([sys.executable, "-m", "train", *argv], log_path)


def spawn(cmd: list, log_path: str) -> int:
    """Run ``cmd`` with this checkout first on the path, output appended to ``log_path``; it is one of
    :data:`LIVE` while it runs (so a hard time limit can stop it) and dies with this process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        LIVE.add(proc)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            LIVE.discard(proc)


#: the trainers running now (several with ``--jobs``): ``stop_live`` ends them at a hard time limit
LIVE: set = set()


def stop_live() -> int:
    """SIGTERM every running trainer (each resumes from its last chunk next sitting); how many."""
    procs = list(LIVE)
    for proc in procs:
        proc.terminate()
    return len(procs)


def launch_inprocess(argv: list, log_path: str) -> int:
    """Same as :func:`launch_subprocess` inside this process (tests: no interpreter start-up)."""
    import contextlib

    from train.cli import main

    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            return int(main(argv) or 0)
        except SystemExit as e:
            return int(e.code or 0)


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "empty log")


def _read_meta(run_dir: str) -> Optional[dict]:
    from train.checkpoint import read_meta

    return read_meta(os.path.join(run_dir, "last.json"))


def _curve(run_dir: str) -> list[dict]:
    import csv

    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    keep = ("step", "val_top1", "val_loss", "train_loss", "train_acc", "train_ce", "train_kd", "train_dgd", "time_s")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: round(float(r[k]), 4) for k in keep if r.get(k) not in (None, "")} for r in csv.DictReader(f)]
    for r in rows:
        r["step"] = int(r.get("step", 0))
    return rows


def _machine(threads: Optional[str]) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "device": dev, "torch": torch.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- teacher and runs

def ensure_teacher(study: Study, model: str) -> dict:
    """The FP teacher of ``model`` (seed 0, shared by every run): its record, trained first if needed.
    The record's ``path`` (not stored) is the checkpoint on this machine."""
    path, out = study.teacher_json(model), study.teacher_dir(model)
    ckpt = os.path.join(out, "last.safetensors")
    if os.path.isfile(path):
        rec = read_json(path, "study teacher")
        if rec.get("settings") == study.settings.identity() and os.path.isfile(ckpt):
            return dict(rec, path=ckpt)
    s = study.settings
    argv = ["--model", model, "--method", "fp", "--data", s.data, "--holdout", str(s.holdout), "--seed", "0",
            "--epochs", str(s.teacher_epochs), "--lr", str(s.teacher_lr), "--batch-size", str(s.batch_size),
            "--no-tensorboard", "--out", out] + _common(s)
    meta = _read_meta(out)
    if not (meta and meta.get("epoch") == s.teacher_epochs):
        print(f"[study] FP teacher {model}: {s.teacher_epochs} epochs -> {out}", flush=True)
        t0 = time.time()
        rc = study.launch(argv + (["--resume"] if os.path.isdir(out) else []), out + ".log")
        print(f"[study]   -> {time.time() - t0:.0f} s", flush=True)
        meta = _read_meta(out)
        if rc != 0 or not meta or meta.get("epoch") != s.teacher_epochs:
            raise UserError(f"FP teacher {model} did not finish (exit {rc}: {_last_error(out + '.log')}); "
                            f"see {out}.log, then rerun to resume it")
    rec = {"schema": SCHEMA, "settings": s.identity(), "model": model, "images": meta.get("images"),
           "code_revision": meta.get("code_revision"),
           "checkpoint": ckpt.replace(study.work, "$WORK"), "sha256": _sha256(ckpt)[:16],
           "val_top1": meta["metrics"]["top1"], "curve": _curve(out)}
    write_json(path, rec)
    return dict(rec, path=ckpt)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _common(s: Settings) -> list:
    out = ["--data-dir", s.data_dir] if s.data_dir else []
    return out + (["--max-eval-batches", str(s.max_eval_batches)] if s.max_eval_batches else [])


def train_argv(study: Study, cfg: dict, bits: int, seed: int, steps: int, teacher: dict) -> list:
    """``python -m train`` flags of one run: STEPS QAT steps as STEPS / chunk epochs of chunk steps."""
    s = study.settings
    chunk = min(steps, s.chunk)
    if steps % chunk:
        raise UserError(f"--budget {steps}: give a multiple of {chunk} QAT steps (runs are checkpointed "
                        f"every {chunk} steps)")
    argv = ["--model", cfg.get("model", s.model), "--data", s.data, "--holdout", str(s.holdout), "--bits", str(bits),
            "--seed", str(seed), "--epochs", str(steps // chunk), "--max-train-batches", str(chunk),
            "--batch-size", str(s.batch_size), "--checkpoint", teacher["path"],
            "--teacher", teacher["path"], "--no-tensorboard"] + _common(s)
    if study.device:
        argv += ["--device", study.device]
    for key, value in cfg.items():
        if key == "model":
            continue
        if key == "crops":  # VVTQ's multi-crop KD: the soft-label store of this teacher (made once)
            argv += ["--multicrop-kd", study.store_dir(cfg.get("model", s.model), int(value))]
            continue
        if key in EXPANDS:
            argv += EXPANDS[key](value)
            continue
        if key not in FLAGS:
            raise UserError(f"study config {cfg}: unknown key {key!r}")
        if value is True:
            argv.append(FLAGS[key])
        else:
            argv += [FLAGS[key], str(value)]
    return argv


def ensure_inputs(study: Study, cfg: dict) -> dict:
    """What a run of ``cfg`` reads before it trains: its FP teacher and, for ``crops``, the teacher's
    soft-label store (``python -m train.softlabels`` on the training split less the validation split)."""
    model = cfg.get("model", study.settings.model)
    teacher = ensure_teacher(study, model)
    if "crops" in cfg:
        out, s = study.store_dir(model, int(cfg["crops"])), study.settings
        manifest = os.path.join(out, "manifest.json")
        if not (os.path.isfile(manifest) and read_json(manifest, "soft-label manifest").get("complete")):
            argv = ["--teacher", teacher["path"], "--data", s.data, "--holdout", str(s.holdout), "--crops",
                    str(cfg["crops"]), "--out", out, "--quiet"] + (["--data-dir", s.data_dir] if s.data_dir else [])
            if study.device:
                argv += ["--device", study.device]
            print(f"[study] soft-label store of {model}, {cfg['crops']} crops -> {out}", flush=True)
            rc = spawn([sys.executable, "-m", "train.softlabels", *argv], out + ".log")
            if rc != 0:
                raise UserError(f"soft-label store {out} did not finish (exit {rc}: {_last_error(out + '.log')}); "
                                "rerun to continue it")
    return teacher


def run_one(study: Study, cfg: dict, bits: int, seed: int, steps: int) -> Optional[dict]:
    """Train (or resume, or just record) one run and write its JSON; None if it did not finish."""
    teacher = ensure_inputs(study, cfg)
    out = study.run_dir(cfg, bits, seed, steps)
    before = _read_meta(out)
    start_step = int(before.get("step", 0)) if before else 0
    argv = train_argv(study, cfg, bits, seed, steps, teacher) + ["--out", out]
    what = f"{label(cfg)} W{bits}A{bits} seed {seed}, {steps} steps"
    print(f"[study] {what}" + (f" (resuming at step {start_step})" if start_step else ""), flush=True)
    t0 = time.time()
    rc = study.launch(argv + (["--resume"] if os.path.isdir(out) else []), out + ".log")
    wall = time.time() - t0
    meta = _read_meta(out)
    finished = rc == 0 and meta is not None and meta.get("epoch") == meta.get("epochs")
    if not finished and rc != 2:
        raise UserError(f"{what}: training stopped (exit {rc}: {_last_error(out + '.log')}); rerun to resume it")
    rec = {"schema": SCHEMA, "settings": study.settings.identity(), "config": cfg, "label": label(cfg),
           "bits": bits, "seed": seed, "steps": steps, "argv": [a.replace(study.work, "$WORK") for a in argv],
           "teacher": {k: teacher[k] for k in ("model", "sha256", "val_top1")},
           "resumed_from_step": start_step, "wall_s": round(wall, 1), "curve": _curve(out),
           "machine": _machine(os.environ.get("OMP_NUM_THREADS")), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if finished:
        rec["val_top1"] = float(meta["metrics"]["top1"])
        rec["code_revision"] = meta.get("code_revision")
        # the index sets it trained and validated on (sha256 of the sorted indices; train/provenance.py)
        rec["split"] = {"train": (meta.get("images") or {}).get("sha256"),
                        "val": (meta.get("val_images") or {}).get("sha256")}
        rec["train_s"] = round(sum(r.get("time_s", 0.0) for r in rec["curve"]), 1)
    else:  # the trainer refused or diverged (exit 2, one error line): a result, recorded as a failure
        rec["failed"] = _last_error(out + ".log")
    write_json(study.json_path(cfg, bits, seed, steps), rec)
    print("[study]   -> " + (f"val top-1 {rec['val_top1']:.2f}" if finished else rec["failed"])
          + f" ({wall:.0f} s)", flush=True)
    return rec


# ----------------------------------------------------------------------------- choices

def cell(study: Study, cfg: dict, bits: int, seeds: list, steps: int) -> list[dict]:
    """The finished runs of one (config, bits, steps) cell, one per seed that has finished."""
    recs = (load_run(study, cfg, bits, s, steps) for s in seeds)
    return [r for r in recs if r is not None]


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def score(study: Study, cfg: dict, bits: int, seeds: list, steps: int) -> Optional[float]:
    """Mean validation top-1 over ``seeds``; None until every seed has finished; a failed run scores -inf."""
    recs = cell(study, cfg, bits, seeds, steps)
    if len(recs) < len(seeds):
        return None
    if any("val_top1" not in r for r in recs):
        return -math.inf
    return mean_std([r["val_top1"] for r in recs])[0]


def choose(study: Study, group: Group, bits: int, seeds: list, steps: int) -> Optional[dict]:
    """What ``group`` decides (highest mean validation top-1 at ``bits``), or None while incomplete."""
    scores = {slug(c): score(study, c, bits, seeds, steps) for c in group.configs}
    if any(v is None for v in scores.values()):
        return None
    best = max(group.configs, key=lambda c: scores[slug(c)])
    out: dict = {"bits": bits, "steps": steps, "seeds": list(seeds), "winner": label(best),
                 "scores": {label(c): round(scores[slug(c)], 3) for c in group.configs}}
    if group.choose == "dgd_weight":
        positive = [c for c in group.configs if c.get("dgd_weight")]
        out["dgd_weight"] = best.get("dgd_weight", 0.0)  # 0: IRM alone beat every DGD weight
        out["dgd_weight_positive"] = max(positive, key=lambda c: scores[slug(c)])["dgd_weight"]
    elif group.choose == "dgd_on":
        out["flags"] = {} if best["dgd_on"] == "q,k" else {"dgd_on": best["dgd_on"]}
    elif group.choose == "irm":
        out["flags"] = {k: v for k, v in best.items() if k != "method"}
    return out


def make_choices(study: Study, bits: int, seeds: list, steps: int) -> dict:
    """Every choice stage 1's results at (``bits``, ``steps``) can make so far, in dependency order."""
    choices: dict = {}
    while True:
        pending = [g for g in study.grid("stage1", choices) if g.choose and g.choose not in choices]
        made = {g.choose: c for g in pending if (c := choose(study, g, bits, seeds, steps)) is not None}
        if not made:
            return choices
        choices.update(made)


# ----------------------------------------------------------------------------- the runner

@dataclass
class Plan:
    """What one invocation covers: a stage at some bit-widths, seeds and QAT steps."""

    stage: str
    bits: list
    seeds: list
    steps: int
    choose_bits: int
    choose_steps: int
    choose_seeds: Optional[list] = None  # the stage-1 seeds the choices are made on (default: ``seeds``)

    def choices(self, study: Study) -> dict:
        return make_choices(study, self.choose_bits, self.choose_seeds or self.seeds, self.choose_steps)


def _sitting_over(study: Study) -> Optional[str]:
    """Why no further run may start in this sitting, or None."""
    stop = os.path.join(study.work, "STOP")
    if os.path.exists(stop):
        os.unlink(stop)
        return f"{stop} was found (and removed)"
    if time.time() > study.deadline:
        return "--time-limit is reached"
    if study.max_runs is not None and study.started >= study.max_runs:
        return "--max-runs is reached"
    return None


def run_stage(study: Study, plan: Plan) -> bool:
    """Train every run of the plan not yet finished, group by group, seed-major within a group
    (so a partial sitting has every config at seed 0 first); at the bit-widths that do not make
    the choices, the final rows come first. True when nothing is left to do."""
    for bits in plan.bits:
        done: set = set()
        while True:
            groups = [g for g in study.grid(plan.stage, plan.choices(study)) if g.name not in done]
            if not groups:
                break
            group = next((g for g in groups if g.final), groups[0]) if bits != plan.choose_bits else groups[0]
            for seed in plan.seeds:
                for cfg in group.configs:
                    if not study.wanted(cfg) or load_run(study, cfg, bits, seed, plan.steps) is not None:
                        continue
                    why = _sitting_over(study)
                    if why:
                        print(f"[study] {why}: no new run starts; rerun the same command to continue", flush=True)
                        return False
                    study.started += 1
                    run_one(study, cfg, bits, seed, plan.steps)
            done.add(group.name)
    missing = _waiting_for(study, plan.stage, plan.choices(study))
    if missing:
        print(f"[study] {plan.stage}: groups still wait for the choice(s) {', '.join(missing)} (stage 1 at "
              f"W{plan.choose_bits}A{plan.choose_bits}, {plan.choose_steps} steps, seeds {plan.seeds})", flush=True)
    return not missing


def _waiting_for(study: Study, stage: str, choices: dict) -> list:
    """Choices the grid needs (for its later groups) that stage 1 has not made yet."""
    return [] if stage in FREE_STAGES else [c for c in study.needs if c not in choices]


# ----------------------------------------------------------------------------- the test set, once

def _test_loader(study: Study, meta: dict):
    """The test split (``--holdout 0``'s validation set) for a checkpoint's preprocessing."""
    from torch.utils.data import DataLoader

    from train.data import build_datasets

    _, test, _ = build_datasets(study.settings.data, meta["input_size"], meta["mean"], meta["std"],
                                data_dir=study.settings.data_dir, seed=0)
    return DataLoader(test, batch_size=256, shuffle=False)


def test_top1(study: Study, checkpoint: str) -> float:
    """Top-1 of a checkpoint's converted model (integer weights, what export reads) on the test split."""
    import torch

    from train.checkpoint import load_converted
    from train.evaluate import evaluate

    model, meta = load_converted(checkpoint)
    ev = evaluate(model, _test_loader(study, meta), torch.device("cpu"), study.settings.max_eval_batches)
    return float(ev["top1"])


def eval_test(study: Study, plan: Plan) -> int:
    """Read the test set once for every finished run of the stage's final rows (and their teachers);
    a run that already has a test number is never evaluated again. Returns how many were evaluated."""
    groups = [g for g in study.grid(plan.stage, plan.choices(study)) if g.final]
    if not groups:
        raise UserError(f"--eval-test: {plan.stage} has no final rows yet (stage 1's choices are incomplete: "
                        f"{', '.join(_waiting_for(study, plan.stage, plan.choices(study)))}); run the study first")
    n = 0
    for cfg in groups[0].configs:
        model = cfg.get("model", study.settings.model)
        teacher = read_json(study.teacher_json(model), "study teacher")
        if "test_top1" not in teacher:
            teacher["test_top1"] = test_top1(study, os.path.join(study.teacher_dir(model), "last.safetensors"))
            write_json(study.teacher_json(model), teacher)
            n += 1
        for bits in plan.bits:
            for seed in plan.seeds:
                rec = load_run(study, cfg, bits, seed, plan.steps)
                if rec is None or "test_top1" in rec or "val_top1" not in rec:
                    continue
                ckpt = os.path.join(study.run_dir(cfg, bits, seed, plan.steps), "last.safetensors")
                rec["test_top1"] = test_top1(study, ckpt)
                from experiments.measures import checkpoint_measures

                rec.update(checkpoint_measures(ckpt))  # BitOPs and model bytes of the final model
                rec["test_evaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                write_json(study.json_path(cfg, bits, seed, plan.steps), rec)
                print(f"[study] test: {label(cfg)} W{bits}A{bits} seed {seed}: {rec['test_top1']:.2f}", flush=True)
                n += 1
    return n


# ----------------------------------------------------------------------------- tables and plots

def stats(study: Study, cfg: dict, bits: int, seeds: list, steps: int, key: str = "val_top1") -> Optional[dict]:
    """mean, std, n and the per-seed values of ``key`` over the finished seeds of a cell."""
    per_seed = {r["seed"]: r[key] for r in cell(study, cfg, bits, seeds, steps) if key in r}
    if not per_seed:
        return None
    m, sd = mean_std(list(per_seed.values()))
    return {"mean": m, "std": sd, "n": len(per_seed), "per_seed": per_seed}


def _cell_text(st: Optional[dict], total: int) -> str:
    """``mean ± std``; one seed has no spread, so it shows the value and ``(1/3)``, never ``± 0.00``."""
    if st is None:
        return "–"
    n = "" if st["n"] == total else f" ({st['n']}/{total})"
    return (f"{st['mean']:.2f}" if st["n"] == 1 else f"{st['mean']:.2f} ± {st['std']:.2f}") + n


def _delta(st: Optional[dict], ref: Optional[dict]) -> str:
    """Paired difference (same seeds) to the reference row: mean ± std over seeds (one seed: the value)."""
    if st is None or ref is None:
        return "–"
    common = sorted(set(st["per_seed"]) & set(ref["per_seed"]))
    if not common:
        return "–"
    m, sd = mean_std([st["per_seed"][s] - ref["per_seed"][s] for s in common])
    return f"{m:+.2f} (seed {common[0]})" if len(common) == 1 else f"{m:+.2f} ± {sd:.2f} (n={len(common)})"


def group_table(study: Study, group: Group, bits_list: list, seeds: list, steps: int,
                key: str = "val_top1", ref: Optional[dict] = None) -> str:
    """Markdown: one row per config, per bit-width mean ± std and the paired Δ to ``ref`` (default: row 1)."""
    ref = ref or group.configs[0]
    head = "| config | " + " | ".join(f"W{b}A{b} | Δ vs {label(ref)}" for b in bits_list) + " |"
    lines = [head, "|---|" + "---|---|" * len(bits_list)]
    for cfg in group.configs:
        cells = []
        for b in bits_list:
            st, rs = stats(study, cfg, b, seeds, steps, key), stats(study, ref, b, seeds, steps, key)
            cells += [_cell_text(st, len(seeds)), "ref" if cfg == ref else _delta(st, rs)]
        lines.append(f"| {label(cfg)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_groups(study: Study, groups: list, bits_list: list, seeds: list, steps: int, title: str, path: str,
                key: str = "val_top1", fp: Optional[float] = None) -> bool:
    """One panel per group: mean ± std (error bars) per config and bit-width. False if nothing to plot."""
    from train.plots import pyplot, save_png

    plt = pyplot()

    def has(c: dict) -> bool:
        return any(stats(study, c, b, seeds, steps, key) for b in bits_list)

    # a panel needs something to compare: two configs with numbers (or the one config of a 1-row group)
    groups = [g for g in groups if sum(map(has, g.configs)) >= min(2, len(g.configs))]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups), 0.5 * max(len(g.configs) for g in groups)
                                                      + 1.8), dpi=110, squeeze=False)
    for ax, g in zip(axes[0], groups):
        for i, b in enumerate(bits_list):
            ys, xs, es = [], [], []
            for j, cfg in enumerate(g.configs):
                st = stats(study, cfg, b, seeds, steps, key)
                if st:
                    ys.append(j + (i - (len(bits_list) - 1) / 2) * 0.18)
                    xs.append(st["mean"])
                    es.append(st["std"])
            ax.errorbar(xs, ys, xerr=es, fmt="os^D"[i % 4], capsize=3, label=f"W{b}A{b}")
        if fp is not None:
            ax.axvline(fp, color="k", ls="--", lw=1, label=f"FP ({fp:.2f})")
        ax.set_yticks(range(len(g.configs)))
        ax.set_yticklabels([label(c) for c in g.configs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(g.name, fontsize=9)
        ax.set_xlabel(("test" if key == "test_top1" else "validation") + " top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)
    return True


def plot_sweep(study: Study, group: Group, bits_list: list, seeds: list, steps: int, path: str) -> bool:
    """The DGD weight sweep as a curve: validation top-1 vs weight (log axis), IRM alone as a band."""
    from train.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    drawn = False
    for i, b in enumerate(bits_list):
        pts = [(c["dgd_weight"], stats(study, c, b, seeds, steps)) for c in group.configs if c.get("dgd_weight")]
        pts = [(w, st) for w, st in pts if st]
        ref = next((stats(study, c, b, seeds, steps) for c in group.configs if not c.get("dgd_weight")), None)
        if pts:
            line = ax.errorbar([w for w, _ in pts], [st["mean"] for _, st in pts], yerr=[st["std"] for _, st in pts],
                               fmt="-" + "os^D"[i % 4], capsize=3, label=f"+IRM+DGD W{b}A{b}")
            drawn = True
            c = line[0].get_color()
            seeds_x = [w for w, st in pts for _ in st["per_seed"]]
            ax.scatter(seeds_x, [v for _, st in pts for v in st["per_seed"].values()], s=10, color=c, alpha=0.5,
                       label=f"single seeds W{b}A{b}")
            base = stats(study, BASELINE, b, seeds, steps)
            for st, ls, alpha, name in ((ref, "--", 0.12, "+IRM alone"), (base, ":", 0.08, "Baseline")):
                if st:
                    ax.axhline(st["mean"], color=c, ls=ls, lw=1, label=f"{name} W{b}A{b} (n={st['n']}, ±1 std)")
                    ax.axhspan(st["mean"] - st["std"], st["mean"] + st["std"], color=c, alpha=alpha)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_xlabel("DGD weight (dgd_mean: mean over layer-head pairs)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"DGD weight sweep, {steps} QAT steps: mean ± std over finished seeds\n"
                 f"(of {seeds}); dots = single seeds", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
    return True


def _stage_wall(study: Study, groups: list, bits_list: list, seeds: list, steps: int) -> tuple[float, int]:
    seen, total = set(), 0.0
    for g in groups:
        for cfg in g.configs:
            for b in bits_list:
                for r in cell(study, cfg, b, seeds, steps):
                    key = (slug(cfg), b, r["seed"])
                    if key not in seen:
                        seen.add(key)
                        total += r.get("wall_s", 0.0)
    return total, len(seen)


# ----------------------------------------------------------------------------- command line

def _ints(text: str, flag: str, lo: int, hi: int) -> list:
    """Comma-separated integers in [lo, hi], or a one-line error naming ``flag``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not values:
        raise UserError(f"{flag} is empty: give comma-separated integers")
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise UserError(f"{flag} {text!r}: {bad[0]} is outside {lo}..{hi}")
    return values


# ----------------------------------------------------------------------------- the budget stage

#: seeds of the budget stage (and of the choices the final stage reads)
BUDGET_SEEDS = (0, 1, 2)


def budget_curve(study: Study, cfg: dict, bits: int, seeds: list) -> list:
    """[(steps, stats)] of ``cfg`` at ``bits`` over :data:`BUDGETS` (finished seeds only)."""
    out = []
    for steps in BUDGETS:
        st = stats(study, cfg, bits, list(seeds), steps)
        if st:
            out.append((steps, st))
    return out


def converged_budget(study: Study, seeds, bits_list: tuple = (2, 4)) -> Optional[int]:
    """The converged budget B: the first budget after which the baseline's mean validation top-1 moves by at
    most :data:`FLAT` points at every bit-width (all seeds finished at both budgets); None until then."""
    for lo, hi in zip(BUDGETS, BUDGETS[1:]):
        flat = True
        for b in bits_list:
            m_lo, m_hi = score(study, BASELINE, b, list(seeds), lo), score(study, BASELINE, b, list(seeds), hi)
            if m_lo is None or m_hi is None:
                return None
            flat = flat and abs(m_hi - m_lo) <= FLAT
        if flat:
            return lo
    return None


def budget_needed(study: Study, plan: Plan) -> bool:
    """Whether a budget-stage plan still matters: not once the curve is flat at a smaller budget (the
    budget right after B is needed: it is what shows the curve flat)."""
    b = converged_budget(study, plan.seeds, tuple(plan.bits))
    return b is None or plan.steps <= BUDGETS[BUDGETS.index(b) + 1]


def _all_records(study: Study) -> list:
    root = os.path.join(study.results, "runs")
    out = []
    for d, _, files in os.walk(root):
        out += [read_json(os.path.join(d, f), "study run") for f in sorted(files) if f.endswith(".json")]
    return out


def run_plans(study: Study, plans: list) -> None:
    """One run at a time, plan by plan; a budget no longer needed is skipped."""
    for plan in plans:
        if plan.stage == "budget" and not budget_needed(study, plan):
            print(f"[study] budget: {plan.steps} steps not needed: the curve is flat from B = "
                  f"{converged_budget(study, plan.seeds, tuple(plan.bits))} steps", flush=True)
            continue
        if not run_stage(study, plan):
            break
