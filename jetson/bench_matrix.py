"""Build engines on the device and benchmark a list of (model, bits) into one results table.

    python3 -m jetson.bench_matrix --models deit_t deit_s deit_b --bits 8 4 3 2 \
        --plugins build/plugins/libqvit_plugins.so

Reads ``artifacts/<model>_w<b>a<b>.<format>.onnx`` (``make export``), builds each engine
(cached, so reruns only bench), benches it, and writes ``<out>.md`` (the table to paste)
and ``<out>.json`` (every bench record).  A missing or failing model is a table row with
the reason, not an abort: a long unattended run should finish.  ``--format auto`` picks
``lowbit`` where the board's target row (qformat.targets) has no fast INT8 (TX2) and ``qdq``
elsewhere.  ``--backend ort`` skips the engine build (dry run on any machine).
Python 3.6-compatible.
"""

import os
import sys
import time

from qformat import PACKED_BITS, formats, targets
from qformat.argtypes import ArgumentParser, bits_int, int_list, nonneg_int, positive_int
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, write_json
from qformat.paths import check_out_file
from runtime import bench, build
from runtime.device import jetson_model


def onnx_path(artifacts, model, bits, fmt):
    return formats.artifact_path(artifacts, model, bits, fmt)


def pick_format(fmt, bits, board):
    """``auto``: ``lowbit`` where the board's target row has no fast INT8 (TX2) and the bits pack, else ``qdq``."""
    if fmt != "auto":
        return fmt
    tgt = targets.for_board(board)
    if tgt is not None and not tgt.fast_int8 and int(bits) in PACKED_BITS:
        return "lowbit"
    return "qdq"


def parse_args(argv=None, prog="python3 -m jetson.bench_matrix"):
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--bits", nargs="+", type=bits_int, required=True)
    p.add_argument("--format", default="auto", choices=("auto",) + tuple(formats.FORMAT_FACTS),
                   help="auto: lowbit where the board has no fast INT8 and the bits pack, else qdq")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--backend", default="trt", choices=("trt", "ort"))
    p.add_argument("--plugins", action="append", default=[])
    p.add_argument("--batch", default="1")
    p.add_argument("--iters", type=positive_int, default=200)
    p.add_argument("--warmup", type=nonneg_int, default=20)
    p.add_argument("--out", default=None, help="output stem (default runs/jetson/matrix-<time>)")
    args = p.parse_args(argv)
    int_list(args.batch, 1, "--batch")
    return args


def run(args, log=print):
    board = jetson_model()
    out = args.out or os.path.join("runs", "jetson", "matrix-{}".format(time.strftime("%Y%m%d-%H%M%S")))
    rows, records = [], []
    pairs = [(m, b) for m in args.models for b in args.bits]
    for path in [out + ".md", out + ".json"] + [out + ".{}_w{}.json".format(m, b) for m, b in pairs]:
        check_out_file(path, "--out")  # an hour of benchmarks must not end in an unwritable table
    for i, (model, bits) in enumerate(pairs):
        fmt = pick_format(args.format, bits, board)
        path = onnx_path(args.artifacts, model, bits, fmt)
        log("[{}/{}] {}".format(i + 1, len(pairs), formats.artifact_label(model, bits, fmt)))
        row = {"model": model, "bits": bits, "format": fmt, "status": "ok"}
        try:
            if not os.path.isfile(path):
                raise UserError("missing {} (make export MODEL={} BITS={} FORMAT={})".format(path, model, bits, fmt))
            target = ["--onnx", path, "--backend", "ort"]
            if args.backend == "trt":
                bargs = ["--onnx", path]
                for lib in args.plugins:
                    bargs += ["--plugins", lib]
                engine, _ = build.build(build.parse_args(bargs), log=log)
                target = ["--engine", engine]
            res = bench.run(bench.parse_args(target + ["--batch", args.batch, "--iters", str(args.iters),
                                                       "--warmup", str(args.warmup),
                                                       "--json", out + ".{}_w{}.json".format(model, bits)]),
                            log=log)
            records.extend(res["runs"])
            for r in res["runs"]:
                if r["status"] == "ok":
                    rows.append(dict(row, batch=r["batch"], precision=r["precision"], img_s=r["img_per_s"],
                                     p50=r["latency_ms"]["p50"], p99=r["latency_ms"]["p99"],
                                     j_img=(r.get("power") or {}).get("j_per_img")))
        except UserError as e:
            rows.append(dict(row, status="failed: {}".format(e)))
            log("  failed: {}".format(e))
    table = render(rows, board)
    atomic_write(out + ".md", table.encode("utf-8"))
    write_json(out + ".json", {"board": board, "rows": rows, "runs": records})
    log(table)
    log("matrix: {} row(s) -> {}.md".format(len(rows), out))
    return rows


def render(rows, board):
    lines = ["Measured on {} ({}).".format(board or "a non-Jetson host", time.strftime("%Y-%m-%d")), "",
             "| model | bits | format | precision | batch | img/s | p50 ms | p99 ms | J/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append("| {} | {} | {} | {} | | | | | |".format(r["model"], r["bits"], r["format"], r["status"]))
            continue
        lines.append("| {} | {} | {} | {} | {} | {:.1f} | {:.2f} | {:.2f} | {} |".format(
            r["model"], r["bits"], r["format"], r["precision"], r["batch"], r["img_s"], r["p50"], r["p99"],
            "{:.4f}".format(r["j_img"]) if r.get("j_img") is not None else "n/a"))
    return "\n".join(lines) + "\n"


@main_guard
def main(argv=None, prog="python3 -m jetson.bench_matrix"):
    run(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
