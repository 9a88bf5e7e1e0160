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
#: TensorRT features -> (first release that has it, first release without it or None).
#: ``int4``: INT4 weight DequantizeLinear (weight-only; BuilderFlag.INT4 until 10.x);
#: ``strongly_typed``: NetworkDefinitionCreationFlag.STRONGLY_TYPED (the only mode from 11.0);
#: ``weak_typing``: the precision builder flags (FP16/INT8/INT4) and layer precision pins, removed in 11.0;
#: ``plugin_v3``: IPluginV3 (the V2 interfaces are deprecated from 10.0).
TRT_FEATURES = {"int4": ((10, 0), None), "strongly_typed": ((9, 1), None), "weak_typing": ((8, 0), (11, 0)),
                "plugin_v3": ((10, 0), None)}
#: x86 u8 x s8 GEMM without VNNI (VPMADDUBSW) sums each pair of adjacent products in saturating int16.
INT16_MAX = 32767
#: Lowest opset whose QuantizeLinear / DequantizeLinear take FP16 scales (typed FP16 Q/DQ).
MIN_TYPED_OPSET = 19
#: How a target's engine gets its precision: ``weak`` (builder flags, FP16 LayerNorm pinned FP32 by name),
#: ``strong`` (the graph's own types: FP16 tensors, FP32 LayerNorm/Softmax islands, Q/DQ).
TYPINGS = ("weak", "strong")
#: The plugin front-ends (runtime/cuda): V2 for TensorRT 8.x, V3 from 10.0 (TRT_FEATURES["plugin_v3"]).
PLUGIN_APIS = {"V2": "IPluginV2DynamicExt", "V3": "IPluginV3 (OneCore/OneBuild/OneRuntime)"}


def trt_has(feature, version):
    """Whether TensorRT ``version`` (a (major, minor, ...) tuple) has ``feature`` (TRT_FEATURES)."""
    first, gone = TRT_FEATURES[feature]
    v = tuple(version[:2])
    return v >= first and (gone is None or v < gone)


def feature_release(feature):
    """``"10.0"``: the first TensorRT release with ``feature``."""
    return "{}.{}".format(*TRT_FEATURES[feature][0])


class Target:
    """One row: a runtime (and, for Jetsons, its JetPack stack) and what it builds."""

    __slots__ = ("name", "runtime", "opsets", "default_opset", "int4", "uint8", "layernorm_op", "trt",
                 "plugin_api", "fast_int8", "boards", "l4t", "python", "docker_base", "jetpack", "cuda", "emitter",
                 "pair_sum_max")

    def __init__(self, name, runtime, opsets, default_opset, int4, uint8, layernorm_op, trt=None,
                 plugin_api=None, fast_int8=True, boards=(), l4t=None, python=None, docker_base=None,
                 jetpack=None, cuda=None, emitter=None, pair_sum_max=None):
        self.name, self.runtime = name, runtime
        self.opsets, self.default_opset = tuple(opsets), int(default_opset)  # (min, max) accepted
        self.int4 = bool(int4)  # INT4 weight DequantizeLinear (opset 21)
        self.uint8 = bool(uint8)  # UINT8 Q/DQ (an unsigned 8-bit softmax output)
        self.layernorm_op = bool(layernorm_op)  # may the graph contain LayerNormalization (opset 17)
        self.trt = trt  # ((major, minor) lowest, (major, minor) highest) TensorRT, or None
        # how QvitLowBitLinear runs: the plugin front-end the library registers for this TensorRT, or as given
        self.plugin_api = PLUGIN_APIS[self.plugin_front_end] if trt is not None else plugin_api
        self.fast_int8 = bool(fast_int8)  # GPU with fast INT8 (False: FP16 + low-bit weight plugins)
        self.boards = tuple(boards)  # lower-case substrings of /proc/device-tree/model
        self.l4t, self.python, self.docker_base = l4t, python, docker_base  # Jetson stack
        self.jetpack, self.cuda = jetpack, cuda  # "4.6", "10.2" (Jetson rows)
        #: which variant of each format's emitter writes this target's graphs: None = TensorRT's rules
        #: (zero-point 0, per-tensor INT8 activations, float Clip before Q); "ort" = what ONNX Runtime's
        #: CPU fusions want (UINT8 activations with their integer zero-points, per-axis Q)
        self.emitter = emitter
        #: the largest |a*b + a'*b'| of one pair of u8 x s8 products the runtime's integer MatMul keeps
        #: exact (ONNX Runtime on x86 without VNNI sums pairs in saturating int16: 32767); None = exact
        self.pair_sum_max = pair_sum_max

    @property
    def tensorrt(self):
        return self.trt is not None

    def has(self, feature):
        """Whether every TensorRT release of this row has ``feature`` (TRT_FEATURES); False without TensorRT."""
        return self.trt is not None and trt_has(feature, self.trt[0]) and trt_has(feature, self.trt[1])

    @property
    def typings(self):
        """The typings this row's TensorRT builds, preferred first (``()`` for ONNX Runtime: it runs either)."""
        if self.trt is None:
            return ()
        both = [t for t, f in (("weak", "weak_typing"), ("strong", "strongly_typed")) if self.has(f)]
        if not both:
            raise ValueError("target {}: no typing spans TensorRT {}".format(self.name, self.trt_range()))
        return tuple(both)

    def default_typing(self):
        """``strong`` where weak typing is gone (TensorRT 11), else ``weak`` (what 8.x and 10.x build by default)."""
        return self.typings[0] if self.typings else "weak"

    @property
    def plugin_front_end(self):
        """``V3`` / ``V2``: which plugin interface the plugin library registers for this row's TensorRT
        (runtime/cuda/qvit_trt_compat.h makes the same choice at compile time)."""
        if self.trt is None:
            return None
        return "V3" if trt_has("plugin_v3", self.trt[0]) else "V2"

    def trt_range(self):
        """``"8.6-10.3"`` / ``"8.2"`` / ``"-"``."""
        if self.trt is None:
            return "-"
        lo, hi = ("{}.{}".format(*v) for v in self.trt)
        return lo if lo == hi else "{}-{}".format(lo, hi)

    def __repr__(self):
        return "Target({!r})".format(self.name)


TARGETS = (
    Target("tx2", "TensorRT 8.2 (JetPack 4.6, TX2)", (13, 13), 13, int4=False, uint8=False, layernorm_op=False,
           trt=((8, 2), (8, 2)), fast_int8=False, boards=("tx2",), l4t="32", python="3.6",
           docker_base="nvcr.io/nvidia/l4t-base:r32.7.1", jetpack="4.6", cuda="10.2"),
    # TensorRT 8.5's parser has no LayerNormalization (onnx-tensorrt added it in 8.6): opset <= 16 decomposes it
    Target("orin-jp5", "TensorRT 8.5 (JetPack 5.1)", (13, 16), 16, int4=False, uint8=False, layernorm_op=False,
           trt=((8, 5), (8, 5)), boards=("orin",), l4t="35", python="3.8",
           docker_base="nvcr.io/nvidia/l4t-jetpack:r35.4.1", jetpack="5.1", cuda="11.4"),
    Target("orin-jp6", "TensorRT 10.3 (JetPack 6.1/6.2)", (13, 21), 17, int4=True, uint8=False, layernorm_op=True,
           trt=((10, 3), (10, 3)), boards=("orin",), l4t="36.4", python="3.10",
           docker_base="nvcr.io/nvidia/l4t-jetpack:r36.4.0", jetpack="6.1/6.2", cuda="12.6"),
    # Jetson Thor (Blackwell, sm_110), JetPack 7.0 = L4T r38.2, CUDA 13.0, Ubuntu 24.04.  JetPack 7 runs NVIDIA's
    # SBSA (arm64 server) containers; the NGC TensorRT 25.08 image carries TensorRT 10.13 and CUDA 13.0.
    Target("thor-jp7", "TensorRT 10.13 (JetPack 7.0, Thor)", (13, 21), 17, int4=True, uint8=False, layernorm_op=True,
           trt=((10, 13), (10, 13)), boards=("thor",), l4t="38.2", python="3.12",
           docker_base="nvcr.io/nvidia/tensorrt:25.08-py3", jetpack="7.0", cuda="13.0"),
    # JetPack 7.2.2+ on AGX Orin and Thor (TensorRT 11.4.1's support matrix).  Its L4T release and container
    # tag are not recorded here (unverified), so jetson.l4t does not map a board to it; the builder knows it
    # by its TensorRT version.
    Target("orin-jp7", "TensorRT 11 (JetPack 7.2, CUDA 13.2)", (19, 21), 21, int4=True, uint8=False,
           layernorm_op=True, trt=((11, 4), (11, 99)), boards=("orin", "thor"), python="3.12",
           jetpack="7.2", cuda="13.2"),
    Target("trt10", "TensorRT 10", (13, 21), 21, int4=True, uint8=False, layernorm_op=True,
           trt=((10, 0), (10, 99))),
    Target("trt11", "TensorRT 11", (19, 21), 21, int4=True, uint8=False, layernorm_op=True,
           trt=((11, 0), (11, 99))),
    Target("ort", "ONNX Runtime (CPU)", (13, 21), 17, int4=True, uint8=True, layernorm_op=True,
           plugin_api="ONNX function (reference body)", emitter="ort", pair_sum_max=INT16_MAX),
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


def resolve_typing(target, typing=None, opset=None):
    """The typing to export for ``target`` (``None``: its default), or a one-line refusal."""
    typ = target.default_typing() if typing in (None, "auto") else typing
    if typ not in TYPINGS:
        raise UserError("unknown --typing {!r}: use auto, {}".format(typing, ", ".join(TYPINGS)))
    if target.typings and typ not in target.typings:
        raise UserError("--target {} ({}) builds only {} typed networks: use --typing {} or another target".format(
            target.name, target.runtime, "/".join(target.typings), target.typings[0]))
    if typ == "strong" and opset is not None and int(opset) < MIN_TYPED_OPSET:
        raise UserError("a strongly typed (FP16) graph needs --opset {}+ for FP16 Q/DQ scales, got {}".format(
            MIN_TYPED_OPSET, opset))
    return typ


def int_matmul_exact(a_max, b_max, pair_sum_max):
    """Whether an integer MatMul with u8 activation codes in ``[0, a_max]`` and s8 codes with
    ``|b| <= b_max`` is exact on a runtime whose row says ``pair_sum_max`` (no int16 pair
    saturation; None: always exact).  A u8 x u8 MatMul is always exact (x86 widens both to int16
    and multiplies with VPMADDWD)."""
    return pair_sum_max is None or 2 * int(a_max) * int(b_max) <= int(pair_sum_max)


def for_trt_version(version):
    """The TensorRT rows whose version range covers ``version`` (possibly none)."""
    v = tuple(version[:2])
    return [t for t in TARGETS if t.trt and t.trt[0] <= v <= t.trt[1]]


def for_l4t(release):
    """The Jetson row of an L4T release (``"32.7.1"``, ``"36.4.3"`` or ``"32"``), or None.

    A row's ``l4t`` is a release prefix: ``"32"`` (every r32), ``"36.4"`` (JetPack 6.1/6.2 with TensorRT
    10.3; JetPack 6.0 = r36.2/36.3 ships TensorRT 8.6 and has no row of its own).  The longest match wins.
    """
    parts = str(release).split(".")
    best = None
    for t in TARGETS:
        if t.l4t and parts[:len(t.l4t.split("."))] == t.l4t.split("."):
            if best is None or len(t.l4t) > len(best.l4t):
                best = t
    return best


def for_board(board):
    """The first row whose board names occur in a device-tree model string, or None."""
    text = (board or "").lower()
    for t in TARGETS:
        if any(b in text for b in t.boards):
            return t
    return None


def markdown():
    """The table as markdown (``python -m export --list-targets``; the READMEs point here)."""
    rows = ["| target | runtime | opsets (default) | TensorRT | typing (default first) | LayerNormalization op | "
            "INT4 weights | UINT8 | fast INT8 | low-bit node runs as |", "|---" * 10 + "|"]
    for t in TARGETS:
        rows.append("| `{}` | {} | {}-{} ({}) | {} | {} | {} | {} | {} | {} | {} |".format(
            t.name, t.runtime, t.opsets[0], t.opsets[1], t.default_opset, t.trt_range(),
            ", ".join(t.typings) or "either", "yes" if t.layernorm_op else "no (decomposed)",
            "yes (opset 21, weight-only)" if t.int4 else "no (INT8 container)", "yes" if t.uint8 else "no",
            "yes" if t.fast_int8 else "no", t.plugin_api or "-"))
    return "\n".join(rows) + "\n"
