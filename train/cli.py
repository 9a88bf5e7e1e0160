"""``python -m train`` / ``qvit train``: quantization-aware training of a ViT (``torchrun`` for DDP).

The parser imports no torch: a typo in a flag, a bad bit-width or a malformed
``--quant-override`` costs no start-up time.
"""

from __future__ import annotations

import argparse
import sys

from qformat import MAX_BITS, MIN_BITS
from qformat.argtypes import (
    bits_int,
    float_range,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
)
from qformat.cli import add_model_args, add_override_arg, parser, read_overrides
from qformat.errors import UserError, main_guard
from train.config import (
    BIT_PENALTY_NAMES,
    DATASETS,
    IRM_INITS,
    WEIGHT_SCALES,
    check_overrides,
    mixed_settings,
    resolve_bits,
    variant_overrides,
)
from train.methods import METHODS, LsqQuant


def _model_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and quantization")
    add_model_args(g, "vit_fmnist", "registry name (train.models.list_models())")
    g.set_defaults(bits=4)
    g.add_argument("--w-bits", type=bits_int, default=None, help="override weight bits")
    g.add_argument("--a-bits", type=bits_int, default=None, help="override activation bits")
    g.add_argument("--method", default="qvit", choices=tuple(METHODS),
                   help=" | ".join(f"{m.name} ({m.help})" if m.help else m.name for m in METHODS.values()) +
                   " (train.methods)")
    g.add_argument("--granularity", default="deploy", choices=("deploy", "paper"),
                   help="activation-scale granularity (QuantConfig.granularity)")
    g.add_argument("--calib-batches", type=positive_int, default=4, help="batches for the quantizers' data-driven init")
    add_override_arg(g)


def _mixed_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed-precision search (--method mp | qvit-mp; train.mixedbits)")
    g.add_argument("--bitops-budget", type=float_range(MIN_BITS, MAX_BITS, what="uniform-bit equivalent"),
                   default=None, metavar="N",
                   help="BitOPs budget = a uniform N-bit model's (patch embedding and head at 8); bits start at "
                        "N + 1 (default: --bits)")
    g.add_argument("--search-ratio", type=float_range(0.0, 1.0, lo_open=True), default=None, metavar="SIGMA",
                   help="learn the bits for this fraction of the steps, then freeze them (default 0.9)")
    g.add_argument("--bitops-weight", type=nonneg_float, default=None, metavar="ETA",
                   help="eta of the BitOPs penalty (--bit-penalty; default 0.1)")
    g.add_argument("--bit-lr", type=positive_float, default=None, help="peak lr of the float bit-widths (default 0.01)")
    g.add_argument("--bit-penalty", default=None, choices=BIT_PENALTY_NAMES,
                   help="relative: eta * (overshoot / budget)^2; paper: eta * (overshoot in GBitOPs)^2, eq. 13 of "
                        "the paper (default relative)")
    g.add_argument("--no-switchable-scale", dest="switchable_scale", action="store_const", const=False, default=None,
                   help="one scale per quantizer instead of one per candidate width 2..8 (ablation)")


def _vvtq_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VVTQ (variation-aware QAT, train/vvtq.py); combine with any quantized --method, "
                             "learned bits included")
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--obr", action=bool_flag, default=None,
                   help="oscillation-aware bin regularisation, λ raised by a cosine (default: on for --method vvtq)")
    g.add_argument("--obr-lambda", type=nonneg_float, default=None, help="λ of OBR at the last step (default 0.01)")
    g.add_argument("--obr-start", type=float_range(0.0, 1.0, hi_open=True), default=None,
                   help="fraction of the steps with λ = 0 before it rises (default 0.25)")
    g.add_argument("--module-scales", action=bool_flag, default=None,
                   help="module-dependent scale gradients 1/sqrt(Qp*||w_m||_1) (default: on for --method vvtq)")
    g.add_argument("--weight-scale", default=None, choices=WEIGHT_SCALES,
                   help="one learned weight step per output row, or per module (q/k/v of one head; a layer)")
    g.add_argument("--multicrop-kd", default=None, metavar="STORE",
                   help="distil from this soft-label store (python -m train.softlabels): KD on its stored crops, "
                        "no teacher forward (DGD still runs the teacher on them)")
    g.add_argument("--osc-momentum", type=float_range(0.0, 1.0, lo_open=True), default=None,
                   help="EMA momentum of the oscillation measure (default 0.01)")
    g.add_argument("--osc-threshold", type=fraction, default=None,
                   help="oscillation frequency above which a weight counts as oscillating (default 0.005)")


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
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from your own timm weights: .safetensors, .pth/.bin state dict, or a timm / Hugging "
                        "Face model folder (keys remapped by timm; a classifier of another size starts fresh; the "
                        "preprocessing follows its pretrained_cfg)")
    g.add_argument("--pretrained", action="store_true",
                   help="timm's weights for --model from the local cache (offline when there; else fetched once)")
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
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="fused QAT: torch.compile (Inductor) of the training forward/backward (train/fastqat.py); "
                        "auto: where a compiler is available and the phase has enough steps to repay compiling")
    g.add_argument("--seed", type=seed_int, default=0)


def _data_run_groups(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="fmnist", choices=DATASETS)
    g.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder or ImageNet-layout train/ val/ root")
    g.add_argument("--workers", type=nonneg_int, default=None,
                   help="loader processes (default: 0 in-memory, 8 folders)")
    g.add_argument("--max-train-batches", type=positive_int, default=None, help="cap steps per epoch (budget control)")
    g.add_argument("--max-eval-batches", type=positive_int, default=None, help="cap validation batches")
    g.add_argument("--holdout", type=nonneg_int, default=0, metavar="N",
                   help="validate on N images carved (stratified, fixed) from the training split and train on the "
                        "rest; the test split is not read (0: validate on the test split)")
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
    groups = (_model_group, _variant_group, _mixed_group, _vvtq_group, _weights_group, _optim_group, _data_run_groups)
    for group in groups:
        group(p)
    return p


def parse_args(argv: list[str] | None = None, prog: str = "python -m train") -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.fp_epochs is None:
        args.fp_epochs = args.epochs
    given = [f for f, v in (("--init-from", args.init_from), ("--checkpoint", args.checkpoint),
                            ("--pretrained", args.pretrained)) if v]
    if len(given) > 1:
        raise UserError("{} and {} both give the starting weights: pick one".format(given[0], given[1]))
    if args.resume and args.force:
        raise UserError("--resume continues the run in --out, --force replaces it: give one of them")
    resolve_bits(args.bits, args.w_bits, args.a_bits)  # before torch is imported: a typo costs no start-up time
    mixed_settings(args)
    args.quant_override = check_overrides(read_overrides(args.quant_override))
    vvtq_flags = [f for f in ("obr", "obr_lambda", "obr_start", "module_scales", "weight_scale", "multicrop_kd",
                              "osc_momentum", "osc_threshold") if getattr(args, f) is not None]
    if vvtq_flags and not METHODS[args.method].has(LsqQuant):
        raise UserError("--{} needs a quantized --method ({}), not {}".format(
            vvtq_flags[0].replace("_", "-"), ", ".join(n for n, m in METHODS.items() if m.has(LsqQuant)),
            args.method))
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
