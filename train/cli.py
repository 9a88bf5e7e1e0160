"""``python -m train`` / ``qvit train``: quantization-aware training of a ViT (``torchrun`` for DDP).

The parser imports no torch: a typo in a flag, a bad bit-width or a malformed
``--quant-override`` costs no start-up time.
"""

from __future__ import annotations

import argparse
import sys

from qformat.argtypes import float_range, nonneg_float, nonneg_int, positive_float, positive_int, seed_int
from qformat.cli import add_model_args, add_override_arg, parser, read_overrides
from qformat.errors import UserError, main_guard
from train.config import DATASETS, IRM_INITS, METHODS, check_overrides, resolve_bits, variant_overrides


def _model_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and quantization")
    add_model_args(g, "vit_fmnist", "registry name (train.models.list_models())")
    g.set_defaults(bits=4)
    g.add_argument("--w-bits", type=int, default=None, help="override weight bits")
    g.add_argument("--a-bits", type=int, default=None, help="override activation bits")
    g.add_argument("--method", default="qvit", choices=METHODS,
                   help="fp | baseline (no IRM/DGD) | irm | dgd | qvit (IRM+DGD)")
    g.add_argument("--granularity", default="deploy", choices=("deploy", "paper"),
                   help="activation-scale granularity (QuantConfig.granularity)")
    g.add_argument("--calib-batches", type=positive_int, default=4, help="batches for the quantizers' data-driven init")
    add_override_arg(g)


def _variant_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Q-ViT variants (IRM / DGD; defaults: the --method preset)")
    g.add_argument("--dgd-weight", type=nonneg_float, default=None,
                   help="weight of the DGD term (DistillConfig.dgd_weight)")
    g.add_argument("--dgd-on", default=None, help="DGD on q, k or both: q | k | q,k")
    g.add_argument("--irm-per-head", action="store_true", help="one IRM affine (gamma, beta) per head")
    g.add_argument("--irm-init", default=None, choices=IRM_INITS,
                   help="IRM gamma: ln = 1 (LayerNorm); std = per-head std of q/k on the calibration batches, "
                        "which keeps the FP attention temperature")
    g.add_argument("--irm-blend-steps", type=nonneg_int, default=None,
                   help="blend IRM in over the first N QAT steps: (1 - t) q + t IRM(q), t = step / N")


def _weights_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("--checkpoint", default=None, help="local FP weights: timm state dict (.pth) or our .safetensors")
    g.add_argument("--teacher", default=None, help="FP teacher checkpoint (default: --checkpoint, or trained here)")
    g.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    g.add_argument("--fp-epochs", type=nonneg_int, default=None,
                   help="epochs of FP teacher training when no weights are given (default: --epochs)")
    g.add_argument("--fp-lr", type=positive_float, default=2e-3, help="peak lr of the FP teacher phase")


def _optim_group(p: argparse.ArgumentParser) -> None:
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


def _data_run_groups(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="fmnist", choices=DATASETS)
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


def build_parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    p = parser(prog, __doc__.split("\n\n")[0], defaults_help=True)
    for group in (_model_group, _variant_group, _weights_group, _optim_group, _data_run_groups):
        group(p)
    return p


def parse_args(argv: list[str] | None = None, prog: str = "python -m train") -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.fp_epochs is None:
        args.fp_epochs = args.epochs
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out, --force replaces it: give one of them")
    resolve_bits(args.bits, args.w_bits, args.a_bits)  # before torch is imported: a typo costs no start-up time
    args.quant_override = check_overrides(read_overrides(args.quant_override))
    variant_overrides(args)  # the IRM/DGD variant flags, checked against --method
    return args


@main_guard
def main(argv: list[str] | None = None, prog: str = "python -m train") -> int:
    args = parse_args(argv, prog)
    from train.trainer import run

    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
