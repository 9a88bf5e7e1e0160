"""``python -m export`` / ``qvit export``: checkpoint (or fresh model) -> ONNX (qdq | lowbit | fp32 | woq) + sidecar,
with parity."""

from __future__ import annotations

import argparse
import sys

import qformat
from qformat import formats, targets
from qformat.argtypes import fraction, int_range, nonneg_float, nonneg_int
from qformat.cli import add_model_args, add_override_arg, parser, read_overrides
from qformat.errors import UserError, main_guard
from qformat.io import remove_stale_temps
from qformat.lock import hold
from qformat.paths import check_out_dir

RANDOM_WEIGHTS = ("note: no checkpoint: exporting {model} at {bits} bits with RANDOM weights (structure and speed "
                  "only, accuracy meaningless); for a trained model run `make train MODEL={model} BITS={bits}` "
                  "(python -m train --model {model} --bits {bits} --out runs/{model}_w{bits}) and export its "
                  "best.safetensors with --checkpoint")


def build_parser(prog: str = "python -m export") -> argparse.ArgumentParser:
    p = parser(prog, __doc__.split("\n\n")[0])
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", help="trained checkpoint (.safetensors from python -m train)")
    add_model_args(src, None, "registered model name (without --checkpoint: fresh calibrated model)")
    add_override_arg(src)
    defaults = ", ".join(f"{t.name} {t.default_opset}" for t in targets.TARGETS)
    p.add_argument("--format", default="qdq", choices=qformat.FORMATS)
    p.add_argument("--target", default="ort", choices=targets.TARGET_NAMES)
    p.add_argument("--opset", type=int_range(), help=f"ONNX opset (default per target: {defaults})")
    p.add_argument("--typing", default="auto", choices=("auto",) + targets.TYPINGS,
                   help="strong: FP16 tensors with LayerNorm/IRM/Softmax in FP32 through Casts, for a strongly typed "
                        "engine (opset 19+; the only kind TensorRT 11 builds); weak: FP32 graph, precision from "
                        "builder flags (TensorRT 8.x/10.x); auto: the target's default (--list-targets)")
    p.add_argument("--list-targets", action="store_true", help="print what each target can build, then exit")
    p.add_argument("--out", default="artifacts", help="output directory")
    fn = p.add_mutually_exclusive_group()
    fn.add_argument("--function", dest="function", action="store_true", default=None,
                    help="lowbit: embed the ONNX-function body of QvitLowBitLinear (default for --target ort)")
    fn.add_argument("--no-function", dest="function", action="store_false",
                    help="lowbit: plugin-only graph (default for TensorRT targets)")
    p.add_argument("--no-int4", dest="int4", action="store_false",
                   help="keep 4-bit weights in INT8 containers where the target has INT4 (--list-targets); "
                        "use this if your TensorRT build rejects INT8 x INT4")
    p.add_argument("--no-nonfinite-guard", dest="guard", action="store_false",
                   help="qdq/lowbit: leave out the guard that turns a NaN/Inf input into NaN logits (by default "
                        "logits + ReduceSum(input) x 0; Q/DQ alone maps NaN to a confident class)")
    par = p.add_argument_group("parity")
    par.add_argument("--parity-n", type=nonneg_int, default=32, help="images for the parity check (0 = skip)")
    par.add_argument("--atol", type=nonneg_float, default=None, help="default 1e-3 (both typings)")
    par.add_argument("--rtol", type=nonneg_float, default=None,
                     help="relative to the largest |logit| (tie-aligned logits); default 1e-3 (strong typing: 5e-3)")
    par.add_argument("--min-agree", type=fraction, default=0.99, help="minimum top-1 agreement (fraction, tie-aligned)")
    par.add_argument("--calib-dir", help="image folder for the parity images instead of the Fashion-MNIST test set")
    return p


def choice_notes(fmt: str, tgt: targets.Target, opset: int, int4: bool, specs: list) -> list[str]:
    """One line for each choice the export makes that the user may want the other way."""
    notes = []
    low = [s for s in specs if s.weight is not None and s.weight.max_bits <= 4]
    if fmt == "woq" and low and tgt.int4 and int4 and not targets.use_int4(tgt, opset):
        notes.append(f"note: --format woq at opset {opset} stores the weights of {len(low)} layer(s) of 4 bits or "
                     f"fewer in INT8 (--target {tgt.name} reads INT4 weights from opset 21): add --opset 21 for INT4")
    if fmt == "qdq" and tgt.tensorrt and not tgt.fast_int8:
        notes.append(f"note: --target {tgt.name} has no fast INT8: a qdq engine runs INT8 in slow emulation "
                     "(runtime.build refuses it without --allow-slow-int8); --format lowbit gives an FP16 engine "
                     "with low-bit weight plugins")
    return notes


@main_guard
def main(argv: list[str] | None = None, prog: str = "python -m export") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.list_targets:
        sys.stdout.write(targets.markdown())
        return 0
    tgt = targets.get_target(args.target)  # refuse before any slow work
    targets.resolve_typing(tgt, args.typing, targets.resolve_opset(tgt, args.opset))
    overrides = read_overrides(args.quant_override)
    check_out_dir(args.out, "--out")
    remove_stale_temps(args.out)  # what a killed export left (only files of writers that are gone)
    if not args.checkpoint:
        if not args.model or args.bits is None:
            raise UserError("give --checkpoint CKPT, or --model NAME --bits B for a fresh calibrated model")
        sys.stderr.write(RANDOM_WEIGHTS.format(model=args.model, bits=args.bits) + "\n")
        sys.stderr.flush()
    from train.deploy import load_deployable

    from .exporter import ExportOptions, ParityError, ParityOptions, export

    dep = load_deployable(args.checkpoint, args.model, args.bits, overrides)
    # every file it writes (the longest: a parity-failed graph, or a temp name) fits the file system, before tracing
    name = formats.artifact_stem(dep.meta["model"], dep.bits(), args.format)
    check_out_dir(args.out, "--out", files=[name + ".parity-failed.onnx", name + ".json"])
    hold(args.out, "--out")  # one export per folder at a time (a graph and its sidecar are a pair)
    for note in choice_notes(args.format, tgt, targets.resolve_opset(tgt, args.opset), args.int4, dep.specs):
        sys.stderr.write(note + "\n")
    parity = ParityOptions(args.parity_n, args.atol, args.rtol, args.min_agree, args.calib_dir)
    opts = ExportOptions(args.format, args.target, args.opset, args.typing, args.function, args.int4, parity,
                         args.guard)
    try:
        res = export(dep, args.out, opts)
    except ParityError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    print(res.path)
    return 0
