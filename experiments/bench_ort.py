"""``make bench-ort``: export DeiT-S and vit_fmnist in every format for ONNX Runtime, then one speed table each.

For every model: ``export --target ort`` as fp32, qdq and lowbit (fresh calibrated model with random
weights unless ``--checkpoint``; parity checked on ``--parity-n`` images), ORT's own
``quantize_static`` / ``quantize_dynamic`` of the FP32 graph as reference rows, then
:func:`experiments.ort_compare.compare_files`: img/s ratios to FP32 at each batch, measured
interleaved in one run, with file sizes, session-creation times and the nodes ORT left in float.
Writes ``<out>/bench_ort.md`` (the table the README carries) and ``<out>/bench_ort.json``.

Needs torch (it exports); the timing half runs without it: ``python3 -m experiments.ort_compare``.
"""

import os
import sys
import time

from experiments import ort_compare
from qformat.argtypes import bits_int, int_list, nonneg_int, positive_int
from qformat.cli import parser
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, write_json
from qformat.paths import check_out_dir

DEFAULT_MODELS = ("vit_fmnist", "deit_s")  # the small one first: its table is ready early
FORMATS = ("fp32", "qdq", "lowbit")


def parse_args(argv=None, prog="python3 -m experiments.bench_ort"):
    p = parser(prog, __doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registry names (deit_s vit_fmnist)")
    p.add_argument("--bits", type=bits_int, default=4, help="weight and activation bits of the fresh models (4)")
    p.add_argument("--checkpoint", nargs="+", default=[], help="trained checkpoints instead of fresh models")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the ort row's, 17; 21 stores "
                                                           "4-bit weights as INT4)")
    p.add_argument("--parity-n", type=nonneg_int, default=2, help="images for each export's parity check (2; 0 = skip)")
    p.add_argument("--batch", default="1,8", help="batch sizes (1,8)")
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds; figures are medians (7)")
    p.add_argument("--iters", type=nonneg_int, default=0, help="runs per graph per round (0: about 0.5 s per round)")
    p.add_argument("--threads", type=positive_int, default=2, help="ORT intra-op threads (2)")
    p.add_argument("--out", default=os.path.join("artifacts", "bench_ort"), help="output directory")
    args = p.parse_args(argv)
    args.batches = int_list(args.batch, 1, "--batch")
    check_out_dir(args.out)
    for c in args.checkpoint:
        if not os.path.isfile(c):
            raise UserError("no such checkpoint: {} (train one with python -m train)".format(c))
    return args


def export_all(dep, out_dir, opset, parity_n, log):
    """fp32 / qdq / lowbit graphs of one deployable for the ort target; returns their paths in that order."""
    from export.exporter import ExportOptions, ParityOptions, export

    paths = []
    for fmt in FORMATS:
        parity = ParityOptions(n=parity_n if fmt != "fp32" else min(parity_n, 2))
        res = export(dep, out_dir, ExportOptions(fmt, "ort", opset=opset, parity=parity), log=log)
        paths.append(res.path)
    return paths


def deployables(args):
    """(title, deployable) for every checkpoint or fresh model."""
    from train.deploy import load_deployable

    if args.checkpoint:
        for c in args.checkpoint:
            yield os.path.basename(c), load_deployable(c)
        return
    for m in args.models:
        yield "{} W{}A{} (random weights)".format(m, args.bits, args.bits), load_deployable(None, m, args.bits)


def run(args, log=print):
    os.makedirs(args.out, exist_ok=True)
    results, md = [], []
    for title, dep in deployables(args):
        t0 = time.time()
        fp32, qdq, lowbit = export_all(dep, args.out, args.opset, args.parity_n, log)
        res = ort_compare.compare_files(fp32, [qdq, lowbit], args.batches, args.rounds, args.iters,
                                        threads=args.threads, work_dir=args.out, log=log)
        res["title"] = title
        ort_compare.report(res, title, log)
        log("  ({:.0f}s)".format(time.time() - t0))
        results.append(res)
        md += ["### {}".format(title), ""] + ort_compare.table(res["rows"], res["batches"]) + [""]
        md += ["- " + v for v in res["verdicts"]] + [""]
        _write(args, results, md)  # after every model: a long run keeps what it measured
    log("wrote {}".format(os.path.join(args.out, "bench_ort.md")))
    return results


def _write(args, results, md):
    head = ["Measured on {}; {} threads, median of {} interleaved rounds; ratios are img/s relative to the FP32 "
            "graph at the same batch.".format(ort_compare.machine_line(results[0]["machine"]), args.threads,
                                              args.rounds), ""]
    atomic_write(os.path.join(args.out, "bench_ort.md"), "\n".join(head + md).encode())
    write_json(os.path.join(args.out, "bench_ort.json"), {"schema": ort_compare.SCHEMA, "results": results})


def _log(msg):
    print(msg)
    sys.stdout.flush()  # progress shows in a log file too


@main_guard
def main(argv=None, prog="python3 -m experiments.bench_ort"):
    run(parse_args(argv, prog), _log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
