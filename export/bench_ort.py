"""ONNX Runtime CPU throughput of the same model as fp32 vs qdq vs lowbit, in one run.

    python -m export.bench_ort --model vit_fmnist --bits 4 [--checkpoint CKPT] [--batch 32]

Exports the three formats for ``--target ort`` into a temporary directory (parity checked
as usual) and times ``InferenceSession.run`` on random inputs of the model's size.
A minimal helper for the exporter; the runtime's bench (runtime/bench.py) is the full tool.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from qformat.errors import main_guard


def bench_session(path: str, shape: tuple, batch: int, iters: int, warmup: int, threads: int | None) -> float:
    """Images per second of one ONNX file (median of ``iters`` timed runs after ``warmup``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # as the parity check runs it
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(shape)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench_ort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_fmnist")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--checkpoint")
    p.add_argument("--formats", default="fp32,qdq,lowbit")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    a = p.parse_args(argv)
    from .exporter import export
    from .source import fresh, from_checkpoint

    model, meta = from_checkpoint(a.checkpoint) if a.checkpoint else fresh(a.model, a.bits)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fmt in a.formats.split(","):
            res = export(model, meta, fmt, "ort", d, opset=a.opset, parity_n=16)
            ips = bench_session(res.path, tuple(meta["input_size"]), a.batch, a.iters, a.warmup, a.threads)
            rows.append((fmt, ips))
            sys.stderr.write(f"  {fmt}: {ips:.1f} img/s\n")
    base = dict(rows).get("fp32")
    print(f"{meta['model']} w{model.qvit_quant_config['w_bits']}a{model.qvit_quant_config['a_bits']}  "
          f"ONNX Runtime CPU, batch {a.batch}, threads {a.threads or 'default'}")
    for fmt, ips in rows:
        rel = f"  x{ips / base:.2f} vs fp32" if base else ""
        print(f"  {fmt:7s} {ips:10.1f} img/s{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
