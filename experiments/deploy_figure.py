"""``python -m experiments.deploy_figure``: the figure a deployer reads first — accuracy vs model size (bytes)
and vs ONNX Runtime CPU img/s, for FP32 and every bit-width and format, from the study's own models.

Every point is a trained model of the study (``experiments.study``): at each bit-width one QAT run
(``--config`` at ``--seed``, ``--steps``), exported with ``python -m export`` (parity-checked against
PyTorch, so the graph has the trained model's accuracy) as ``qdq`` and ``lowbit``; FP32 is the FP
architecture (see ``models``) at the FP teacher's accuracy. All graphs are timed in **one**
``runtime.bench --compare`` run, so the img/s are comparable ratios on one machine. Accuracy is the
run's validation top-1 (the held-out split the study chooses by: this figure reads no test set). Export and bench run as
subprocesses (each with its own log; the layering test sees their ``-m`` module names).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from experiments import runner as st
from qformat.argtypes import ArgumentParser, nonneg_int, positive_float, positive_int
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, read_json, write_json
from qformat.paths import check_out_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("qdq", "lowbit")


def _sh(argv: list, log: str) -> None:
    """Run one CLI of this repo (PYTHONPATH = this tree); its output goes to ``log``; fail in one line."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as f:
        rc = subprocess.call([sys.executable] + argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise UserError(f"{' '.join(argv[:3])} failed (exit {rc}); see {log}")


def _run_ckpt(study: st.Study, cfg: dict, bits: int, seed: int, steps: int) -> tuple[dict, str]:
    rec = st.load_run(study, cfg, bits, seed, steps)
    ckpt = os.path.join(study.run_dir(cfg, bits, seed, steps), "last.safetensors")
    if rec is None or "val_top1" not in rec or not os.path.isfile(ckpt):
        raise UserError(f"no finished study run {study.run_name(cfg, bits, seed, steps)} (with its checkpoint): "
                        "run `make study` first or pick --bits/--seed/--steps/--config of a finished run")
    return rec, ckpt


def models(study: st.Study, cfg: dict, bits_list: list, seed: int, steps: int) -> list[dict]:
    """The points, all checked before any work: FP32 and, per bit-width, the run of ``cfg`` as qdq and lowbit.
    The FP32 graph is the ``fp32`` export (float weights, no quantizers) of the baseline run: the FP
    architecture exactly, so its size and speed are the FP model's; its accuracy is the FP teacher's."""
    teacher = read_json(study.teacher_json(study.settings.model), "study teacher")
    _, fp_ckpt = _run_ckpt(study, st.BASELINE, bits_list[0], seed, steps)
    out = [{"name": "FP32", "bits": 32, "format": "fp32", "val_top1": teacher["val_top1"], "checkpoint": fp_ckpt}]
    for b in bits_list:
        rec, ckpt = _run_ckpt(study, cfg, b, seed, steps)
        out += [{"name": f"W{b}A{b} {fmt}", "bits": b, "format": fmt, "val_top1": rec["val_top1"],
                 "checkpoint": ckpt} for fmt in FORMATS]
    return out


def export_all(points: list[dict], out: str, parity_n: int) -> None:
    """One folder per point (``fp32``, ``w2a2-qdq``, ...), so each holds exactly the graph it exported."""
    for p in points:
        d = os.path.join(out, p["format"] if p["bits"] == 32 else f"w{p['bits']}a{p['bits']}-{p['format']}")
        os.makedirs(d, exist_ok=True)
        _sh(["-m", "export", "--checkpoint", p["checkpoint"], "--format", p["format"], "--target", "ort",
             "--out", d, "--parity-n", str(parity_n)], os.path.join(out, "export.log"))
        graphs = [f for f in os.listdir(d) if f.endswith(f".{p['format']}.onnx")]
        if len(graphs) != 1:
            raise UserError(f"expected one {p['format']} graph in {d}, found {len(graphs)}: clear the folder")
        p["onnx"] = os.path.join(d, graphs[0])
        p["bytes"] = os.path.getsize(p["onnx"])


def bench_all(points: list[dict], out: str, batch: int, threads: int, duration: float) -> dict:
    path = os.path.join(out, "bench.json")
    _sh(["-m", "runtime.bench", "--onnx"] + [p["onnx"] for p in points] +
        ["--backend", "ort", "--compare", "--batch", str(batch), "--threads", str(threads),
         "--duration", str(duration), "--json", path], os.path.join(out, "bench.log"))
    res = read_json(path, "bench result")
    by_path = {r["path"]: r for r in res["runs"] if r.get("status") == "ok"}
    for p in points:
        if p["onnx"] not in by_path:
            raise UserError(f"bench did not time {p['onnx']}; see {os.path.join(out, 'bench.log')}")
        p["img_s"] = by_path[p["onnx"]]["img_per_s"]
    return res.get("host", {})


def table(points: list[dict]) -> str:
    fp = points[0]
    lines = ["| model | validation top-1 (%) | ONNX bytes | vs FP32 size | ORT CPU img/s | vs FP32 speed |",
             "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['name']} | {p['val_top1']:.2f} | {p['bytes']:,} | {p['bytes'] / fp['bytes']:.2f}x | "
                     f"{p['img_s']:.0f} | {p['img_s'] / fp['img_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], title: str, path: str) -> None:
    from train.plots import pyplot, save_png

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    marks = {"fp32": "*", "qdq": "o", "lowbit": "s"}
    for ax, key, xl in ((axes[0], "bytes", "ONNX file size (bytes, log)"), (axes[1], "img_s", "ORT CPU img/s")):
        for p in points:
            ax.scatter(p[key], p["val_top1"], marker=marks[p["format"]], s=60, label=p["name"])
            ax.annotate(p["name"], (p[key], p["val_top1"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylabel("validation top-1 (%)")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def build_parser(prog: str = "python -m experiments.deploy_figure") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", default="docs/study", help="the study's results (writes deploy.{json,md,png})")
    p.add_argument("--work", default="runs/study", help="the study's run folders (ONNX go to WORK/deploy)")
    p.add_argument("--model", default="vit_fmnist", help="the study's model")
    p.add_argument("--config", default="baseline", help="config name of the QAT runs, e.g. qvit__dgd_weight-0.03")
    p.add_argument("--bits", default="2,3", help="bit-widths (each needs a finished run)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--steps", type=positive_int, default=250)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=1, help="ORT intra-op threads")
    p.add_argument("--duration", type=positive_float, default=5.0, help="seconds timed per graph")
    p.add_argument("--parity-n", type=positive_int, default=64, help="images for each export's parity check")
    return p


def _config(name: str) -> dict:
    known = {st.slug(c): c for g in st.stage_groups("stage1", {}) for c in g.configs}
    if name in known:
        return known[name]
    raise UserError(f"--config {name!r}: use a stage-1 config name, e.g. baseline, irm, qvit__dgd_weight-0.03")


@main_guard
def main(argv: Optional[list] = None, prog: str = "python -m experiments.deploy_figure") -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = _config(args.config)
    bits = st._ints(args.bits, "--bits", 2, 8)
    check_out_dir(args.results, "--results")
    check_out_dir(args.work, "--work")
    study = st.Study(os.path.abspath(args.results), os.path.abspath(args.work), st.Settings(model=args.model))
    if not os.path.isfile(study.teacher_json(args.model)):
        raise UserError(f"no study teacher {study.teacher_json(args.model)}: run `make study` first (or --results)")
    study.settings = st.Settings(**read_json(study.teacher_json(args.model), "study teacher")["settings"])
    points = models(study, cfg, bits, args.seed, args.steps)
    out = os.path.join(study.work, "deploy")
    os.makedirs(out, exist_ok=True)
    export_all(points, out, args.parity_n)
    host = bench_all(points, out, args.batch, args.threads, args.duration)
    host["cpu"] = st._machine(None)["cpu"]
    machine = f"{host['cpu']}, ORT {args.threads} thread(s), batch {args.batch}"
    title = (f"{study.settings.model}: accuracy vs size and ORT CPU speed ({st.label(cfg)}, {args.steps} QAT steps, "
             f"seed {args.seed}; {machine}; one bench run)")
    plot(points, title, os.path.join(study.results, "deploy.png"))
    write_json(os.path.join(study.results, "deploy.json"),
               {"config": cfg, "seed": args.seed, "steps": args.steps, "host": host, "batch": args.batch,
                "threads": args.threads, "points": [{k: v for k, v in p.items() if k not in ("checkpoint", "onnx")}
                                                    for p in points]})
    text = f"{title}\n\n{table(points)}"
    atomic_write(os.path.join(study.results, "deploy.md"), text.encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
