"""Throughput and latency of the quantized ViT on TensorRT, ONNX Runtime or torch -- one JSON per run.

    python3 runtime/bench.py --onnx artifacts/vit_fmnist_w4a4.qdq.onnx --backend ort
    python3 runtime/bench.py --engine artifacts/deit_s_w4a4.qdq.int8.b1.<key>.engine --batch 1,4,8
    python3 runtime/bench.py --compare --backend ort --onnx a_w8a8.qdq.onnx a_w4a4.qdq.onnx
    python3 runtime/bench.py --compare --backend trt --onnx artifacts/deit_s_w4a4.qdq.onnx

On TensorRT, ``--compare`` with an exported model builds and times its FP16, INT8 and (where the
TensorRT has it) INT4 weight-only engines in one run -- from the sibling exports of the same
checkpoint (``<stem>.fp32.onnx``, ``.qdq.onnx``, ``.woq.onnx``; :data:`TRT_VARIANTS`) -- so the
table says at once whether quantization pays on this device.

Each (model, backend, batch) gets warm-up iterations, then N timed iterations or a time
budget (like trtexec's --iterations/--duration); latency is per batch, host-to-host
(copy in, infer, copy out), which is what an application sees.  On a Jetson the
tegrastats power during the timed loop gives J/img.  Needs only numpy + the backend's
own package (no torch for trt/ort).  Python 3.6-compatible.
"""

import os
import platform
import socket
import sys
import time

if not __package__:  # `python3 runtime/<script>.py`: one error line where qformat cannot be imported
    import script_guard  # noqa: F401

import numpy as np  # noqa: E402

from qformat import formats  # noqa: E402
from qformat.argtypes import int_list, nonneg_int, positive_float, positive_int, seed_int  # noqa: E402
from qformat.cli import add_runtime_args, parser  # noqa: E402
from qformat.errors import UserError, main_guard  # noqa: E402
from qformat.io import write_json  # noqa: E402
from qformat.paths import check_out_file  # noqa: E402
from runtime import board, model_meta  # noqa: E402
from runtime.backends import BACKENDS, BatchUnsupported, open_backend  # noqa: E402
from runtime.device import gpu_info, jetson_model  # noqa: E402
from runtime.power import PowerLogger, nvpmodel_mode  # noqa: E402

SCHEMA = "qvit-edge.bench/1"


def parse_batches(text):
    return int_list(text, 1, "--batch")


def parse_args(argv=None, prog="python3 runtime/bench.py"):
    p = parser(prog, __doc__.split("\n\n")[0])
    src = p.add_argument_group("what to run (several files -> a comparison)")
    src.add_argument("--onnx", nargs="+", default=[],
                     help="exported ONNX file(s) (ort; or trt: builds/caches an engine)")
    src.add_argument("--engine", nargs="+", default=[], help="TensorRT engine file(s) built by runtime.build")
    src.add_argument("--checkpoint", nargs="+", default=[], help="trained checkpoint(s) for the torch backend")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                   help="backend(s) for the --onnx files (default ort); engines always use trt, checkpoints torch")
    p.add_argument("--compare", action="store_true",
                   help="print img/s ratios against the first model/backend; on trt with --onnx: build and time the "
                        "model's FP16, INT8 and INT4 weight-only engines (its .fp32/.qdq/.woq exports)")
    p.add_argument("--iters", "--iterations", dest="iters", type=positive_int, default=200,
                   help="timed iterations (200)")
    p.add_argument("--duration", type=positive_float, default=None, help="time budget in s per run instead of --iters")
    p.add_argument("--warmup", type=nonneg_int, default=20, help="untimed warm-up iterations (20)")
    p.add_argument("--batch", default="1", help="batch size or sweep, e.g. 1,4,8 (default 1)")
    p.add_argument("--json", dest="json_path", default=None, help="result file (default runs/bench/bench-<time>.json)")
    add_runtime_args(p, threads=True, providers=True)
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="trt: time plain enqueues instead of a captured CUDA graph")
    p.add_argument("--precision", default="auto", help="trt with --onnx: precision for the engine build")
    p.add_argument("--lowbit-cuda", action="store_true", help="torch: swap Linears for the low-bit CUDA kernels")
    p.add_argument("--no-power", dest="power", action="store_false", help="do not read tegrastats on a Jetson")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if not (args.onnx or args.engine or args.checkpoint):
        p.error("give --onnx, --engine or --checkpoint")
    args.duration = args.duration or 0.0  # 0: --iters decides
    args.batches = parse_batches(args.batch)
    if args.json_path is None:
        args.json_path = os.path.join("runs", "bench", "bench-{}.json".format(time.strftime("%Y%m%d-%H%M%S")))
    return args


#: ``bench --compare --backend trt``: (name, export format, build precision) of the engines that show whether
#: quantization pays, baseline first.  FP16 from the float graph (dequantized weights), INT8 from the Q/DQ graph
#: (its INT4 weights too, at opset 21), INT4 weight-only from the ``woq`` graph (TensorRT 10+); what each format
#: quantizes is :data:`qformat.formats.FORMAT_FACTS` (a test holds these rows to it).
TRT_VARIANTS = (("fp16", "fp32", "fp16"), ("int8", "qdq", "auto"), ("int4-woq", "woq", "auto"))


def _same_model(a, b):
    keys = ("model", "bits", "source_checkpoint")
    return all(a.get(k) == b.get(k) for k in keys)


def trt_variants(path, log):
    """The exports of ``path``'s checkpoint, one per :data:`TRT_VARIANTS` row found beside it, as
    ``(path, precision)``; a missing one is a note naming the export that makes it."""
    meta = model_meta.load_onnx_meta(path)
    rows = [(name, fmt, formats.sibling_path(path, meta.get("format"), fmt), precision)
            for name, fmt, precision in TRT_VARIANTS]
    if rows[0][2] is None:  # not named as exports are: no siblings to find
        return [(path, None)]
    out = []
    for name, fmt, sib, precision in rows:
        if not os.path.isfile(sib):
            log("note: no {} engine in the comparison: export {} (python3 -m export --checkpoint <ckpt> --format {} "
                "--target {})".format(name, os.path.basename(sib), fmt, meta.get("target", "<target>")))
            continue
        if sib != path and not _same_model(meta, model_meta.load_onnx_meta(sib)):
            log("note: {} is not an export of the same checkpoint as {}: left out".format(sib, path))
            continue
        out.append((sib, precision))
    if path not in [p for p, _ in out]:  # a format outside the sweep (lowbit) is timed too, as given
        out.append((path, None))
    return out


def targets_of(args, log=print):
    """(backend, path, precision) triples in command-line order; the first is the comparison baseline
    (``precision``: the engine build's for trt ONNX, None elsewhere)."""
    out = []
    for path in args.onnx:
        for kind in args.backend or ["ort"]:
            if kind == "torch":
                raise UserError("the torch backend runs a checkpoint: use --checkpoint runs/<x>/best.safetensors")
            if kind == "trt" and args.compare:
                out += [(kind, p, prec or args.precision) for p, prec in trt_variants(path, log)]
            else:
                out.append((kind, path, args.precision if kind == "trt" else None))
    if args.backend and "trt" not in args.backend and args.engine:
        raise UserError("engines run on the trt backend: add trt to --backend or drop --engine")
    out += [("trt", p, None) for p in args.engine]
    out += [("torch", p, None) for p in args.checkpoint]
    seen = set()
    return [t for t in out if not (t[:2] in seen or seen.add(t[:2]))]


def latency_stats(seconds):
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "min": float(ms.min()), "max": float(ms.max())}


def _power_logger(enabled, log):
    """tegrastats logger on a Jetson (None elsewhere or when tegrastats is missing)."""
    if not enabled or not jetson_model():
        return None
    try:
        return PowerLogger()
    except (OSError, RuntimeError) as e:
        log("note: no power figures ({})".format(e))
        return None


def time_backend(backend, batch, iters, duration, warmup, seed=0, power=None):
    """Warm up, then time ``iters`` runs (or ``duration`` seconds); returns the result record."""
    c, h, w = [int(v) for v in backend.meta["input_size"]]
    x = np.random.RandomState(seed).standard_normal((batch, c, h, w)).astype(np.float32)
    backend.prepare(batch)
    for _ in range(max(0, warmup)):
        backend.run(x)
    out = backend.run(x)
    if not np.all(np.isfinite(out)):
        raise UserError("{} produced non-finite outputs on random input".format(backend.path))
    lat = []
    if power is not None:
        power.start()
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        backend.run(x)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if duration > 0:
            if t1 - t_start >= duration and len(lat) >= 10:
                break
        elif len(lat) >= iters:
            break
    total = time.perf_counter() - t_start
    images = batch * len(lat)
    rec = {"status": "ok", "batch": batch, "iterations": len(lat), "warmup": warmup, "seconds": total,
           "images": images, "img_per_s": images / total, "latency_ms": latency_stats(lat),
           "output_shape": list(out.shape), "memory": backend.memory(), "power": None}
    if power is not None:
        p = power.stop()
        if p and p.get("mean_w"):
            p["j_per_img"] = p["mean_w"] * total / images
        rec["power"] = p
    return rec


def compare(runs):
    """img/s and p50 ratios of every run against the baseline (first target) at the same batch."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return None
    base_label = ok[0]["label"]  # the first target that ran (a sweep's FP16 engine may not build here)
    base = dict((r["batch"], r) for r in ok if r["label"] == base_label)
    rows = []
    for r in ok:
        b = base.get(r["batch"])
        if b is None:
            continue
        rows.append({"label": r["label"], "batch": r["batch"], "img_per_s": r["img_per_s"],
                     "speedup": r["img_per_s"] / b["img_per_s"],
                     "p50_ratio": r["latency_ms"]["p50"] / b["latency_ms"]["p50"]})
    return {"baseline": base_label, "ratios": rows}


def host_info(power_enabled):
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "machine": platform.machine(), "gpu": None, "jetson": jetson_model(), "nvpmodel": None}
    try:
        info["gpu"] = gpu_info()
    except Exception:  # noqa: BLE001 - the host description must never fail the bench
        pass
    if info["jetson"] and power_enabled:
        try:
            info["nvpmodel"] = nvpmodel_mode()
        except Exception:  # noqa: BLE001
            pass
    try:  # power mode, locked clocks, temperatures after the runs (what `qvit doctor` shows)
        info["board_state"] = board.state() if info["jetson"] else None
    except Exception:  # noqa: BLE001
        info["board_state"] = None
    return info


def _open(kind, path, args, max_batch, log, precision=None):
    if kind == "trt" and path.endswith(".onnx"):
        from runtime import build

        bargs = ["--onnx", path, "--precision", precision or args.precision, "--max-batch", str(max_batch)]
        for p in args.plugins:
            bargs += ["--plugins", p]
        try:
            engine, _ = build.build(build.parse_args(bargs), log=log)
        except UserError as e:
            if "fixed batch" not in str(e):
                raise
            engine, _ = build.build(build.parse_args(bargs[:4] + bargs[6:]), log=log)
        path = engine
    return open_backend(kind, path, threads=args.threads, providers=args.providers, plugins=args.plugins,
                        cuda_graph=args.cuda_graph, lowbit_cuda=args.lowbit_cuda, verbose=args.verbose, log=log)


def _open_or_skip(kind, path, args, max_batch, log, precision, sweep):
    """The backend, or (in a TensorRT precision sweep) None and the reason this engine cannot be built here."""
    try:
        return _open(kind, path, args, max_batch, log, precision), None
    except UserError as e:
        if not sweep:
            raise
        log("note: {} ({}): not built: {}".format(os.path.basename(path), precision, e))
        return None, str(e)


def fmt_run(r):
    if r["status"] != "ok":
        return "{} b{}: {} ({})".format(r["label"], r["batch"], r["status"], r["reason"])
    lat = r["latency_ms"]
    s = "{} b{}: {:.1f} img/s  latency mean {:.3f} p50 {:.3f} p90 {:.3f} p99 {:.3f} ms".format(
        r["label"], r["batch"], r["img_per_s"], lat["mean"], lat["p50"], lat["p90"], lat["p99"])
    if r.get("power") and r["power"].get("j_per_img") is not None:
        s += "  {:.2f} W {:.4f} J/img".format(r["power"]["mean_w"], r["power"]["j_per_img"])
    return s


def run(args, log=print):
    """Run every target x batch; write the JSON; return the result dict."""
    targets = targets_of(args, log)
    check_out_file(args.json_path, "--json")  # before minutes of timing
    runs = []
    total = len(targets) * len(args.batches)
    n = 0
    sweep = args.compare and bool(args.onnx) and "trt" in (args.backend or [])
    for kind, path, precision in targets:
        backend, why = _open_or_skip(kind, path, args, max(args.batches), log, precision, sweep)
        if backend is None:
            meta = model_meta.load_onnx_meta(path)
            label = "{} {} {}".format(model_meta.label(meta, path), kind, precision)
            runs += [{"label": label, "backend": kind, "path": os.path.abspath(path), "batch": b, "status": "skipped",
                      "reason": why} for b in args.batches]
            n += len(args.batches)
            continue
        failed = None  # a point that failed (e.g. out of memory): the larger batches of this target are skipped
        try:
            label = "{} {}".format(model_meta.label(backend.meta, path), kind)
            if kind == "trt":
                label += " " + str(backend.precision)
            if any(r["label"] == label for r in runs):
                label += " ({})".format(os.path.basename(path))
            power = _power_logger(args.power, log)
            for batch in args.batches:
                n += 1
                base = {"label": label, "backend": kind, "path": os.path.abspath(path),
                        "model": backend.meta.get("model"), "format": backend.meta.get("format"),
                        "bits": backend.meta.get("bits"), "precision": backend.precision, "batch": batch}
                rec = _measure(backend, batch, args, power, failed)
                if rec["status"] == "failed":
                    failed = (label, batch)
                base.update(rec)
                runs.append(base)
                log("[{}/{}] {}".format(n, total, fmt_run(base)))
        finally:
            backend.close()
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host_info(args.power),
              "settings": {"iters": args.iters, "duration": args.duration, "warmup": args.warmup,
                           "batches": args.batches, "cuda_graph": args.cuda_graph, "threads": args.threads,
                           "latency": "per batch, host to host"},
              "runs": runs, "compare": compare(runs) if (args.compare or len(targets) > 1) else None}
    if result["compare"]:
        log("{:<48} {:>6} {:>10} {:>8}".format("vs " + result["compare"]["baseline"], "batch", "img/s", "speedup"))
        for row in result["compare"]["ratios"]:
            log("{:<48} {:>6} {:>10.1f} {:>7.2f}x".format(row["label"], row["batch"], row["img_per_s"],
                                                           row["speedup"]))
    warning = board.bench_warning(result["host"].get("board_state"))
    if warning:
        log(warning)
    path = args.json_path
    write_json(path, result)
    result["json_path"] = path
    bad = [r for r in runs if r["status"] == "failed"]
    if bad:  # after the measured points are safe on disk
        raise UserError("bench: {} b{} failed ({}); the {} point(s) measured are in {}".format(
            bad[0]["label"], bad[0]["batch"], bad[0]["reason"], sum(r["status"] == "ok" for r in runs), path))
    return result


def _measure(backend, batch, args, power, failed):
    """One sweep point: its record, ``status`` ok / skipped / failed (any error of the backend, in one line:
    a sweep keeps the points it measured)."""
    if failed is not None:
        return {"status": "skipped", "reason": "batch {} failed".format(failed[1])}
    try:
        return time_backend(backend, batch, args.iters, args.duration, args.warmup, args.seed, power)
    except BatchUnsupported as e:
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - ORT/TensorRT out of memory, a CUDA error: recorded, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"status": "failed", "reason": "{}: {}".format(type(e).__name__, first[:300])}


def summary_line(result):
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    if not ok:
        return "bench: no run completed ({} skipped) -> {}".format(len(result["runs"]), result["json_path"])
    best = max(ok, key=lambda r: r["img_per_s"])
    s = "bench: {} run(s); best {} b{}: {:.1f} img/s, p50 {:.3f} ms, p99 {:.3f} ms".format(
        len(result["runs"]), best["label"], best["batch"], best["img_per_s"], best["latency_ms"]["p50"],
        best["latency_ms"]["p99"])
    if result.get("compare"):
        sp = [r for r in result["compare"]["ratios"] if r["label"] == best["label"] and r["batch"] == best["batch"]]
        if sp:
            s += " ({:.2f}x {})".format(sp[0]["speedup"], result["compare"]["baseline"])
    return s + " -> " + result["json_path"]


@main_guard
def main(argv=None, prog="python3 runtime/bench.py"):
    args = parse_args(argv, prog)
    result = run(args)
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
