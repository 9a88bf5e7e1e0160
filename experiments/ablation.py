"""``python -m experiments.ablation``: Q-ViT's Table 1 at small scale -- FP, baseline, +IRM, +DGD,
+IRM+DGD at 4/3/2 bits, same seed, same data, same budget, one shared FP teacher.

Every quantized row starts from the same FP weights and distils logits from the same FP
teacher, so the rows differ only by IRM and DGD.  Accuracy is the *last* epoch's top-1 on
the test split (no selection on the test set).  Writes ``results.json``, ``results.md`` and
``accuracy_vs_bits.png`` into ``--out``; finished runs are reused, so an interrupted
ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qformat import FormatError, check_bits
from qformat.argtypes import ArgumentParser, positive_float, seed_int
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, read_json, write_json
from qformat.lock import hold
from qformat.paths import check_out_dir

METHOD_ROWS = (("baseline", "Baseline"), ("irm", "+IRM"), ("dgd", "+DGD"), ("qvit", "+IRM+DGD (Q-ViT)"))

#: epochs of the FP teacher (full data) and of each QAT run (steps per epoch capped, None = full data)
BUDGETS = {
    "tiny": dict(fp_epochs=1, epochs=1, max_train_batches=20, max_eval_batches=10),  # smoke (FP: full epoch)
    "small": dict(fp_epochs=10, epochs=1, max_train_batches=250, max_eval_batches=None),  # CPU, ~1 h
    "medium": dict(fp_epochs=10, epochs=2, max_train_batches=None, max_eval_batches=None),  # CPU, ~5 min a row
    "full": dict(fp_epochs=30, epochs=10, max_train_batches=None, max_eval_batches=None),  # GPU
}


def train_run(argv: list[str]) -> None:
    from train.cli import parse_args
    from train.trainer import run

    run(parse_args(argv))


def last_top1(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "last.json")
    if not os.path.isfile(path):
        return None
    meta = read_json(path, "run metadata")
    if meta.get("epoch", 0) < meta.get("epochs", 1):
        return None  # unfinished: train (resume) it
    return float(meta.get("metrics", {}).get("top1"))


def markdown(results: dict) -> str:
    bits = results["bits"]
    lines = [f"| Method ({results['model']}, {results['data']}) | " + " | ".join(f"W{b}A{b}" for b in bits) + " |",
             "|---|" + "---|" * len(bits),
             "| Full precision | " + " | ".join(f"{results['fp']:.2f}" for _ in bits) + " |"]
    for key, label in METHOD_ROWS:
        row = results["rows"].get(key, {})
        cells = [f"{row[str(b)]:.2f}" if str(b) in row else "–" for b in bits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    from train.plots import pyplot, save_png

    plt = pyplot()
    bits = results["bits"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.axhline(results["fp"], color="k", ls="--", lw=1, label=f"FP32 ({results['fp']:.2f})")
    for (key, label), marker in zip(METHOD_ROWS, "os^D"):
        row = results["rows"].get(key, {})
        xs = [b for b in bits if str(b) in row]
        ax.plot(xs, [row[str(b)] for b in xs], marker=marker, label=label)
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xticks(bits)
    ax.invert_xaxis()
    ax.set_title(f"Q-ViT ablation: {results['model']} on {results['data']} ({results['budget']} budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def build_parser(prog: str = "python -m experiments.ablation") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", default="small", choices=sorted(BUDGETS))
    p.add_argument("--model", default="vit_fmnist")
    p.add_argument("--bits", default="4,3,2", help="comma-separated bit-widths")
    p.add_argument("--methods", default=",".join(k for k, _ in METHOD_ROWS))
    p.add_argument("--data", default="fmnist", choices=("fmnist", "imagefolder", "synthetic"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--fp-lr", type=positive_float, default=2e-3, help="peak lr of the FP teacher")
    p.add_argument("--out", default="runs/ablation_small")
    p.add_argument("--fp-dir", default=None, help="reuse the FP teacher run in this folder (default: OUT/fp)")
    p.add_argument("--extra", default="", help="extra flags for every python -m train run (quoted)")
    return p


@main_guard
def main(argv: list[str] | None = None, prog: str = "python -m experiments.ablation") -> int:
    args = build_parser(prog).parse_args(argv)
    budget = BUDGETS[args.budget]
    try:
        bits = [check_bits(int(b), "--bits") for b in args.bits.split(",") if b.strip()]
    except ValueError as e:  # FormatError is a ValueError
        why = str(e) if isinstance(e, FormatError) else "give comma-separated integers, e.g. 4,3,2"
        raise UserError(f"--bits {args.bits!r}: {why}") from None
    if not bits:
        raise UserError("--bits is empty: give comma-separated bit-widths, e.g. 4,3,2")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {k for k, _ in METHOD_ROWS}
    if unknown:
        raise UserError(f"unknown --methods {sorted(unknown)}: use {', '.join(k for k, _ in METHOD_ROWS)}")
    check_out_dir(args.out, "--out")
    if args.fp_dir:
        check_out_dir(args.fp_dir, "--fp-dir")
    hold(args.out, "--out")  # one ablation per folder (after the checks: a refused command creates nothing)
    common = ["--model", args.model, "--data", args.data, "--seed", str(args.seed), "--no-tensorboard"]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    if budget["max_eval_batches"] is not None:
        common += ["--max-eval-batches", str(budget["max_eval_batches"])]
    common += args.extra.split()
    cap = ["--max-train-batches", str(budget["max_train_batches"])] if budget["max_train_batches"] else []

    t0 = time.time()
    fp_dir = args.fp_dir or os.path.join(args.out, "fp")
    fp = last_top1(fp_dir)
    if fp is None:
        print(f"[ablation] FP teacher: {budget['fp_epochs']} epochs -> {fp_dir}", flush=True)
        train_run(common + ["--method", "fp", "--epochs", str(budget["fp_epochs"]), "--lr", str(args.fp_lr),
                         "--warmup-epochs", "0.25", "--out", fp_dir]
               + (["--resume"] if os.path.isdir(fp_dir) else []))
        fp = last_top1(fp_dir)
    teacher = os.path.join(fp_dir, "last.safetensors")
    results = {"model": args.model, "data": args.data, "budget": args.budget, "seed": args.seed, "bits": bits,
               "fp": fp, "rows": {}, "budget_detail": budget, "teacher": teacher}
    for b in bits:
        for m in methods:
            run_dir = os.path.join(args.out, f"{m}_w{b}a{b}")
            acc = last_top1(run_dir)
            if acc is None:
                print(f"[ablation] {m} W{b}A{b}: {budget['epochs']} epochs -> {run_dir}", flush=True)
                train_run(common + cap + ["--method", m, "--bits", str(b), "--epochs", str(budget["epochs"]),
                                 "--checkpoint", teacher, "--teacher", teacher, "--out", run_dir]
                       + (["--resume"] if os.path.isdir(run_dir) else []))
                acc = last_top1(run_dir)
            results["rows"].setdefault(m, {})[str(b)] = acc
            write_json(os.path.join(args.out, "results.json"), results)  # partial results survive
    results["wall_s"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out, "results.json"), results)
    table = markdown(results)
    atomic_write(os.path.join(args.out, "results.md"), table.encode())
    plot(results, os.path.join(args.out, "accuracy_vs_bits.png"))
    print("\n" + table)
    print(f"[ablation] wrote {args.out}/results.json, results.md, accuracy_vs_bits.png ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
