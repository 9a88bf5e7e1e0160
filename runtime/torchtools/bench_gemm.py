"""Packed 2/3/4-bit GEMM kernels vs cuBLAS FP16 (torch.mm) and INT8 (torch._int_mm), measured in one run.

Why: the low-bit kernels only pay off if they beat cuBLAS on the shapes a DeiT actually runs
(qkv / proj / fc1 / fc2 of DeiT-S, D = 384) at batch-1 latency (M = 1..16) and at throughput
batch sizes (M = 197 x {1, 8, 32}), and if the GEMV reaches the memory bandwidth on a layer too
large for the L2 cache.  Every figure is a ratio measured in the same process.

Timing (METHOD: warm up, CUDA events, median of repeats, outputs and workspaces preallocated so
the timed region holds only the launches):

* ``graph``: R calls captured once in a CUDA graph and replayed; per-call GPU time with the
  launch gaps shrunk -- the kernel figure the targets are judged on;
* ``call``: the same R calls issued back to back from Python -- what an eager framework pays
  per call, extension dispatch included.

Targets (reported as PASS/MISS, never fatal): at M <= 16 W4A16 >= 3x faster than cuBLAS FP16 and
W2/W3 faster than W4; at M >= 197*8 W4A8 >= 0.8x cuBLAS INT8; the GEMV's achieved bandwidth at
M = 1 on the large layer as a share of the measured device-to-device copy bandwidth.

``--model-e2e deit_s``: img/s of a whole timm DeiT (random weights: structure and speed) at
batch 1 and 32, FP16 vs every block Linear swapped for the low-bit kernels, eager and CUDA graph.
Without a CUDA GPU it prints one line and exits 2.
"""

import argparse
import os
import statistics
import sys

from qformat import io as qio
from qformat.errors import UserError, main_guard

MODELS = {"deit_t": 192, "deit_s": 384, "deit_b": 768}
TIMM_NAMES = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}
M_VALUES = (1, 2, 4, 8, 16, 197, 197 * 8, 197 * 32)
BITS = (2, 3, 4)
#: A layer too large for any L2 (an LLM-sized projection): the bandwidth check at M = 1.
BANDWIDTH_SHAPE = ("large", "proj", 8192, 8192)
DEFAULT_OUT = os.path.join("artifacts", "bench_gemm.json")


def layer_shapes(models):
    """(model, layer, K, N) of the four Linear layers of a ViT block (MLP ratio 4)."""
    out = []
    for model in models:
        if model not in MODELS:
            raise UserError("unknown model {!r}: use {}".format(model, ", ".join(sorted(MODELS))))
        d = MODELS[model]
        for layer, k, n in (("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, 4 * d), ("fc2", 4 * d, d)):
            out.append((model, layer, k, n))
    return out


def lowbit_bytes(m, n, k, bits, x_bytes=2, y_bytes=2):
    """Bytes a low-bit kernel must move: activations, packed weights, scale+bias, output."""
    per = 32 // bits
    return m * k * x_bytes + n * ((k + per - 1) // per) * 4 + 8 * n + m * n * y_bytes


def dense_bytes(m, n, k, elem, y_bytes):
    """Bytes of a dense GEMM: A, B at ``elem`` bytes and the output."""
    return (m * k + n * k) * elem + m * n * y_bytes


def _positive(text):
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer, got {}".format(text))
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_s"], help="layer shapes of: " + ", ".join(sorted(MODELS)))
    p.add_argument("--m", nargs="+", type=_positive, default=list(M_VALUES), help="rows (tokens x batch)")
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS))
    p.add_argument("--calls", type=_positive, default=20, help="calls per timed graph / burst")
    p.add_argument("--repeats", type=_positive, default=15, help="timed repeats (median)")
    p.add_argument("--legacy", action="store_true", help="also time the previous kernels (a16_gemv / a8_mma)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the large-layer bandwidth check")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results (written atomically)")
    p.add_argument("--model-e2e", default=None, metavar="MODEL", choices=sorted(MODELS),
                   help="end-to-end mode: img/s of a timm DeiT, FP16 vs low-bit Linears")
    p.add_argument("--e2e-bits", type=int, default=4, help="weight bits of the end-to-end low-bit model")
    p.add_argument("--e2e-modes", nargs="+", type=parse_mode, default=None, metavar="WxAy",
                   help="end-to-end variants, e.g. w4a8 w4a4 w2a2 (default: w<e2e-bits>a8)")
    args = p.parse_args(argv)
    for b in args.bits + [args.e2e_bits]:
        if b not in BITS:
            raise UserError("--bits / --e2e-bits must be among 2 3 4, got {}".format(b))
    for model in args.models:
        if model not in MODELS:
            raise UserError("unknown model {!r}: use {}".format(model, ", ".join(sorted(MODELS))))
    return args


def require_gpu():
    """Import torch and check for a GPU; a UserError (one line, exit 2) otherwise."""
    try:
        import torch
    except ImportError:
        raise UserError("bench_gemm needs PyTorch with CUDA (pip install torch)") from None
    if not torch.cuda.is_available():
        raise UserError("bench_gemm needs a CUDA GPU: none found (torch.cuda.is_available() is False)")
    return torch


# ----------------------------------------------------------------------------- timing

class Timer:
    """Per-call GPU milliseconds of a list of closures (one per buffer set), graph replay and eager burst."""

    def __init__(self, torch, calls, repeats):
        self.torch = torch
        self.calls = calls
        self.repeats = repeats

    def _n(self, fns):
        return max(self.calls, len(fns))  # every buffer set at least once per timed run

    def _per_call(self, fn, n):
        t = self.torch
        times = []
        for _ in range(self.repeats):
            start, stop = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / n)
        return statistics.median(times)

    def burst(self, fns):
        """Median per-call ms of back-to-back eager calls (cycling over ``fns``)."""
        n = self._n(fns)

        def run():
            for i in range(n):
                fns[i % len(fns)]()

        run()
        self.torch.cuda.synchronize()
        return self._per_call(run, n)

    def graph(self, fns):
        """Median per-call ms of a captured graph of ``calls`` calls; None when capture fails."""
        t = self.torch
        stream = t.cuda.Stream()
        stream.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(stream):  # warm up outside the capture (kernel choice, smem attributes, allocator)
            for f in fns:
                f()
        t.cuda.current_stream().wait_stream(stream)
        t.cuda.synchronize()
        n = self._n(fns)
        g = t.cuda.CUDAGraph()
        try:
            with t.cuda.graph(g):
                for i in range(n):
                    fns[i % len(fns)]()
        except RuntimeError as e:
            print("  graph capture failed: {}".format(str(e).splitlines()[0]), file=sys.stderr)
            return None
        g.replay()
        t.cuda.synchronize()
        return self._per_call(g.replay, n)


def copy_bandwidth(torch, timer, nbytes=1 << 30):
    """Measured device-to-device copy bandwidth (GB/s, bytes read + written): the ceiling."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = Timer(torch, 5, timer.repeats).burst([lambda: b.copy_(a)])
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- one shape

def _row(model, layer, m, n, k, backend, bits, kernel, ms, ms_call, nbytes):
    return {"model": model, "layer": layer, "m": m, "n": n, "k": k, "backend": backend, "bits": bits,
            "kernel": kernel, "ms": ms, "ms_call": ms_call,
            "tops": (2.0 * m * n * k / (ms * 1e-3) / 1e12) if ms else None,
            "gbps": (nbytes / (ms * 1e-3) / 1e9) if ms else None}


def _copies(fp16_bytes, l2_bytes, cap=64):
    """Weight copies every backend rotates over: enough for the FP16 set to exceed twice the L2 (at most
    ``cap``).  The same count for the low-bit weights, whose smaller set may stay in L2: that is the
    compression's real advantage when a model's other layers run in between."""
    return max(1, min(cap, -(-2 * l2_bytes // max(fp16_bytes, 1))))


def _dense_rows(torch, timer, shape, m, x, l2):
    model, layer, k, n = shape
    rows = []
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(_copies(n * k * 2, l2))]
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    fns = [lambda w=w: torch.mm(x, w, out=y) for w in ws]
    rows.append(_row(model, layer, m, n, k, "cublas_fp16", 16, "torch.mm", timer.graph(fns), timer.burst(fns),
                     dense_bytes(m, n, k, 2, 2)))
    ms = ms_call = None
    if m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm's cuBLASLt limits
        a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        b8s = [torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda").t()
               for _ in range(_copies(n * k * 2, l2))]
        fns8 = [lambda b=b: torch._int_mm(a8, b) for b in b8s]
        ms, ms_call = timer.graph(fns8), timer.burst(fns8)
    rows.append(_row(model, layer, m, n, k, "cublas_int8", 8, "torch._int_mm", ms, ms_call,
                     dense_bytes(m, n, k, 1, 4)))
    return rows


#: Activation grid per variant tag: a4 = signed 4-bit codes (the INT4 tensor-core kernel), else int8.
ACT_GRID = {"a4": (-8, 7)}


def _lowbit_fns(torch, gemm_ext, preps, x, kernel_id, bits, k, n, grid=(-128, 127)):
    """Closures calling the extension with preallocated output and workspace (the timed region = launches)."""
    ext = gemm_ext.load_extension()
    m = x.shape[0]
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    ws_bytes = ext.workspace_size(m, k, bits, kernel_id)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
    return [lambda p=p: ext.gemm_into(y, x, p.segments[0].words_for(kernel_id), p.weight_scale, p.bias, None, bits, n,
                                      0.05, grid[0], grid[1], kernel_id, ws) for p in preps]


def _lowbit_rows(torch, gemm_ext, timer, shape, m, x, args, l2):
    import numpy as np

    import qformat

    model, layer, k, n = shape
    rows = []
    rng = np.random.default_rng(n + k)
    x8 = torch.randint(-100, 100, (m, k), dtype=torch.int8, device="cuda")
    for bits in args.bits:
        lo, hi = qformat.qrange(bits, signed=True)
        packed = [qformat.pack(rng.integers(lo, hi + 1, size=(n, k)), bits) for _ in range(2)]
        # The bandwidth layer must not fit the L2 in low-bit form either.
        own = n * qformat.packed_words(k, bits) * 4
        copies = _copies(own if shape == BANDWIDTH_SHAPE else n * k * 2, l2)
        int4 = m > 16 and torch.cuda.get_device_capability() >= (8, 0)  # mma.sync m16n8k64 s4.u4
        preps = [gemm_ext.prepare(packed[i % 2], np.full(n, 0.01, np.float32), np.zeros(n, np.float32), bits, k,
                                  int4=int4) for i in range(copies)]
        variants = [("a16", x, gemm_ext.select_kernel(m, n, k, bits, torch.float16))]
        if m > 16:
            variants.append(("a8", x8, gemm_ext.select_kernel(m, n, k, bits, torch.int8)))
        if int4:  # 4-bit activations on the INT4 tensor cores (native sm_80..89, emulated on sm_90)
            variants.append(("a4", x, "mma_int4"))
        if m <= 16 and torch.cuda.get_device_capability() >= (8, 0):  # persistent cp.async-ring GEMV (W4A8 math)
            variants.append(("ring", x, "gemv_ring"))
        if args.legacy:
            variants.append(("legacy", x, "a16_gemv" if m <= 16 else "a8_mma"))
        for tag, xin, kernel in variants:
            fns = _lowbit_fns(torch, gemm_ext, preps, xin, gemm_ext.KERNELS[kernel], bits, k, n,
                              ACT_GRID.get(tag, (-128, 127)))
            rows.append(_row(model, layer, m, n, k, "lowbit_w{}{}".format(bits, tag), bits, kernel,
                             timer.graph(fns), timer.burst(fns),
                             lowbit_bytes(m, n, k, bits, x_bytes=1 if tag == "a8" else 2)))
    return rows


def bench_shape(torch, gemm_ext, timer, shape, m, args, l2):
    """cuBLAS FP16, cuBLAS INT8 and the low-bit kernels for one (M, N, K)."""
    k = shape[2]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    return _dense_rows(torch, timer, shape, m, x, l2) + _lowbit_rows(torch, gemm_ext, timer, shape, m, x, args, l2)


# ----------------------------------------------------------------------------- targets and report

def check_targets(rows, copy_gbps=None):
    """Evaluate the issue's targets per (model, layer, m); returns a list of {target, ok, detail}."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["layer"], r["m"]), {})[r["backend"]] = r
    out = []
    for (model, layer, m), t in sorted(by.items()):
        name = "{}/{} M={}".format(model, layer, m)
        ms = {b: r["ms"] for b, r in t.items() if r["ms"]}
        fp16, w4 = ms.get("cublas_fp16"), ms.get("lowbit_w4a16")
        if m <= 16 and fp16 and w4:
            out.append({"target": name + ": W4A16 >= 3x FP16", "ok": fp16 / w4 >= 3.0,
                        "detail": "{:.2f}x".format(fp16 / w4)})
            for b in (2, 3):
                wb = ms.get("lowbit_w{}a16".format(b))
                if wb:
                    out.append({"target": name + ": W{} faster than W4".format(b), "ok": wb < w4,
                                "detail": "{:.4f} vs {:.4f} ms".format(wb, w4)})
        w4a8, i8 = ms.get("lowbit_w4a8"), ms.get("cublas_int8")
        if m >= 197 * 8 and w4a8 and i8:
            out.append({"target": name + ": W4A8 >= 0.8x INT8", "ok": i8 / w4a8 >= 0.8,
                        "detail": "{:.2f}x".format(i8 / w4a8)})
        if m == 1 and copy_gbps and model == BANDWIDTH_SHAPE[0] and "lowbit_w4a16" in t:
            share = t["lowbit_w4a16"]["gbps"] / copy_gbps
            out.append({"target": name + ": W4 GEMV bandwidth share of copy", "ok": share >= 0.7,
                        "detail": "{:.0f}% of {:.0f} GB/s".format(100 * share, copy_gbps)})
    return out


def _fmt(v, spec):
    return format(v, spec) if v else "n/a"


def format_table(rows):
    """Fixed-width text table of the result rows (graph ms is the kernel time; call ms the eager cost)."""
    head = "{:<7} {:<5} {:>5} {:>5} {:>5} {:<16} {:<13} {:>9} {:>9} {:>8} {:>8}".format(
        "model", "layer", "M", "N", "K", "backend", "kernel", "graph_us", "call_us", "TOPS", "GB/s")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("{:<7} {:<5} {:>5} {:>5} {:>5} {:<16} {:<13} {:>9} {:>9} {:>8} {:>8}".format(
            r["model"], r["layer"], r["m"], r["n"], r["k"], r["backend"], r["kernel"],
            _fmt(r["ms"] and r["ms"] * 1e3, ".2f"), _fmt(r["ms_call"] and r["ms_call"] * 1e3, ".2f"),
            _fmt(r["tops"], ".2f"), _fmt(r["gbps"], ".0f")))
    return "\n".join(lines)


def format_markdown(rows, targets, device):
    """The README table: per shape and M, graph microseconds and speed-ups over cuBLAS."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["layer"], r["m"], r["n"], r["k"]), {})[r["backend"]] = r
    backends = sorted({r["backend"] for r in rows if r["backend"].startswith("lowbit")})
    out = ["Device: {}. Microseconds per call from CUDA-graph replays (median); x = cuBLAS time / ours.".format(
        device), "", "| layer | M | N x K | cuBLAS FP16 | cuBLAS INT8 | " + " | ".join(backends) + " |",
        "|---" * (5 + len(backends)) + "|"]
    for (model, layer, m, n, k), t in by.items():
        fp16 = t.get("cublas_fp16", {}).get("ms")
        i8 = t.get("cublas_int8", {}).get("ms")
        cells = []
        for b in backends:
            ms = t.get(b, {}).get("ms")
            ref = i8 if b.endswith("a8") and i8 else fp16
            cells.append("{:.1f} ({:.2f}x)".format(ms * 1e3, ref / ms) if ms and ref else "n/a")
        out.append("| {}/{} | {} | {}x{} | {} | {} | {} |".format(
            model, layer, m, n, k, _fmt(fp16 and fp16 * 1e3, ".1f"), _fmt(i8 and i8 * 1e3, ".1f"), " | ".join(cells)))
    out += ["", "Targets:", ""] + ["- {} {}: {}".format("PASS" if t["ok"] else "MISS", t["target"], t["detail"])
                                   for t in targets]
    return "\n".join(out)


# ----------------------------------------------------------------------------- end to end

def parse_mode(text):
    """'w4a8' -> (4, 8): weight bits 2..4, activation bits 2..8 (signed grid [-2^(a-1), 2^(a-1) - 1])."""
    import re

    m = re.fullmatch(r"w([234])a([2-8])", text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError("mode must look like w4a8 / w4a4 / w2a2 (w 2..4, a 2..8), got {!r}".format(
            text))
    return int(m.group(1)), int(m.group(2))


def _calibrated_lowbit(torch, gemm_ext, model, bits, sample, act_bits=8):
    """Swap every Linear inside the blocks of an FP16 model for LowBitLinearCUDA (fp16 in/out), with a
    max-abs input scale per layer from one calibration batch on a signed ``act_bits`` grid (<= 4 bits: the
    INT4 tensor-core kernel where auto picks it)."""
    scales = {}
    hi = (1 << (act_bits - 1)) - 1
    hooks = [mod.register_forward_hook(lambda mod, inp, out, name=name: scales.__setitem__(
        name, max(float(inp[0].detach().float().abs().max()) / hi, 1e-8)))
        for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and name.startswith("blocks.")]
    with torch.no_grad():
        model(sample)
    for h in hooks:
        h.remove()
    for name, scale in scales.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, gemm_ext.LowBitLinearCUDA.from_linear(getattr(parent, child).float(), bits, scale,
                                                                      -hi - 1, hi))
    return model


def _img_per_s(torch, model, batch, timer):
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = timer.burst([lambda: model(x)])
        graph = timer.graph([lambda: model(x)])
    return {"eager": batch / (eager * 1e-3), "graph": batch / (graph * 1e-3) if graph else None}


def _int4_identical(torch, gemm_ext, model, sample, y_auto):
    """Every low-bit Linear forced onto mma_int4 (path a4): bit-identical logits to the auto kernels (both exact,
    same epilogue) -- W4A4 / W2A2 end to end on the INT4 path, also where it is emulated (sm_90)."""
    mods = [m for m in model.modules() if isinstance(m, gemm_ext.LowBitLinearCUDA)]
    saved = [m.path for m in mods]
    for m in mods:
        m.path = "a4"
    try:
        return bool(torch.equal(model(sample), y_auto))
    finally:
        for m, p in zip(mods, saved):
            m.path = p


def run_model_e2e(torch, args):
    """img/s of a timm DeiT in FP16 and with its block Linears on the low-bit kernels, per WxAy mode."""
    try:
        import timm
    except ImportError:
        raise UserError("--model-e2e needs timm (pip install timm)") from None
    from runtime.torchtools import gemm_ext

    gemm_ext.load_extension()
    torch.manual_seed(0)
    fp16 = timm.create_model(TIMM_NAMES[args.model_e2e], pretrained=False).cuda().half().eval()
    sample = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    timer = Timer(torch, 5, args.repeats)
    modes = args.e2e_modes or [(args.e2e_bits, 8)]
    out = {"model": args.model_e2e, "modes": ["w{}a{}".format(*md) for md in modes], "logit_cosine": {},
           "kernels": {}, "batches": {str(b): {"fp16": _img_per_s(torch, fp16, b, timer)} for b in (1, 32)}}
    with torch.no_grad():
        ref = fp16(sample).float()
    for (wb, ab), name in zip(modes, out["modes"]):
        low = timm.create_model(TIMM_NAMES[args.model_e2e], pretrained=False).cuda().half().eval()
        low.load_state_dict(fp16.state_dict())
        low = _calibrated_lowbit(torch, gemm_ext, low, wb, sample, ab)
        with torch.no_grad():
            y_low = low(sample)
            out["logit_cosine"][name] = float(torch.nn.functional.cosine_similarity(ref, y_low.float()).mean())
            if ab <= 4 and torch.cuda.get_device_capability() >= (8, 0):  # the whole model on the INT4 kernels:
                out.setdefault("int4_path_identical", {})[name] = _int4_identical(torch, gemm_ext, low, sample, y_low)
        hi = (1 << (ab - 1)) - 1
        out["kernels"][name] = gemm_ext.select_kernel(197, 384, 384, wb, torch.float16, act_lo=-hi - 1, act_hi=hi)
        for b in (1, 32):
            out["batches"][str(b)][name] = _img_per_s(torch, low, b, timer)
        del low
    return out


def format_e2e(e2e):
    """Markdown table: img/s per batch, FP16 and every mode (eager / CUDA graph), x = mode graph / FP16 graph."""
    modes = e2e.get("modes") or ["lowbit"]
    cos = e2e["logit_cosine"] if isinstance(e2e["logit_cosine"], dict) else {"lowbit": e2e["logit_cosine"]}
    same = e2e.get("int4_path_identical") or {}
    lines = ["{} end to end, img/s, random weights (structure and speed only); logits cosine vs FP16: {}{}".format(
        e2e["model"], ", ".join("{} {:.3f}".format(md, cos.get(md, float("nan"))) for md in modes),
        "; logits on the INT4 kernels identical to auto: " + ", ".join(
            "{} {}".format(md, "yes" if v else "NO") for md, v in sorted(same.items())) if same else ""), "",
        "| batch | FP16 eager | FP16 graph | " + " | ".join("{m} eager | {m} graph".format(m=md) for md in modes)
        + " |",
        "|---" * (3 + 2 * len(modes)) + "|"]
    for batch, r in e2e["batches"].items():
        g16 = r["fp16"].get("graph")
        cells = [_fmt(r["fp16"]["eager"], ".0f"), _fmt(g16, ".0f")]
        for md in modes:
            g = r.get(md, {}).get("graph")
            cells += [_fmt(r.get(md, {}).get("eager"), ".0f"),
                      "{:.0f} ({:.2f}x)".format(g, g / g16) if g and g16 else _fmt(g, ".0f")]
        lines.append("| {} | {} |".format(batch, " | ".join(cells)))
    return "\n".join(lines)


def format_m197(rows):
    """Per-layer table at M = 197 (DeiT-S batch 1): every low-bit variant vs cuBLAS FP16, graph microseconds."""
    t = [r for r in rows if r["m"] == 197 and r["ms"]]
    backends = sorted({r["backend"] for r in t if r["backend"].startswith("lowbit")})
    by = {}
    for r in t:
        by.setdefault((r["model"], r["layer"], r["n"], r["k"]), {})[r["backend"]] = r["ms"]
    lines = ["| layer (N x K), M = 197 | cuBLAS FP16 | " + " | ".join(backends) + " |",
             "|---" * (2 + len(backends)) + "|"]
    for (model, layer, n, k), ms in by.items():
        fp16 = ms.get("cublas_fp16")
        cells = ["{:.1f} ({:.2f}x)".format(ms[b] * 1e3, fp16 / ms[b]) if b in ms and fp16 else "n/a" for b in backends]
        lines.append("| {}/{} {}x{} | {} | {} |".format(model, layer, n, k, _fmt(fp16 and fp16 * 1e3, ".1f"),
                                                     " | ".join(cells)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def run_layers(torch, args):
    from runtime.torchtools import gemm_ext

    gemm_ext.load_extension()
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    timer = Timer(torch, args.calls, args.repeats)
    rows = []
    shapes = [(s, m) for s in layer_shapes(args.models) for m in args.m]
    if not args.no_bandwidth:
        shapes.append((BANDWIDTH_SHAPE, 1))
    for shape, m in shapes:
        rows.extend(bench_shape(torch, gemm_ext, timer, shape, m, args, l2))
        print("  {}/{} M={} done".format(shape[0], shape[1], m), file=sys.stderr, flush=True)
    copy = copy_bandwidth(torch, timer)
    return rows, copy


@main_guard
def main(argv=None):
    args = parse_args(argv)
    torch = require_gpu()
    props = torch.cuda.get_device_properties(0)
    device = "{} (sm_{}{}, {} SMs), torch {}, CUDA {}".format(props.name, props.major, props.minor,
                                                           props.multi_processor_count, torch.__version__,
                                                           torch.version.cuda)
    result = {"device": device, "calls": args.calls, "repeats": args.repeats}
    if args.model_e2e:
        result["e2e"] = run_model_e2e(torch, args)
        print(format_e2e(result["e2e"]))
    else:
        rows, copy = run_layers(torch, args)
        targets = check_targets(rows, copy)
        result.update({"rows": rows, "targets": targets, "copy_gbps": copy})
        print(format_table(rows))
        print("device-to-device copy: {:.0f} GB/s".format(copy))
        for t in targets:
            print("{} {} ({})".format("PASS" if t["ok"] else "MISS", t["target"], t["detail"]))
        result["markdown"] = format_markdown(rows, targets, device)
        result["m197_markdown"] = format_m197(rows)
    qio.write_json(args.out, result)
    print("wrote {}".format(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
