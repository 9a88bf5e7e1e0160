"""Packed 2/3/4-bit GEMM kernels vs cuBLAS FP16 (torch.matmul) and INT8 (torch._int_mm), one run.

Why: the low-bit kernels only pay off if they beat cuBLAS on the shapes a DeiT actually runs
(qkv / proj / fc1 / fc2 of DeiT-S D=384 and DeiT-B D=768) at batch-1 latency (M = 1, 16) and
at throughput batch sizes (M = 197, 197*32).  Prints a table and writes JSON atomically.

Targets checked (reported, never fatal): at M <= 16 W4 >= 3x faster than FP16 and W2/W3 faster
than W4; at M >= 197*32 W4A8 >= 0.8x cuBLAS INT8.

Without a CUDA GPU it prints one line and exits 2.  ``--model-e2e`` is the end-to-end hook
(swap every nn.Linear of a model for LowBitLinearCUDA); see :func:`run_model_e2e`.
"""

import argparse
import os
import sys

from qformat import io as qio
from qformat.errors import UserError, main_guard

MODELS = {"deit_s": 384, "deit_b": 768}
M_VALUES = (1, 16, 197, 197 * 32)
BITS = (2, 3, 4)
PATHS = ("a16", "a8")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=sorted(MODELS), help="deit_s and/or deit_b")
    p.add_argument("--m", nargs="+", type=int, default=list(M_VALUES), help="rows (tokens x batch)")
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results (written atomically)")
    p.add_argument("--model-e2e", default=None, metavar="MODEL",
                   help="end-to-end mode: time MODEL with every Linear swapped for LowBitLinearCUDA")
    args = p.parse_args(argv)
    for b in args.bits:
        if b not in BITS:
            raise UserError("--bits must be among 2 3 4, got {}".format(b))
    if any(m <= 0 for m in args.m):
        raise UserError("--m values must be positive")
    if args.iters <= 0 or args.warmup < 0:
        raise UserError("--iters must be > 0 and --warmup >= 0")
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


def time_ms(torch, fn, warmup, iters):
    """Median milliseconds of ``fn`` over ``iters`` runs, each timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def _row(model, layer, m, n, k, backend, bits, kernel, ms, nbytes):
    return {"model": model, "layer": layer, "m": m, "n": n, "k": k, "backend": backend, "bits": bits,
            "kernel": kernel, "ms": ms, "tops": (2.0 * m * n * k / (ms * 1e-3) / 1e12) if ms else None,
            "gbps": (nbytes / (ms * 1e-3) / 1e9) if ms else None}


def bench_shape(torch, gemm_ext, model, layer, m, n, k, args):
    """All backends for one (M, N, K): cuBLAS fp16, cuBLAS int8, low-bit kernels per bits x path."""
    import numpy as np

    import qformat

    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(m * 7 + n * 3 + k)
    x = torch.randn(m, k, generator=gen).to(dev, torch.float16)
    w16 = torch.randn(n, k, generator=gen).to(dev, torch.float16)
    rows = []
    ms = time_ms(torch, lambda: torch.matmul(x, w16.t()), args.warmup, args.iters)
    rows.append(_row(model, layer, m, n, k, "cublas_fp16", 16, "torch.matmul", ms, dense_bytes(m, n, k, 2, 2)))
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
    # [K, N] in column-major storage: the layout cuBLAS int8 GEMM wants for B
    b8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev).t()
    try:
        ms = time_ms(torch, lambda: torch._int_mm(a8, b8), args.warmup, args.iters)
    except (RuntimeError, AttributeError):  # _int_mm needs m > 16, k and n multiples of 8
        ms = None
    rows.append(_row(model, layer, m, n, k, "cublas_int8", 8, "torch._int_mm", ms, dense_bytes(m, n, k, 1, 4)))
    rng = np.random.default_rng(n + k)
    for bits in args.bits:
        lo, hi = qformat.qrange(bits, signed=True)
        q = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
        prep = gemm_ext.prepare(qformat.pack(q, bits), np.full(n, 0.01, np.float32), np.zeros(n, np.float32),
                                bits, k)
        for path in args.paths:
            kernel = gemm_ext.select_kernel(m, n, k, bits, torch.float16, path)

            def fn(prep=prep, path=path, bits=bits):
                return gemm_ext.lowbit_linear(x, prep, None, None, bits, 0.05, -128, 127, path=path)

            ms = time_ms(torch, fn, args.warmup, args.iters)
            rows.append(_row(model, layer, m, n, k, "lowbit_w{}{}".format(bits, path), bits, kernel, ms,
                             lowbit_bytes(m, n, k, bits)))
    return rows


def check_targets(rows):
    """Evaluate the issue's targets per (model, layer, m); returns a list of {target, ok, detail}."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["layer"], r["m"]), {})[r["backend"]] = r["ms"]
    out = []
    for (model, layer, m), t in sorted(by.items()):
        name = "{}/{} M={}".format(model, layer, m)
        fp16 = t.get("cublas_fp16")
        w4 = t.get("lowbit_w4a16") or t.get("lowbit_w4a8")
        if m <= 16 and fp16 and w4:
            out.append({"target": name + ": W4 >= 3x FP16", "ok": fp16 / w4 >= 3.0,
                        "detail": "{:.2f}x".format(fp16 / w4)})
            for b in (2, 3):
                wb = t.get("lowbit_w{}a16".format(b)) or t.get("lowbit_w{}a8".format(b))
                if wb:
                    out.append({"target": name + ": W{} faster than W4".format(b), "ok": wb < w4,
                                "detail": "{:.4f} vs {:.4f} ms".format(wb, w4)})
        w4a8, i8 = t.get("lowbit_w4a8"), t.get("cublas_int8")
        if m >= 197 * 32 and w4a8 and i8:
            out.append({"target": name + ": W4A8 >= 0.8x INT8", "ok": i8 / w4a8 >= 0.8,
                        "detail": "{:.2f}x".format(i8 / w4a8)})
    return out


def format_table(rows):
    """Fixed-width text table of the result rows."""
    head = "{:<7} {:<5} {:>6} {:>5} {:>5} {:<15} {:<14} {:>9} {:>7} {:>8}".format(
        "model", "layer", "M", "N", "K", "backend", "kernel", "ms", "TOPS", "GB/s")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = "{:.4f}".format(r["ms"]) if r["ms"] else "n/a"
        tops = "{:.2f}".format(r["tops"]) if r["tops"] else "n/a"
        gbps = "{:.1f}".format(r["gbps"]) if r["gbps"] else "n/a"
        lines.append("{:<7} {:<5} {:>6} {:>5} {:>5} {:<15} {:<14} {:>9} {:>7} {:>8}".format(
            r["model"], r["layer"], r["m"], r["n"], r["k"], r["backend"], r["kernel"], ms, tops, gbps))
    return "\n".join(lines)


def run_model_e2e(args):
    """End-to-end hook: time a whole model with its Linears swapped for LowBitLinearCUDA.

    Not finished: needs the model registry (train/) to build ``args.model_e2e`` and the act
    scales from a checkpoint.  ``runtime.gemm_ext.swap_linears`` already does the module surgery.
    """
    raise UserError("--model-e2e {} is not implemented yet (hook: runtime/bench_gemm.py run_model_e2e)".format(
        args.model_e2e))


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.model_e2e:
        require_gpu()
        return run_model_e2e(args)
    shapes = layer_shapes(args.models)
    torch = require_gpu()
    from runtime.torchtools import gemm_ext

    gemm_ext.load_extension()
    rows = []
    for model, layer, k, n in shapes:
        for m in args.m:
            rows.extend(bench_shape(torch, gemm_ext, model, layer, m, n, k, args))
    print(format_table(rows))
    targets = check_targets(rows)
    for t in targets:
        print("{} {} ({})".format("PASS" if t["ok"] else "MISS", t["target"], t["detail"]))
    props = torch.cuda.get_device_properties(0)
    qio.write_json(args.out, {"device": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                              "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
                              "rows": rows, "targets": targets})
    print("wrote {}".format(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
