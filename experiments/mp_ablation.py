"""``python -m experiments.mp_ablation``: differentiable Q-ViT's ablation at small scale.

Rows (one FP teacher, the same FP start, steps and KD for every row): uniform LSQ+ (baseline),
Q-ViT (IRM + DGD) uniform, the mixed-bit search with one scale per quantizer, the search with
switchable scales, and the search + IRM + DGD -- at the ``--bits`` BitOPs constraints (a uniform
row at N bits *is* the N-bit budget).  Every run validates on ``--holdout`` images carved from
the training split (what any tuning may look at); the test split is read once per row, by the
last checkpoint, after training.  Each row's ``result.json`` holds its test top-1 and BitOPs, so
an interrupted ablation (or two processes on different ``--bits``) continues where it stopped.
Writes ``results.json``, ``results.md`` and ``accuracy_vs_bitops.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from experiments.ablation import last_top1, train_run
from qformat.argtypes import ArgumentParser, int_list, nonneg_int, positive_float, seed_int
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, read_json, write_json

#: key -> (label, --method, extra flags)
ROWS = {
    "lsq": ("Uniform LSQ+ (baseline)", "baseline", []),
    "qvit": ("Q-ViT (IRM+DGD), uniform", "qvit", []),
    "mp-one-scale": ("Mixed search, one scale", "mp", ["--no-switchable-scale"]),
    "mp": ("Mixed search, switchable scale", "mp", []),
    "qvit-mp": ("Mixed + IRM + DGD", "qvit-mp", []),
}

#: FP teacher epochs and each QAT row's steps (one epoch capped at ``steps`` batches)
BUDGETS = {
    "tiny": dict(fp_epochs=1, steps=8, fp_steps=20, holdout=500, batch=32),  # smoke (tests)
    "cpu": dict(fp_epochs=1, steps=120, fp_steps=None, holdout=3000, batch=64),  # 2 shared cores: ~5 min a row
    "gpu": dict(fp_epochs=15, steps=None, fp_steps=None, holdout=5000, batch=128),  # QAT: 10 full epochs
}


def _row_result(run_dir: str, data: str, data_dir: str | None) -> dict:
    """Test top-1 (read once) and BitOPs of a finished row's last checkpoint."""
    import torch

    from train.checkpoint import load_converted
    from train.data import build_datasets
    from train.evaluate import evaluate
    from train.mixedbits import allocation

    model, meta = load_converted(os.path.join(run_dir, "last.safetensors"))
    _, test, _ = build_datasets(data, meta["input_size"], meta["mean"], meta["std"], data_dir=data_dir)
    loader = torch.utils.data.DataLoader(test, batch_size=256)
    ev = evaluate(model, loader, torch.device("cpu"))
    out = {"test_top1": ev["top1"], "val_top1": meta.get("metrics", {}).get("top1")}
    if not meta.get("quant"):
        return out  # the FP teacher: no BitOPs
    alloc = getattr(model, "qvit_allocation", None) or allocation(model)
    return {**out,
            "bitops_g": alloc["bitops_g"], "budget_bitops_g": alloc["budget_bitops_g"], "ratio": alloc["ratio"],
            "mean_w_bits": alloc["mean_w_bits"], "mean_a_bits": alloc["mean_a_bits"]}


def markdown(results: dict) -> str:
    bits = results["bits"]
    head = f"| Method ({results['model']}, {results['data']}, test top-1 / BitOPs vs budget) | "
    lines = [head + " | ".join(f"{b}-bit constraint" for b in bits) + " |", "|---|" + "---|" * len(bits),
             "| Full precision | " + " | ".join(f"{results['fp_test']:.2f}" for _ in bits) + " |"]
    for key, (label, _, _) in ROWS.items():
        row = results["rows"].get(key, {})
        cells = [f"{row[str(b)]['test_top1']:.2f} ({row[str(b)]['ratio']:.2f}x)" if str(b) in row else "–"
                 for b in bits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    from train.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    ax.axhline(results["fp_test"], color="k", ls="--", lw=1, label=f"FP32 ({results['fp_test']:.2f})")
    for (key, (label, _, _)), marker in zip(ROWS.items(), "osv^D"):
        row = results["rows"].get(key, {})
        pts = sorted((r["bitops_g"], r["test_top1"]) for r in row.values())
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=label)
    ax.set_xlabel("BitOPs per image (G)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Learned bits vs uniform: {results['model']} on {results['data']} ({results['budget']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def build_parser(prog: str = "python -m experiments.mp_ablation") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
    p.add_argument("--model", default="vit_fmnist")
    p.add_argument("--bits", default="4,3", help="comma-separated BitOPs constraints (uniform-N equivalents)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    p.add_argument("--data", default="fmnist", choices=("fmnist", "synthetic"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--holdout", type=nonneg_int, default=None, help="validation images carved from train")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--bit-lr", type=positive_float, default=None, help="lr of the float bit-widths (mixed rows)")
    p.add_argument("--out", default="runs/mp_ablation")
    p.add_argument("--fp-dir", default=None, help="reuse the FP teacher run in this folder (default: OUT/fp)")
    return p


def _common(args: argparse.Namespace, budget: dict) -> list[str]:
    holdout = budget["holdout"] if args.holdout is None else args.holdout
    out = ["--model", args.model, "--data", args.data, "--seed", str(args.seed), "--no-tensorboard",
           "--holdout", str(holdout), "--batch-size", str(budget["batch"])]
    return out + (["--data-dir", args.data_dir] if args.data_dir else [])


def _teacher(args: argparse.Namespace, budget: dict, common: list[str]) -> str:
    fp_dir = args.fp_dir or os.path.join(args.out, "fp")
    if last_top1(fp_dir) is None:
        print(f"[mp-ablation] FP teacher: {budget['fp_epochs']} epochs -> {fp_dir}", flush=True)
        cap = ["--max-train-batches", str(budget["fp_steps"])] if budget["fp_steps"] else []
        train_run(common + cap + ["--method", "fp", "--epochs", str(budget["fp_epochs"]), "--out", fp_dir]
               + (["--resume"] if os.path.isdir(fp_dir) else []))
    return fp_dir


def _row(args, budget: dict, common: list[str], teacher: str, key: str, bits: int) -> dict:
    run_dir = os.path.join(args.out, f"{key}_{bits}bit")
    done = os.path.join(run_dir, "result.json")
    if os.path.isfile(done):
        return read_json(done, "row result")
    _, method, extra = ROWS[key]
    if method in ("mp", "qvit-mp") and args.bit_lr is not None:
        extra = extra + ["--bit-lr", str(args.bit_lr)]
    if last_top1(run_dir) is None:
        print(f"[mp-ablation] {key} at {bits} bits -> {run_dir}", flush=True)
        cap = ["--max-train-batches", str(budget["steps"])] if budget["steps"] else []
        train_run(common + cap + extra + ["--method", method, "--bits", str(bits), "--epochs", "1" if cap else "10",
                                       "--checkpoint", teacher, "--teacher", teacher, "--out", run_dir]
               + (["--resume"] if os.path.isdir(run_dir) else []))
    res = _row_result(run_dir, args.data, args.data_dir)
    write_json(done, res)
    return res


@main_guard
def main(argv: list[str] | None = None, prog: str = "python -m experiments.mp_ablation") -> int:
    args = build_parser(prog).parse_args(argv)
    budget = BUDGETS[args.budget]
    bits = int_list(args.bits, lo=2, what="--bits")
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or bits[-1] > 8:
        raise UserError(f"--rows {unknown} unknown (use {', '.join(ROWS)})" if unknown else "--bits must be 2..8")
    t0 = time.time()
    common = _common(args, budget)
    fp_dir = _teacher(args, budget, common)
    teacher = os.path.join(fp_dir, "last.safetensors")
    results = {"model": args.model, "data": args.data, "budget": args.budget, "budget_detail": budget,
               "seed": args.seed, "bits": sorted(bits, reverse=True), "teacher": teacher, "bit_lr": args.bit_lr,
               "fp_val": last_top1(fp_dir), "fp_test": _row_result(fp_dir, args.data, args.data_dir)["test_top1"],
               "rows": {}}
    for b in results["bits"]:
        for key in rows:
            results["rows"].setdefault(key, {})[str(b)] = _row(args, budget, common, teacher, key, b)
    results["wall_s"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out, "results.json"), results)
    table = markdown(results)
    atomic_write(os.path.join(args.out, "results.md"), table.encode())
    plot(results, os.path.join(args.out, "accuracy_vs_bitops.png"))
    print("\n" + table)
    print(f"[mp-ablation] wrote {args.out}/results.json, results.md, accuracy_vs_bitops.png "
          f"({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
