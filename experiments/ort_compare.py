"""ONNX Runtime CPU speed of exported graphs against FP32 and ORT's own quantizers -- ratios from one run.

    python3 -m experiments.ort_compare --fp32 a/deit_s_w4a4.fp32.onnx \
        --onnx a/deit_s_w4a4.qdq.onnx a/deit_s_w4a4.lowbit.onnx

From the FP32 graph it makes the two reference rows ORT's own tools give (``quantize_static``:
QDQ, u8 activations, s8 per-channel weights, MinMax calibration on a few random inputs --
speed only; ``quantize_dynamic``: s8 weights), then times every graph *interleaved*: each round
runs every session ``--iters`` times in a rotated order, and a graph's figure is the median over
rounds of its img/s, so load from other processes hits all rows alike.  Ratios are to the FP32
row at the same batch.  Also per graph: file size, session-creation time (constant folding
included) and what ORT's optimizer left: integer-kernel nodes vs float MatMul/Gemm/Conv.

Needs numpy + onnxruntime (+ onnx), no torch: it runs on a device's CPU too.  Python 3.6-compatible.
"""

import collections
import logging
import os
import sys
import tempfile
import time

import numpy as np

from qformat import LOWBIT_OP
from qformat.argtypes import int_list, nonneg_int, positive_int
from qformat.cli import parser
from qformat.errors import UserError, main_guard
from qformat.io import write_json
from qformat.paths import check_out_dir, check_out_file
from runtime import onnx_info

SCHEMA = "qvit-edge.ort-compare/1"
#: ONNX Runtime nodes that run a matmul/conv on integers (what a DQ -> MatMul fusion becomes)
INT_KERNELS = {"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QLinearConv",
               "ConvInteger", "QGemm", "MatMulNBits", "DynamicQuantizeLSTM", "QAttention", "QOrderedMatMul"}
#: nodes that run a matmul/conv in float
FLOAT_KERNELS = {"MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv", "FusedGemm", "Attention",
                 "MultiHeadAttention"}
#: the reference rows: label -> how to make it from the FP32 graph
REFERENCES = ("ort quantize_static", "ort quantize_dynamic")


class Graph:
    """One row: a label, its ONNX file and its role (fp32 | ours | reference)."""

    def __init__(self, label, path, role):
        self.label, self.path, self.role = label, path, role
        self.session, self.load_s, self.fusion = None, None, None

    @property
    def mb(self):
        return os.path.getsize(self.path) / 1e6


def session_options(threads, optimized_path=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def open_session(path, threads, optimized_path=None):
    """(session, seconds to create it): creation includes ORT's graph optimizations and constant folding."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, session_options(threads, optimized_path), providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t0


def fusion_report(path, threads):
    """What ORT runs after its optimizations: integer-kernel nodes, and the float matmul/conv nodes it left."""
    import onnx

    fd, opt = tempfile.mkstemp(suffix=".opt.onnx")
    os.close(fd)
    try:
        open_session(path, threads, opt)
        m = onnx.load(opt, load_external_data=False)
    finally:
        os.remove(opt)
    ints = [n for n in m.graph.node if n.op_type in INT_KERNELS]
    flt = [n for n in m.graph.node if n.op_type in FLOAT_KERNELS]
    return {"int_kernels": len(ints), "float_kernels": len(flt),
            "int_ops": dict(collections.Counter(n.op_type for n in ints)),
            "float_nodes": [n.name or n.op_type for n in flt]}


class _Reader:
    """A CalibrationDataReader over a few seeded random inputs (the reference rows are for speed only)."""

    def __init__(self, name, shape, n, seed):
        rng = np.random.RandomState(seed)
        self.data = [{name: rng.standard_normal((1,) + tuple(shape)).astype(np.float32)} for _ in range(n)]
        self.it = iter(self.data)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.data)


def _input(path):
    """(input name, [C, H, W]) of a graph's single image input."""
    m = onnx_info.load_checked(path)  # a truncated or text file: one line, like every other tool
    inits = set(t.name for t in m.graph.initializer)
    ins = [i for i in m.graph.input if i.name not in inits]
    if len(ins) != 1:
        raise UserError("{}: expected one image input, found {}".format(path, len(ins)))
    dims = ins[0].type.tensor_type.shape.dim
    shape = [d.dim_value for d in dims][1:]
    if len(shape) != 3 or not all(v > 0 for v in shape):
        raise UserError("{}: the input must be [N, C, H, W] with fixed C, H, W".format(path))
    return ins[0].name, shape


def make_references(fp32_path, out_dir, calib_n=4, seed=0, log=print):
    """ORT's quantize_static (QDQ, u8 activations, s8 per-channel weights) and quantize_dynamic (s8 weights)
    of the FP32 graph, after ORT's own pre-processing; returns [Graph]."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    stem = os.path.splitext(os.path.basename(fp32_path))[0]
    pre = os.path.join(out_dir, stem + ".ort-pre.onnx")
    try:
        quant_pre_process(fp32_path, pre)
    except Exception as e:  # noqa: BLE001 - ORT's pre-processing is optional; quantize the graph as it is
        log("note: ORT quant_pre_process failed ({}); quantizing the FP32 graph as exported".format(
            str(e).splitlines()[0] if str(e) else type(e).__name__))
        pre = fp32_path
    name, shape = _input(fp32_path)
    static = os.path.join(out_dir, stem.replace(".fp32", "") + ".ort-static.onnx")
    dynamic = os.path.join(out_dir, stem.replace(".fp32", "") + ".ort-dynamic.onnx")
    t0 = time.time()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizers warn on the root logger about every 1-D weight
    try:
        quantize_static(pre, static, _Reader(name, shape, calib_n, seed), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantize_dynamic(pre, dynamic, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    if pre != fp32_path:
        os.remove(pre)
    log("  ORT references: {} and {} ({:.1f}s)".format(os.path.basename(static), os.path.basename(dynamic),
                                                       time.time() - t0))
    return [Graph(REFERENCES[0], static, "reference"), Graph(REFERENCES[1], dynamic, "reference")]


def interleaved(graphs, batches, rounds, iters, warmup, seed=0):
    """{label: {batch: {"img_per_s": median, "rounds": [...], "iters": n}}}: every round times every session
    in turn, ``iters`` runs each (0: about 0.5 s of the FP32 graph per batch size)."""
    name, shape = _input(graphs[0].path)
    out = dict((g.label, {}) for g in graphs)
    for batch in batches:
        x = np.random.RandomState(seed).standard_normal([batch] + list(shape)).astype(np.float32)
        for g in graphs:
            for _ in range(max(1, warmup)):
                g.session.run(None, {name: x})
        n = iters or _auto_iters(graphs[0].session, name, x)
        per = dict((g.label, []) for g in graphs)
        for r in range(rounds):
            k = r % len(graphs)
            for g in graphs[k:] + graphs[:k]:  # rotate who goes first
                t0 = time.perf_counter()
                for _ in range(n):
                    g.session.run(None, {name: x})
                per[g.label].append(batch * n / (time.perf_counter() - t0))
        for g in graphs:
            out[g.label][batch] = {"img_per_s": float(np.median(per[g.label])), "rounds": per[g.label], "iters": n}
    return out


def ratio_rows(graphs, speed, batches):
    """One dict per graph: img/s and the ratio to the FP32 row at each batch, size, load time, fusion."""
    base = next(g for g in graphs if g.role == "fp32")
    rows = []
    for g in graphs:
        row = {"label": g.label, "role": g.role, "path": g.path, "mb": g.mb, "load_s": g.load_s,
               "fusion": g.fusion, "img_per_s": {}, "vs_fp32": {}}
        for b in batches:
            v = speed[g.label][b]["img_per_s"]
            row["img_per_s"][b] = v
            row["vs_fp32"][b] = v / speed[base.label][b]["img_per_s"]
        rows.append(row)
    return rows


def table(rows, batches):
    """The markdown table the README carries."""
    head = ("| graph | " + " | ".join("batch {}".format(b) for b in batches) +
            " | file MB | load s | int / float matmuls |")
    lines = [head, "|" + "---|" * (len(batches) + 4)]
    for r in rows:
        cells = ["{:.2f} ({:.1f} img/s)".format(r["vs_fp32"][b], r["img_per_s"][b]) for b in batches]
        f = r["fusion"]
        fus = "{} / {}".format(f["int_kernels"], f["float_kernels"]) if f else "-"
        lines.append("| {} | {} | {:.2f} | {:.2f} | {} |".format(r["label"], " | ".join(cells), r["mb"], r["load_s"],
                                                                    fus))
    return lines


#: the issue's targets: (our row's role suffix, reference label or "fp32", batches)
TARGETS = (("qdq", REFERENCES[0], (1, 8)), ("lowbit", "fp32", (1,)), ("qdq", REFERENCES[1], (1, 8)))


def verdicts(rows, batches):
    """One line per target of issue 15: met or missed, with the ratio (reported, never fatal)."""
    by = dict((r["label"], r) for r in rows)
    fp32 = next(r for r in rows if r["role"] == "fp32")
    out = []
    for fmt, ref, want in TARGETS:
        ours = [r for r in rows if r["role"] == "ours" and r["label"].endswith(fmt)]
        other = fp32 if ref == "fp32" else by.get(ref)
        if not ours or other is None:
            continue
        for b in (v for v in want if v in batches):
            q = ours[0]["img_per_s"][b] / other["img_per_s"][b]
            out.append("{} {} {:.2f}x {} at batch {} (target >= 1.00x)".format(
                "met:   " if q >= 1.0 else "missed:", ours[0]["label"], q, other["label"], b))
    return out


#: nodes an FP32 baseline must not hold
QUANTIZED_OPS = frozenset(onnx_info.QDQ_OPS + (LOWBIT_OP, "QLinearMatMul", "MatMulInteger", "MatMulNBits"))


def compare_files(fp32, ours, batches=(1, 8), rounds=7, iters=0, warmup=2, threads=2, references=True,
                  work_dir=None, log=print):
    """Build the reference rows, open every session, time them interleaved; return the result dict."""
    for p in [fp32] + list(ours):  # the one loader: missing, text, truncated -> one line, before any work
        if not os.path.isfile(p):
            raise UserError("no such ONNX file: {}".format(p))
        ops = onnx_info.inspect(p)["ops"]
        if p == fp32 and ops & QUANTIZED_OPS:
            raise UserError("--fp32 {} holds {} nodes: it is a quantized graph, not an FP32 baseline; pass the "
                            "export --format fp32 graph".format(p, "/".join(sorted(ops & QUANTIZED_OPS))))
    graphs = [Graph("fp32", fp32, "fp32")]
    for p in ours:
        label = _label(p)
        graphs.append(Graph(label if all(g.label != label for g in graphs) else os.path.basename(p), p, "ours"))
    if references:
        work = work_dir or os.path.dirname(os.path.abspath(fp32))
        graphs[1:1] = make_references(fp32, work, log=log)
    for g in graphs:
        loads = []
        for _ in range(3):  # creation time: the best of three (the first also warms the file cache)
            g.session, t = open_session(g.path, threads)
            loads.append(t)
        g.load_s = min(loads)
        g.fusion = fusion_report(g.path, threads)
    log("  timing {} graphs x batch {}: {} rounds x {} runs each, interleaved, {} threads".format(
        len(graphs), ",".join(str(b) for b in batches), rounds, iters or "~0.5 s of", threads))
    speed = interleaved(graphs, list(batches), rounds, iters, warmup)
    rows = ratio_rows(graphs, speed, batches)
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": threads,
            "rounds": rounds, "iters": dict((b, speed["fp32"][b]["iters"]) for b in batches), "batches": list(batches),
            "rows": rows,
            "verdicts": verdicts(rows, batches), "machine": machine()}


def _label(path):
    """``deit_s_w4a4.qdq.onnx`` -> ``ours qdq`` (the format part of our file names)."""
    parts = os.path.basename(path).split(".")
    return "ours " + (parts[-2] if len(parts) >= 3 else parts[0])


def _auto_iters(session, name, x):
    """Runs per round so that one graph's turn takes about 0.5 s (the median of three timed runs)."""
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        ts.append(time.perf_counter() - t0)
    return int(min(200, max(2, round(0.5 / max(float(np.median(ts)), 1e-5)))))


def machine():
    """CPU model, its SIMD level (AVX2 / AVX-512 / VNNI: which integer kernels ORT runs), cores, ORT version."""
    import platform

    import onnxruntime as ort

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "asimddp") if f in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other processes share the cores
    return {"cpu": model, "simd": simd, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "load": load}


def machine_line(m):
    s = "{} ({} cores; {}), onnxruntime {}".format(m["cpu"], m["cores"], ", ".join(m["simd"]) or "no AVX2",
                                                   m["onnxruntime"])
    return s + ("; load average {:.1f} at the end".format(m["load"]) if m.get("load") is not None else "")


def parse_args(argv=None, prog="python3 -m experiments.ort_compare"):
    p = parser(prog, __doc__.split("\n\n")[0])
    p.add_argument("--fp32", required=True, help="the FP32 graph (export --format fp32): the 1.00 row and the "
                                                  "input of ORT's quantizers")
    p.add_argument("--onnx", nargs="+", default=[], help="our graphs to compare (qdq, lowbit, ...)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds; the figure is their median (7)")
    p.add_argument("--iters", type=nonneg_int, default=0, help="runs per graph per round (0: about 0.5 s per round)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed runs per graph and batch (2)")
    p.add_argument("--threads", type=positive_int, default=2, help="ORT intra-op threads (2)")
    p.add_argument("--no-reference", dest="references", action="store_false",
                   help="skip ORT's quantize_static / quantize_dynamic rows")
    p.add_argument("--work-dir", default=None, help="where the reference graphs go (default: next to --fp32)")
    p.add_argument("--json", dest="json_path", default=None, help="result file (default <work-dir>/ort_compare.json)")
    args = p.parse_args(argv)
    args.batches = int_list(args.batch, 1, "--batch")
    if args.work_dir is not None:
        check_out_dir(args.work_dir, "--work-dir")
    if args.json_path is not None:
        check_out_file(args.json_path, "--json")
    return args


def report(result, title, log=print):
    log("\n{} -- {}; {} threads, median of {} interleaved rounds; img/s ratio to FP32".format(
        title, machine_line(result["machine"]), result["threads"], result["rounds"]))
    for line in table(result["rows"], result["batches"]) + [""] + result["verdicts"]:
        log(line)


def _log(msg):
    print(msg)
    sys.stdout.flush()


@main_guard
def main(argv=None, prog="python3 -m experiments.ort_compare"):
    args = parse_args(argv, prog)
    res = compare_files(args.fp32, args.onnx, args.batches, args.rounds, args.iters, args.warmup, args.threads,
                        args.references, args.work_dir, log=_log)
    report(res, os.path.basename(args.fp32))
    path = args.json_path or os.path.join(args.work_dir or os.path.dirname(os.path.abspath(args.fp32)),
                                          "ort_compare.json")
    write_json(path, res)
    print("wrote " + path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
