"""PROJECTION (not a measurement): roofline upper bounds for DeiT-T/S/B at 8/4/3/2 bits on TX2 and Orin.

Until the bench runs on real Jetsons, this bounds what to expect: per model, the
compute time (MACs / device peak) and the weight-streaming time (quantized weight
bytes / DRAM bandwidth); img/s <= 1 / max(both).  What it shows: at 224x224 every
weight is reused by 197 tokens, so even at batch 1 DeiT is compute-bound at datasheet
peaks -- 2-4-bit weights lower the weight-bandwidth ceiling's cost 2-4x (and the memory
footprint), but the projected img/s is set by INT8 (Orin) / FP16 (TX2) math, which
TensorRT does not run faster below 8 bits.  Activation traffic, softmax/LayerNorm time
and kernel efficiency are ignored, so measured numbers will be well below the bound.

    python3 runtime/roofline.py [--markdown] [--png docs/roofline.png]
"""

import sys

if not __package__:  # `python3 runtime/<script>.py`: one error line where qformat cannot be imported
    import script_guard  # noqa: F401

from qformat.argtypes import ArgumentParser  # noqa: E402
from qformat.errors import main_guard  # noqa: E402
from qformat.io import atomic_write  # noqa: E402
from qformat.paths import check_out_file  # noqa: E402

IMG, PATCH, CLASSES, DEPTH, MLP = 224, 16, 1000, 12, 4
#: DeiT widths/heads (Touvron et al. 2021, Table 1)
MODELS = {"deit_t": (192, 3), "deit_s": (384, 6), "deit_b": (768, 12)}
BITS = (8, 4, 3, 2)
#: Dense peaks.  Sources:
#:  TX2: Jetson TX2 Series Module Data Sheet (DS-08256): 256-core Pascal @ 1.30 GHz -> 1.33 TFLOPS FP16
#:       (665 GFLOPS FP32); 128-bit LPDDR4 at 1866 MHz = 59.7 GB/s.  No fast INT8 (TensorRT
#:       platform_has_fast_int8 is false on sm_62), so compute is FP16.
#:  Orin: Jetson AGX Orin Series Data Sheet (DS-10662) / Technical Brief v1.2: GPU INT8 sparse
#:       170 TOPS (64GB, 1.3 GHz) and 108 TOPS (32GB, 930 MHz) -> dense half of that; 256-bit
#:       LPDDR5 204.8 GB/s.  Orin Nano 8GB (DS-11105): 40 sparse INT8 TOPS -> 20 dense, 68 GB/s.
DEVICES = {
    "tx2": {"name": "Jetson TX2", "ops": 1.33e12, "math": "FP16", "bw": 59.7e9},
    "orin_nano_8gb": {"name": "Orin Nano 8GB", "ops": 20e12, "math": "INT8", "bw": 68e9},
    "orin_agx_32gb": {"name": "AGX Orin 32GB", "ops": 54e12, "math": "INT8", "bw": 204.8e9},
    "orin_agx_64gb": {"name": "AGX Orin 64GB", "ops": 85e12, "math": "INT8", "bw": 204.8e9},
}


def layers(model):
    """``[(name, macs, weight_params, out_features, quantized_with)]`` for one 224x224 image."""
    d, _heads = MODELS[model]
    n = (IMG // PATCH) ** 2 + 1  # patches + class token
    out = [("patch_embed", (n - 1) * 3 * PATCH * PATCH * d, 3 * PATCH * PATCH * d, d, "embed")]
    for i in range(DEPTH):
        out += [("b{}.qkv".format(i), n * d * 3 * d, d * 3 * d, 3 * d, "weight"),
                ("b{}.attn".format(i), 2 * n * n * d, 0, 0, "act"),  # QK^T and AV, no weights
                ("b{}.proj".format(i), n * d * d, d * d, d, "weight"),
                ("b{}.fc1".format(i), n * d * MLP * d, d * MLP * d, MLP * d, "weight"),
                ("b{}.fc2".format(i), n * MLP * d * d, MLP * d * d, d, "weight")]
    out.append(("head", d * CLASSES, d * CLASSES, CLASSES, "head"))
    return out


def other_params(model):
    """FP16 parameters outside the Linears: biases, LayerNorms, position/class embeddings."""
    d, _ = MODELS[model]
    n = (IMG // PATCH) ** 2 + 1
    per_block = (3 * d + d + MLP * d + d) + 4 * d  # biases + 2 LayerNorms
    return DEPTH * per_block + n * d + d + 2 * d + d + CLASSES


def footprint(model, bits, edge_bits=8):
    """``(macs, weight_bytes, params)``: block Linears at ``bits``, patch-embed/head at ``edge_bits``."""
    macs = weight_bytes = params = 0
    for _name, m, w, nout, kind in layers(model):
        macs += m
        params += w
        if w:
            b = bits if kind == "weight" else edge_bits
            weight_bytes += w * b / 8.0 + nout * 2  # codes + FP16 per-channel scale
    extra = other_params(model)
    return macs, weight_bytes + extra * 2, params + extra


def project(device, model, bits, batch=1):
    dev = DEVICES[device]
    macs, wbytes, _ = footprint(model, bits)
    t_compute = 2.0 * macs / dev["ops"]  # per image
    t_weights = wbytes / dev["bw"]  # per batch (weights streamed once per batch)
    t = max(batch * t_compute, t_weights)
    return {"device": device, "model": model, "bits": bits, "batch": batch, "gmacs": macs / 1e9,
            "weight_mb": wbytes / 1e6, "compute_img_s": 1.0 / t_compute, "weight_bw_img_s": batch / t_weights,
            "img_s": batch / t, "bound": "compute" if batch * t_compute >= t_weights else "weights"}


#: Tensor-core math per precision on Orin (sm_87, Ampere-class): dense rate relative to the INT8 peak in
#: DEVICES, the weight / activation bits, and the instructions per m16n8k64 step the kernels issue there
#: (SASS of lowbit_gemm.cu for sm_87, tests/test_cuda_build.py::test_int4_kernel_sass: one native
#: IMMA.16864.S4.U4 for W4A4 -- sm_90 would emulate it; two IMMA.16832.S8.U8 for INT8; FP16 HMMA at half
#: the INT8 rate).  W4A4 also stands for W3A3 / W2A2 (same INT4 instruction, codes widened in registers).
PRECISIONS = (
    ("W4A4 (INT4 mma, this project)", 2.0, 4, "1 x IMMA.16864.S4.U4 per m16n8k64"),
    ("W8A8 (INT8, TensorRT)", 1.0, 8, "2 x IMMA.16832.S8.U8 per m16n8k64"),
    ("FP16 (TensorRT)", 0.5, 16, "4 x HMMA.16816.F32.F16 per m16n8k64"),
)


def precision_rows(devices=("orin_nano_8gb", "orin_agx_64gb"), model="deit_s", batches=(1, 32)):
    """PROJECTION: DeiT roofline img/s on Orin per tensor-core precision (W4A4 vs INT8 vs FP16)."""
    rows = []
    for dev in devices:
        d = DEVICES[dev]
        for name, rate, bits, mix in PRECISIONS:
            macs, wbytes, _ = footprint(model, bits, edge_bits=min(bits, 8) if bits < 16 else 16)
            t_compute = 2.0 * macs / (d["ops"] * rate)
            t_weights = wbytes / d["bw"]
            for batch in batches:
                t = max(batch * t_compute, t_weights)
                rows.append({"device": dev, "model": model, "precision": name, "instructions": mix, "batch": batch,
                             "img_s": batch / t, "bound": "compute" if batch * t_compute >= t_weights else "weights",
                             "projection": True})
    return rows


def precision_markdown(rows=None):
    rows = rows if rows is not None else precision_rows()
    lines = ["PROJECTION (roofline from datasheet peaks and the kernels' instruction mix, NOT measured; GEMM "
             "math only, kernel efficiency, attention, LayerNorm and activation traffic ignored):", "",
             "| device | precision | instructions | batch | img/s (bound) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {} | {} | {} | {:.0f} ({}) |".format(DEVICES[r["device"]]["name"], r["precision"],
                                                                r["instructions"], r["batch"], r["img_s"], r["bound"]))
    return "\n".join(lines) + "\n"


def table(batches=(1, 8)):
    return [project(dev, m, b, bs) for dev in DEVICES for m in MODELS for b in BITS for bs in batches]


def markdown(rows):
    """Pivot: one row per model x bits; per device the projected img/s at batch 1 and the weight-bandwidth ceiling."""
    devs = list(DEVICES)
    head = "| model | bits | GMACs | weights MB | " + " | ".join(DEVICES[d]["name"] for d in devs) + " |"
    lines = ["PROJECTION (roofline upper bound from datasheet peaks, not measured): img/s at batch 1, "
             "and in brackets the weight-bandwidth ceiling W (the compute ceiling is the binding one "
             "wherever img/s < W).", "", head, "|" + "---|" * (4 + len(devs))]
    idx = dict(((r["device"], r["model"], r["bits"], r["batch"]), r) for r in rows)
    for m in MODELS:
        for b in BITS:
            r1 = idx[(devs[0], m, b, 1)]
            cells = ["{:.0f} (W {:.0f})".format(idx[(d, m, b, 1)]["img_s"], idx[(d, m, b, 1)]["weight_bw_img_s"])
                     for d in devs]
            lines.append("| {} | {} | {:.2f} | {:.1f} | {} |".format(m, b, r1["gmacs"], r1["weight_mb"],
                                                                     " | ".join(cells)))
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """img/s vs bits per device (log scale), one line per model; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DEVICES), figsize=(4 * len(DEVICES), 3.6), sharey=True)
    colors = dict(zip(MODELS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, dev in zip(axes, DEVICES):
        for m in MODELS:
            pts = [r for r in rows if r["device"] == dev and r["model"] == m and r["batch"] == 1]
            bits = [r["bits"] for r in pts]
            ax.plot(bits, [r["weight_bw_img_s"] for r in pts], "--", color=colors[m], alpha=0.6)
            ax.plot(bits, [r["compute_img_s"] for r in pts], ":", color=colors[m], alpha=0.6)
            ax.plot(bits, [r["img_s"] for r in pts], "-o", color=colors[m], label=m)
        ax.set_title("{} ({} {:.3g} T, {:.0f} GB/s)".format(DEVICES[dev]["name"], DEVICES[dev]["math"],
                                                           DEVICES[dev]["ops"] / 1e12, DEVICES[dev]["bw"] / 1e9),
                     fontsize=9)
        ax.set_xlabel("weight bits")
        ax.set_xticks(list(BITS))
        ax.invert_xaxis()
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("img/s at batch 1 (-- weight BW, .. compute)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("PROJECTION: roofline upper bounds for DeiT at 224x224 (not measured)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


@main_guard
def main(argv=None, prog="python3 runtime/roofline.py"):
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--png", default=None, help="also write the plot (e.g. docs/roofline.png)")
    p.add_argument("--markdown", action="store_true", help="print the README table")
    args = p.parse_args(argv)
    if args.png:
        check_out_file(args.png, "--png")
    rows = table()
    if args.markdown:
        print(markdown(rows), end="")
    else:
        print("PROJECTION (roofline upper bound, not measured)")
        print("{:<15} {:<7} {:>4} {:>5} {:>7} {:>10} {:>10} {:>10} {:>8}".format(
            "device", "model", "bits", "batch", "wMB", "compute/s", "weights/s", "img/s", "bound"))
        for r in rows:
            print("{:<15} {:<7} {:>4} {:>5} {:>7.1f} {:>10.0f} {:>10.0f} {:>10.0f} {:>8}".format(
                r["device"], r["model"], r["bits"], r["batch"], r["weight_mb"], r["compute_img_s"],
                r["weight_bw_img_s"], r["img_s"], r["bound"]))
    if args.png:
        print("plot -> " + plot(rows, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
