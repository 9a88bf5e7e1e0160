"""``python -m experiments.vvtq_ablation``: VVTQ's ablation (Huang et al., Table 4) next to Q-ViT, small scale.

Rows: LSQ+ with KD, VVTQ, VVTQ without each of its three parts, Q-ViT (IRM+DGD), and VVTQ + IRM + DGD,
at every ``--bits``; same FP teacher, same FP start, same seed and steps for every row.  Runs validate
on ``--holdout`` images carved from the training split (what one would tune on); each finished run is
then scored once on the test split.  Also records each run's oscillation rate and SDAM (train/vvtq.py).

Writes ``results.json`` and ``results.md`` into ``--out``; the soft-label store (``--multicrop-kd``)
is written once into ``OUT/store`` and finished runs are reused, so an interrupted ablation continues.
"""

from __future__ import annotations

import csv
import os
import sys
import time

from experiments.ablation import last_top1, train_run
from qformat.argtypes import nonneg_int, positive_int, seed_int
from qformat.cli import parser
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, write_json

#: key -> (label, flags); ``{store}`` is the soft-label store.  VVTQ = KD alone (no label term),
#: multi-crop KD from the store, module-dependent scale gradients, OBR.
ROWS = {
    "lsqkd": ("LSQ+ with KD", ["--method", "baseline"]),
    "vvtq": ("VVTQ", ["--method", "vvtq", "--multicrop-kd", "{store}"]),
    "vvtq-mckd": ("VVTQ w/o multi-crop KD", ["--method", "vvtq"]),
    "vvtq-ms": ("VVTQ w/o module-dependent scales", ["--method", "vvtq", "--multicrop-kd", "{store}",
                                                    "--no-module-scales"]),
    "vvtq-obr": ("VVTQ w/o OBR", ["--method", "vvtq", "--multicrop-kd", "{store}", "--no-obr"]),
    "qvit": ("Q-ViT (IRM+DGD)", ["--method", "qvit"]),
    "vvtq+qvit": ("VVTQ + IRM + DGD", ["--method", "qvit", "--multicrop-kd", "{store}", "--module-scales", "--obr"]),
}


def _last_row(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def score_test(run_dir: str, data_dir: str | None) -> float:
    """Top-1 (%) of a run's last checkpoint on the Fashion-MNIST test split (fake-quantized model), computed
    once per run and kept in ``RUN/test.json``."""
    import torch

    from qformat.io import read_json

    done = os.path.join(run_dir, "test.json")
    if os.path.isfile(done):
        return float(read_json(done, "test score")["top1"])

    from train.checkpoint import build_model, load_checkpoint, load_state
    from train.data import build_datasets
    from train.evaluate import evaluate

    path = os.path.join(run_dir, "last.safetensors")
    sd, meta = load_checkpoint(path)
    model = build_model(meta)
    load_state(model, sd, path)
    _, test, _ = build_datasets("fmnist", meta["input_size"], meta["mean"], meta["std"], data_dir=data_dir)
    loader = torch.utils.data.DataLoader(test, batch_size=256)
    top1 = round(evaluate(model, loader, torch.device("cpu"))["top1"], 2)
    write_json(done, {"top1": top1, "images": len(test)})
    return top1


def markdown(res: dict) -> str:
    bits = res["bits"]
    head = "| Method | " + " | ".join(f"W{b}A{b} val / test | osc % | SDAM" for b in bits) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(bits)]
    for key in res["rows_order"]:
        cells = []
        for b in bits:
            r = res["rows"].get(key, {}).get(str(b))
            cells += [f"{r['val_top1']:.2f} / {r['test_top1']:.2f}", f"{r['osc_rate']:.2f}", f"{r['sdam']:.2e}"] \
                if r else ["–"] * 3
        lines.append(f"| {ROWS[key][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser(prog: str = "python -m experiments.vvtq_ablation"):
    p = parser(prog, __doc__.split("\n\n")[0], defaults_help=True)
    p.add_argument("--teacher", required=True, help="FP checkpoint: teacher of every row and start of every run")
    p.add_argument("--bits", default="4,3,2", help="comma-separated bit-widths")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    p.add_argument("--holdout", type=positive_int, default=5000, help="validation images carved from the training set")
    p.add_argument("--crops", type=positive_int, default=4, help="crops per image in the soft-label store")
    p.add_argument("--steps", type=positive_int, default=400, help="optimizer steps of each run (one epoch)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--eval-batches", type=nonneg_int, default=0, help="cap validation batches (0: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default="runs/vvtq_ablation")
    return p


def _store(args) -> str:
    from train.softlabels import main as softlabels_main

    store = os.path.join(args.out, "store")
    argv = ["--teacher", args.teacher, "--data", "fmnist", "--holdout", str(args.holdout), "--crops",
            str(args.crops), "--out", store, "--seed", str(args.seed)] + (
        ["--data-dir", args.data_dir] if args.data_dir else [])
    if softlabels_main(argv) != 0:
        raise UserError(f"writing the soft-label store {store} failed")
    return store


@main_guard
def main(argv: list[str] | None = None, prog: str = "python -m experiments.vvtq_ablation") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        bits = [int(b) for b in args.bits.split(",") if b]
    except ValueError:
        raise UserError(f"--bits {args.bits!r}: give comma-separated integers, e.g. 4,3,2") from None
    keys = [k for k in args.rows.split(",") if k]
    unknown = sorted(set(keys) - set(ROWS))
    if unknown:
        raise UserError(f"unknown --rows {unknown}: use {', '.join(ROWS)}")
    if not os.path.isfile(args.teacher):
        raise UserError(f"--teacher {args.teacher} does not exist: train one with python -m train --method fp")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    store = _store(args) if any("{store}" in ROWS[k][1] for k in keys) else None
    common = ["--data", "fmnist", "--holdout", str(args.holdout), "--seed", str(args.seed), "--no-tensorboard",
              "--batch-size", str(args.batch_size), "--epochs", "1", "--max-train-batches", str(args.steps),
              "--checkpoint", args.teacher, "--teacher", args.teacher] + (
        ["--max-eval-batches", str(args.eval_batches)] if args.eval_batches else []) + (
        ["--data-dir", args.data_dir] if args.data_dir else [])
    res = {"teacher": args.teacher, "holdout": args.holdout, "crops": args.crops, "steps": args.steps,
           "batch_size": args.batch_size, "seed": args.seed, "bits": bits, "rows_order": keys, "rows": {}}
    for b in bits:
        for k in keys:
            run_dir = os.path.join(args.out, f"{k}_w{b}a{b}")
            if last_top1(run_dir) is None:
                print(f"[vvtq-ablation] {ROWS[k][0]} W{b}A{b} -> {run_dir}", flush=True)
                flags = [f.replace("{store}", store or "") for f in ROWS[k][1]]
                train_run(common + flags + ["--bits", str(b), "--out", run_dir]
                       + (["--resume"] if os.path.isdir(run_dir) else []))
            last = _last_row(run_dir)
            res["rows"].setdefault(k, {})[str(b)] = {
                "val_top1": float(last["val_top1"]), "test_top1": score_test(run_dir, args.data_dir),
                "osc_rate": float(last["osc_rate"]), "sdam": float(last["sdam"])}
            write_json(os.path.join(args.out, "results.json"), res)  # partial results survive
    res["wall_s"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out, "results.json"), res)
    table = markdown(res)
    atomic_write(os.path.join(args.out, "results.md"), table.encode())
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
