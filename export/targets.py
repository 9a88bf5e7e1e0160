"""What each deployment target's runtime can build: opsets, ops, INT4, UINT8, LayerNorm.

One table, so the CLI refuses an impossible combination up front with a one-line message
and the graph-rule checks (:mod:`export.rules`) read the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass

from qformat.errors import UserError

FORMATS = ("qdq", "lowbit", "fp32")
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # what builds/runs it, for messages
    default_opset: int
    max_opset: int
    tensorrt: bool
    layernorm_op: bool  # may the graph contain LayerNormalization (opset 17)?
    int4: bool  # INT4 weight DequantizeLinear (opset 21)

    def opset_range(self) -> tuple[int, int]:
        return MIN_OPSET, self.max_opset


TARGETS = {
    "tx2": Target("tx2", "TensorRT 8.2 (JetPack 4.6)", 13, 13, True, False, False),
    "orin-jp5": Target("orin-jp5", "TensorRT 8.5 (JetPack 5)", 17, 17, True, True, False),
    "orin-jp6": Target("orin-jp6", "TensorRT 8.6-10.3 (JetPack 6)", 17, 17, True, True, False),
    "trt10": Target("trt10", "TensorRT 10", 21, 21, True, True, True),
    "ort": Target("ort", "ONNX Runtime (CPU)", 17, 21, False, True, True),
}

#: Standard ops the exporter may emit (TensorRT's ONNX parser supports all of them).
ALLOWED_OPS = frozenset({
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "DequantizeLinear", "Div", "Erf",
    "Expand", "Flatten", "Gather", "Gelu", "Gemm", "Identity", "LayerNormalization", "MatMul", "Max", "Min", "Mod",
    "Mul", "Pad", "Pow", "QuantizeLinear", "Range", "ReduceMean", "Reshape", "Shape", "Slice", "Softmax",
    "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where", "Equal", "Less",
    "Greater", "Not", "And", "Neg", "Abs", "Exp", "Reciprocal", "ScatterND", "GatherElements", "Sigmoid",
})


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown --target {name!r}: use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def resolve_opset(target: Target, opset: int | None, fmt: str) -> int:
    """The opset to export at, or a one-line refusal naming what the target accepts."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    op = target.default_opset if opset is None else int(opset)
    lo, hi = target.opset_range()
    if not lo <= op <= hi:
        raise UserError(f"--opset {op} cannot be built by --target {target.name} ({target.runtime}): "
                        f"use --opset {lo}..{hi}" if lo != hi else
                        f"--opset {op} cannot be built by --target {target.name} ({target.runtime}): use --opset {hi}")
    return op


def check_model_fits(target: Target, opset: int, bits: dict, attn_unsigned_max: int) -> None:
    """Refuse quantizer settings the target cannot represent (before any tracing)."""
    if target.tensorrt and attn_unsigned_max > 127:
        raise UserError(f"the {bits.get('attn')}-bit unsigned softmax quantizer has bounds [0, {attn_unsigned_max}] "
                        f"which do not fit INT8, and {target.runtime} has no UINT8 Q/DQ: retrain with attn_bits <= 7 "
                        "or export --target ort")


def use_int4(target: Target, opset: int) -> bool:
    return target.int4 and opset >= 21
