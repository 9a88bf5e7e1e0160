"""``python -m train``: quantization-aware training of a ViT (see ``--help``; ``torchrun`` for DDP)."""

from __future__ import annotations

import argparse
import sys

from qformat.argtypes import (
    ArgumentParser,
    float_range,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
)
from qformat.errors import UserError, main_guard

METHODS = ("fp", "baseline", "irm", "dgd", "qvit")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and quantization")
    g.add_argument("--model", default="vit_fmnist", help="registry name (train.models.list_models())")
    g.add_argument("--bits", type=int, default=4, help="weight and activation bits (2..8)")
    g.add_argument("--w-bits", type=int, default=None, help="override weight bits")
    g.add_argument("--a-bits", type=int, default=None, help="override activation bits")
    g.add_argument("--method", default="qvit", choices=METHODS,
                   help="fp | baseline (no IRM/DGD) | irm | dgd | qvit (IRM+DGD)")
    g.add_argument("--granularity", default="deploy", choices=("deploy", "paper"),
                   help="activation-scale granularity (QuantConfig.granularity)")
    g.add_argument("--calib-batches", type=positive_int, default=4, help="batches for the quantizers' data-driven init")
    g = p.add_argument_group("Q-ViT variants (IRM / DGD; defaults: the --method preset)")
    g.add_argument("--dgd-weight", type=nonneg_float, default=None,
                   help="weight of the DGD term (DistillConfig.dgd_weight)")
    g.add_argument("--dgd-on", default=None, help="DGD on q, k or both: q | k | q,k")
    g.add_argument("--irm-per-head", action="store_true", help="one IRM affine (gamma, beta) per head")
    g.add_argument("--irm-init", default=None, choices=("ln", "std"),
                   help="IRM gamma: ln = 1 (LayerNorm); std = per-head std of q/k on the calibration batches, "
                        "which keeps the FP attention temperature")
    g.add_argument("--irm-blend-steps", type=nonneg_int, default=None,
                   help="blend IRM in over the first N QAT steps: (1 - t) q + t IRM(q), t = step / N")
    g = p.add_argument_group("weights")
    g.add_argument("--checkpoint", default=None, help="local FP weights: timm state dict (.pth) or our .safetensors")
    g.add_argument("--teacher", default=None, help="FP teacher checkpoint (default: --checkpoint, or trained here)")
    g.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    g.add_argument("--fp-epochs", type=nonneg_int, default=None,
                   help="epochs of FP teacher training when no weights are given (default: --epochs)")
    g.add_argument("--fp-lr", type=positive_float, default=2e-3, help="peak lr of the FP teacher phase")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=10)
    g.add_argument("--batch-size", type=positive_int, default=128, help="per process")
    g.add_argument("--lr", type=positive_float, default=5e-4, help="peak lr (AdamW) of this run's weights")
    g.add_argument("--quant-lr", type=positive_float, default=None,
                   help="peak lr of quantizer scales/zero-points (default: --lr)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.05)
    g.add_argument("--quant-weight-decay", type=nonneg_float, default=0.0)
    g.add_argument("--warmup-epochs", type=nonneg_float, default=0.25, help="linear warm-up, in epochs (fractions ok)")
    g.add_argument("--clip-grad", type=nonneg_float, default=1.0, help="max grad norm (0: off)")
    g.add_argument("--smoothing", type=float_range(0.0, 1.0, hi_open=True), default=0.0,
                   help="label smoothing of the CE term")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast, GPU only")
    g.add_argument("--seed", type=seed_int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="fmnist", choices=("fmnist", "imagefolder", "synthetic"))
    g.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder or ImageNet-layout train/ val/ root")
    g.add_argument("--workers", type=nonneg_int, default=None,
                   help="loader processes (default: 0 in-memory, 8 folders)")
    g.add_argument("--max-train-batches", type=positive_int, default=None, help="cap steps per epoch (budget control)")
    g.add_argument("--max-eval-batches", type=positive_int, default=None, help="cap validation batches")
    g.add_argument("--holdout", type=nonneg_int, default=0,
                   help="validate on N images carved from the training split (stratified, fixed seed) and "
                        "train on the rest; the test split is not read (0: validate on the test split)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="output folder (checkpoints, metrics.csv, tb/)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    g.add_argument("--force", action="store_true",
                   help="replace the earlier run in --out (its checkpoints, teacher and metrics are deleted)")
    g.add_argument("--stop-after-epochs", type=positive_int, default=None,
                   help="stop after this many epochs in this invocation (pre-emptible jobs; resume later)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: one GPU per rank)")
    g.add_argument("--no-tensorboard", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.fp_epochs is None:
        args.fp_epochs = args.epochs
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out, --force replaces it: give one of them")
    check_run_bits(args)  # before torch is imported: a typo costs no start-up time
    from train.config import variant_overrides

    variant_overrides(args)  # validates the IRM/DGD variant flags against --method
    return args


def check_run_bits(args: argparse.Namespace) -> tuple[int, int]:
    """(weight bits, activation bits) after the --w-bits/--a-bits overrides, validated by qformat."""
    from qformat import FormatError, check_bits

    try:
        return (check_bits(args.bits if args.w_bits is None else args.w_bits, "--bits" if args.w_bits is None
                           else "--w-bits"),
                check_bits(args.bits if args.a_bits is None else args.a_bits, "--bits" if args.a_bits is None
                           else "--a-bits"))
    except FormatError as e:
        raise UserError(str(e)) from None


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from train.trainer import run

    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
