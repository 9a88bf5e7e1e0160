"""The one target table: what each deployment target's runtime can build.

The exporter (opset, IR version, INT4, UINT8, LayerNormalization), the engine builder's
capability gates (TensorRT version range, INT4, strongly typed networks, plugin API) and
``jetson/`` (L4T release -> TensorRT, Python, container base; which format a board wants)
all read this module; nothing else states these facts.  Adding a target is one row here
plus its tests.  Python 3.6-compatible (the builder and jetson/ run on JetPack 4.6).
"""

from .errors import UserError

#: Lowest opset with per-axis QuantizeLinear / DequantizeLinear (weights are per channel).
MIN_OPSET = 13
#: ONNX IR version per opset: the lowest that carries it (ONNX Runtime and TensorRT's parser read it).
OPSET_IR_VERSION = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
#: TensorRT features -> first release that has them.  ``int4``: INT4 weight DQ and BuilderFlag.INT4;
#: ``strongly_typed``: NetworkDefinitionCreationFlag.STRONGLY_TYPED.
TRT_FEATURES = {"int4": (10, 0), "strongly_typed": (9, 1)}


class Target:
    """One row: a runtime (and, for Jetsons, its JetPack stack) and what it builds."""

    __slots__ = ("name", "runtime", "opsets", "default_opset", "int4", "uint8", "layernorm_op", "trt",
                 "plugin_api", "fast_int8", "boards", "l4t", "python", "docker_base")

    def __init__(self, name, runtime, opsets, default_opset, int4, uint8, layernorm_op, trt=None,
                 plugin_api=None, fast_int8=True, boards=(), l4t=None, python=None, docker_base=None):
        self.name, self.runtime = name, runtime
        self.opsets, self.default_opset = tuple(opsets), int(default_opset)  # (min, max) accepted
        self.int4 = bool(int4)  # INT4 weight DequantizeLinear (opset 21)
        self.uint8 = bool(uint8)  # UINT8 Q/DQ (an unsigned 8-bit softmax output)
        self.layernorm_op = bool(layernorm_op)  # may the graph contain LayerNormalization (opset 17)
        self.trt = trt  # ((major, minor) lowest, (major, minor) highest) TensorRT, or None
        self.plugin_api = plugin_api  # how QvitLowBitLinear runs: a TensorRT plugin interface, or None
        self.fast_int8 = bool(fast_int8)  # GPU with fast INT8 (False: FP16 + low-bit weight plugins)
        self.boards = tuple(boards)  # lower-case substrings of /proc/device-tree/model
        self.l4t, self.python, self.docker_base = l4t, python, docker_base  # Jetson stack

    @property
    def tensorrt(self):
        return self.trt is not None

    def trt_range(self):
        """``"8.6-10.3"`` / ``"8.2"`` / ``"-"``."""
        if self.trt is None:
            return "-"
        lo, hi = ("{}.{}".format(*v) for v in self.trt)
        return lo if lo == hi else "{}-{}".format(lo, hi)

    def __repr__(self):
        return "Target({!r})".format(self.name)


_V2 = "IPluginV2DynamicExt"
TARGETS = (
    Target("tx2", "TensorRT 8.2 (JetPack 4.6, TX2)", (13, 13), 13, int4=False, uint8=False, layernorm_op=False,
           trt=((8, 2), (8, 2)), plugin_api=_V2, fast_int8=False, boards=("tx2",), l4t="32", python="3.6",
           docker_base="nvcr.io/nvidia/l4t-base:r32.7.1"),
    Target("orin-jp5", "TensorRT 8.5 (JetPack 5)", (13, 17), 17, int4=False, uint8=False, layernorm_op=True,
           trt=((8, 5), (8, 5)), plugin_api=_V2, boards=("orin",), l4t="35", python="3.8",
           docker_base="nvcr.io/nvidia/l4t-jetpack:r35.4.1"),
    Target("orin-jp6", "TensorRT 8.6-10.3 (JetPack 6)", (13, 17), 17, int4=False, uint8=False, layernorm_op=True,
           trt=((8, 6), (10, 3)), plugin_api=_V2, boards=("orin",), l4t="36", python="3.10",
           docker_base="nvcr.io/nvidia/l4t-jetpack:r36.3.0"),
    Target("trt10", "TensorRT 10", (13, 21), 21, int4=True, uint8=False, layernorm_op=True,
           trt=((10, 0), (10, 99)), plugin_api=_V2),
    Target("ort", "ONNX Runtime (CPU)", (13, 21), 17, int4=True, uint8=True, layernorm_op=True,
           plugin_api="ONNX function (reference body)"),
)
_BY_NAME = dict((t.name, t) for t in TARGETS)
TARGET_NAMES = tuple(t.name for t in TARGETS)
#: Oldest TensorRT any target builds with.
TRT_MIN = min(t.trt[0] for t in TARGETS if t.trt)


def get_target(name):
    """The row called ``name``, or a one-line refusal listing the rows."""
    if name not in _BY_NAME:
        raise UserError("unknown --target {!r}: use one of {}".format(name, ", ".join(TARGET_NAMES)))
    return _BY_NAME[name]


def resolve_opset(target, opset=None):
    """The opset to export at for ``target``, or a one-line refusal naming what it accepts."""
    op = target.default_opset if opset is None else int(opset)
    lo, hi = target.opsets
    if not lo <= op <= hi:
        use = "--opset {}..{}".format(lo, hi) if lo != hi else "--opset {}".format(hi)
        raise UserError("--opset {} cannot be built by --target {} ({}): use {}".format(
            op, target.name, target.runtime, use))
    return op


def ir_version(opset):
    return OPSET_IR_VERSION[int(opset)]


def use_int4(target, opset):
    """INT4 weight storage for 4-bit (or narrower) weights at this target and opset."""
    return target.int4 and int(opset) >= 21


def trt_has(feature, version):
    """Whether TensorRT ``version`` (a (major, minor, ...) tuple) has ``feature`` (TRT_FEATURES)."""
    return tuple(version[:2]) >= TRT_FEATURES[feature]


def for_trt_version(version):
    """The TensorRT rows whose version range covers ``version`` (possibly none)."""
    v = tuple(version[:2])
    return [t for t in TARGETS if t.trt and t.trt[0] <= v <= t.trt[1]]


def for_l4t(release):
    """The Jetson row of an L4T release (``"32.7.1"`` or ``"32"``), or None."""
    major = str(release).split(".")[0]
    for t in TARGETS:
        if t.l4t == major:
            return t
    return None


def for_board(board):
    """The first row whose board names occur in a device-tree model string, or None."""
    text = (board or "").lower()
    for t in TARGETS:
        if any(b in text for b in t.boards):
            return t
    return None


def markdown():
    """The table as markdown (``python -m export --list-targets``; the READMEs point here)."""
    rows = ["| target | runtime | opsets (default) | TensorRT | LayerNormalization op | INT4 weights | "
            "UINT8 | fast INT8 | low-bit node runs as |", "|---" * 9 + "|"]
    for t in TARGETS:
        rows.append("| `{}` | {} | {}-{} ({}) | {} | {} | {} | {} | {} | {} |".format(
            t.name, t.runtime, t.opsets[0], t.opsets[1], t.default_opset, t.trt_range(),
            "yes" if t.layernorm_op else "no (decomposed)", "yes (opset 21)" if t.int4 else "no (INT8 container)",
            "yes" if t.uint8 else "no", "yes" if t.fast_int8 else "no", t.plugin_api or "-"))
    return "\n".join(rows) + "\n"
