"""``python -m export``: checkpoint (or fresh model) -> ONNX (qdq | lowbit | fp32) + sidecar, with parity."""

from __future__ import annotations

import argparse
import sys

from qformat.argtypes import ArgumentParser, bits_int, fraction, int_range, nonneg_float, nonneg_int
from qformat.errors import UserError, main_guard
from qformat.io import remove_stale_temps
from qformat.paths import check_out_dir

from .targets import FORMATS, TARGETS


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m export", description=__doc__)
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", help="trained checkpoint (.safetensors from python -m train)")
    src.add_argument("--model", help="registered model name (without --checkpoint: fresh calibrated model)")
    src.add_argument("--bits", type=bits_int, help="weight/activation bits (without --checkpoint; else must match it)")
    p.add_argument("--format", default="qdq", choices=FORMATS)
    p.add_argument("--target", default="ort", choices=sorted(TARGETS))
    p.add_argument("--opset", type=int_range(),
                   help="ONNX opset (default per target: tx2 13, orin 17, trt10 21, ort 17)")
    p.add_argument("--out", default="artifacts", help="output directory")
    fn = p.add_mutually_exclusive_group()
    fn.add_argument("--function", dest="function", action="store_true", default=None,
                    help="lowbit: embed the ONNX-function body of QvitLowBitLinear (default for --target ort)")
    fn.add_argument("--no-function", dest="function", action="store_false",
                    help="lowbit: plugin-only graph (default for TensorRT targets)")
    p.add_argument("--no-int4", dest="int4", action="store_false",
                   help="keep 4-bit weights in INT8 containers at opset 21 too (TensorRT 10 supports INT4 weights "
                        "for weight-only quantization; use this if your build rejects INT8 x INT4)")
    par = p.add_argument_group("parity")
    par.add_argument("--parity-n", type=nonneg_int, default=32, help="images for the parity check (0 = skip)")
    par.add_argument("--atol", type=nonneg_float, default=1e-3)
    par.add_argument("--rtol", type=nonneg_float, default=1e-3,
                     help="relative to the largest |logit| (tie-aligned logits)")
    par.add_argument("--min-agree", type=fraction, default=0.99, help="minimum top-1 agreement (fraction, tie-aligned)")
    par.add_argument("--calib-dir", help="image folder for the parity images instead of the Fashion-MNIST test set")
    return p


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .exporter import ParityError, export
    from .source import fresh, from_checkpoint
    from .targets import get_target, resolve_opset

    resolve_opset(get_target(args.target), args.opset, args.format)  # refuse before any slow work
    check_out_dir(args.out, "--out")
    remove_stale_temps(args.out)  # what a killed export left (only files of writers that are gone)
    if args.checkpoint:
        model, meta = from_checkpoint(args.checkpoint, args.model, args.bits)
    else:
        if not args.model or args.bits is None:
            raise UserError("give --checkpoint CKPT, or --model NAME --bits B for a fresh calibrated model")
        sys.stderr.write(f"no checkpoint: preparing and calibrating a fresh {args.model} at {args.bits} bits "
                         "(random weights: structure and speed only)\n")
        model, meta = fresh(args.model, args.bits)
    try:
        res = export(model, meta, args.format, args.target, args.out, opset=args.opset, parity_n=args.parity_n,
                     atol=args.atol, rtol=args.rtol, min_agree=args.min_agree, calib_dir=args.calib_dir,
                     function=args.function, int4=args.int4)
    except ParityError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    print(res.path)
    return 0
