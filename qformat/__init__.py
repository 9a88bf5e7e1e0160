"""The quantized-format contract: the one place that says what a low-bit tensor means.

Every stage imports this module -- training (fake-quant), export (ONNX Q/DQ and packed
custom ops), the runtime (TensorRT plugin weights, ONNX Runtime reference) and the CUDA
kernels' host-side tests -- so that the bit layout, the integer ranges, the rounding and
the scale / zero-point conventions are derived exactly once.

It depends on numpy only and stays Python 3.6-compatible, because the runtime imports it
on JetPack 4.6 (TX2: TensorRT 8.2 bindings for Python 3.6, no torch).

Conventions (``b`` = bits, 2..8)
--------------------------------
Weights -- symmetric, per output channel, zero-point 0 (what TensorRT requires)::

    q[n, k] = clip(round_half_even(w[n, k] / s[n]), -2^(b-1), 2^(b-1) - 1)
    w_hat   = s[n] * q[n, k]

Activations -- asymmetric (LSQ+) with a learned *integer* zero-point ``z``::

    q     = clip(round_half_even(x / s) + z, qmin, qmax)
    x_hat = s * (q - z)
          = s * clip(round_half_even(x / s), qmin - z, qmax - z)     (z is an integer)

``signed`` tensors use ``qmin, qmax = -2^(b-1), 2^(b-1) - 1``; ``unsigned`` tensors
(the softmax output, always >= 0) use ``0, 2^b - 1`` and ``z = 0``.  Because ``z`` is an
integer, an asymmetric quantizer is *exactly* a zero-point-0 quantizer whose integer
clip bounds are shifted to ``[lo, hi] = [qmin - z, qmax - z]``.  That is how the exporter
writes LSQ+ offsets for TensorRT (which needs zero-point 0): a float ``Clip(lo*s, hi*s)``
in front of a zero-point-0 INT8 QuantizeLinear.  ``z`` is therefore limited so that
``[lo, hi]`` fits in INT8: see :func:`zero_point_range`.  The one exception is an *unsigned
8-bit* tensor (``[0, 255]``): it needs UINT8, which ONNX Runtime runs and TensorRT does not,
so TensorRT-bound models keep the softmax output at 7 bits or fewer.

Rounding is round-half-to-even everywhere (``torch.round``, ``numpy.rint``, ONNX
QuantizeLinear, TensorRT), so a trained model and its exported graph agree bit for bit.

Packed weights (the ``lowbit`` export format, the plugin and the CUDA kernels)
------------------------------------------------------------------------------
A ``[N, K]`` int weight matrix (row n = output channel) is stored as ``uint32`` words
``[N, ceil(K / per_word)]`` with ``per_word = 32 // b`` values per word
(2-bit: 16, 3-bit: 10 with the top 2 bits zero, 4-bit: 8)::

    word bit  31 .............................................. 0
    2-bit     | k+15 | k+14 | ... | k+2 | k+1 | k+0 |          (16 x 2 bits)
    3-bit     |00| k+9 | k+8 | ... | k+1 | k+0 |                (10 x 3 bits, 2 spare)
    4-bit     | k+7 | k+6 | ... | k+1 | k+0 |                    (8 x 4 bits)

Element ``k`` of row ``n`` lives in word ``k // per_word`` at bit offset
``b * (k % per_word)``.  Codes are offset-binary: ``code = q + 2^(b-1)`` (so a kernel
unpacks with one shift, one mask and one subtract).  Padding past ``K`` holds the code of
``q = 0`` so a kernel that reads a whole word multiplies the tail by zero.
Words are little-endian in memory (the byte order of every target: x86, ARM, NVIDIA).
"""

import math

import numpy as np

FORMAT_VERSION = 1
MIN_BITS = 2
MAX_BITS = 8
PACKED_BITS = (2, 3, 4)  # bit-widths with a packed layout (plugins / kernels)
WORD_BITS = 32

#: Tensor kinds a quantizer can belong to; bit-widths are configured per kind.
TENSOR_KINDS = ("weight", "act", "qkv", "attn")


class FormatError(ValueError):
    """A value that breaks the format contract (bits, ranges, shapes)."""


def check_bits(bits, what="bits"):
    # type: (int, str) -> int
    """Return ``bits`` as int or raise naming the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise FormatError("{} must be an integer in {}..{}, got {!r}".format(
            what, MIN_BITS, MAX_BITS, bits))
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise FormatError("{}={} is not supported: use {}..{} bits".format(
            what, bits, MIN_BITS, MAX_BITS))
    return int(bits)


def qrange(bits, signed=True):
    # type: (int, bool) -> tuple
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide signed or unsigned code."""
    b = check_bits(bits)
    if signed:
        return -(1 << (b - 1)), (1 << (b - 1)) - 1
    return 0, (1 << b) - 1


def zero_point_range(bits, signed=True):
    # type: (int, bool) -> tuple
    """Allowed integer zero-points so that ``[qmin - z, qmax - z]`` fits in INT8.

    Unsigned codes keep ``z = 0`` (their range already starts at the tensor's zero).
    """
    qmin, qmax = qrange(bits, signed)
    if not signed:
        return 0, 0
    return qmax - 127, qmin + 128


def int_bounds(bits, signed=True, zero_point=0):
    # type: (int, bool, int) -> tuple
    """Zero-point-0 integer clip bounds ``[lo, hi]`` equivalent to ``(bits, signed, z)``."""
    qmin, qmax = qrange(bits, signed)
    zlo, zhi = zero_point_range(bits, signed)
    z = int(zero_point)
    if not zlo <= z <= zhi:
        raise FormatError("zero-point {} outside [{}, {}] for {}-bit {}".format(
            z, zlo, zhi, bits, "signed" if signed else "unsigned"))
    return qmin - z, qmax - z


def round_half_even(x):
    """Round-half-to-even, the one rounding mode of the pipeline (numpy)."""
    return np.rint(x)


def quantize_weight(w, scale, bits):
    """Per-output-channel symmetric integer codes of ``w[N, ...]`` (int8 array)."""
    w = np.asarray(w, dtype=np.float32)  # float32 division, as in training and in ONNX/TensorRT
    s = np.asarray(scale, dtype=np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    qmin, qmax = qrange(bits, signed=True)
    return np.clip(round_half_even(w / s), qmin, qmax).astype(np.int8)


def dequantize_weight(q, scale):
    """``s[n] * q[n, ...]`` as float32."""
    q = np.asarray(q)
    s = np.asarray(scale, dtype=np.float32).reshape((-1,) + (1,) * (q.ndim - 1))
    return q.astype(np.float32) * s


def fake_quant_act(x, scale, bits, signed=True, zero_point=0):
    """Reference activation fake-quant (float32 in, float32 out), broadcasting ``scale``/``zero_point``."""
    x = np.asarray(x, dtype=np.float32)
    qmin, qmax = qrange(bits, signed)
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.float32)
    q = np.clip(round_half_even(x / s) + z, qmin, qmax)
    return ((q - z) * s).astype(np.float32)


# ----------------------------------------------------------------------------- packing

def values_per_word(bits):
    # type: (int) -> int
    """How many ``bits``-wide codes one 32-bit word holds (2:16, 3:10, 4:8)."""
    b = check_bits(bits)
    if b not in PACKED_BITS:
        raise FormatError("packed weights exist for {} bits, not {}".format(
            "/".join(str(p) for p in PACKED_BITS), b))
    return WORD_BITS // b


def packed_words(k, bits):
    # type: (int, int) -> int
    """Words per row for ``k`` values."""
    return int(math.ceil(k / float(values_per_word(bits))))


def pack(q, bits):
    """Pack signed integer codes ``q[N, K]`` into ``uint32[N, ceil(K / per_word)]``."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise FormatError("pack expects a 2-D [N, K] matrix, got shape {}".format(q.shape))
    per = values_per_word(bits)
    qmin, qmax = qrange(bits, signed=True)
    if q.size and (q.min() < qmin or q.max() > qmax):
        raise FormatError("values outside the {}-bit range [{}, {}]".format(bits, qmin, qmax))
    n, k = q.shape
    words = packed_words(k, bits)
    codes = np.full((n, words * per), -qmin, dtype=np.uint32)  # padding = code of q = 0
    codes[:, :k] = (q.astype(np.int64) - qmin).astype(np.uint32)
    codes = codes.reshape(n, words, per)
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits)).astype(np.uint32)
    return np.bitwise_or.reduce(codes << shifts, axis=2).astype(np.uint32)


def unpack(packed, bits, k):
    """Inverse of :func:`pack`: ``uint32[N, W]`` -> int8 codes ``[N, k]``."""
    packed = np.asarray(packed, dtype=np.uint32)
    if packed.ndim != 2:
        raise FormatError("unpack expects a 2-D [N, W] word matrix")
    per = values_per_word(bits)
    if packed.shape[1] != packed_words(k, bits):
        raise FormatError("{} words per row cannot hold K={} at {} bits".format(
            packed.shape[1], k, bits))
    qmin, _ = qrange(bits, signed=True)
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits)).astype(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    codes = (packed[:, :, None] >> shifts) & mask
    codes = codes.reshape(packed.shape[0], -1)[:, :k]
    return (codes.astype(np.int16) + qmin).astype(np.int8)


# ------------------------------------------------------------ the low-bit Linear custom op
#
# One node per quantized Linear in the ``lowbit`` ONNX format; the TensorRT plugin
# (runtime/cuda) registers under exactly these names, and ONNX Runtime runs the same
# node through a model-local function of standard ops.  Semantics (X float [..., K])::
#
#     xq  = clip(round_half_even(X / act_scale), act_lo, act_hi)          # integers
#     acc = xq @ unpack(weight_packed, bits, K).T                          # exact int32
#     Y   = acc * (act_scale * weight_scale[n]) + bias[n]                  # float [..., N]
#
# ``act_lo``/``act_hi`` are the zero-point-0 bounds from :func:`int_bounds` (LSQ+ offset
# folded in); ``act_bits`` only documents the width (``act_hi - act_lo = 2^act_bits - 1``).
# The input scale is per-tensor: an integer GEMM cannot apply per-input-channel scales, so
# models trained with per-channel Linear inputs (granularity "paper") export as ``qdq`` only.

LOWBIT_OP = "QvitLowBitLinear"
LOWBIT_DOMAIN = "qvit.edge"
LOWBIT_OPSET = 1
LOWBIT_PLUGIN_VERSION = "1"
LOWBIT_PLUGIN_NAMESPACE = ""
#: Attribute names of the node (ints, floats, tensors) -- the plugin's PluginField names.
LOWBIT_ATTRS = (
    "bits",           # int: weight bits, one of PACKED_BITS
    "in_features",    # int: K
    "out_features",   # int: N
    "weight_packed",  # tensor int32 [N, packed_words(K, bits)] (uint32 words, bit-cast)
    "weight_scale",   # tensor float32 [N]
    "bias",           # tensor float32 [N] (zeros when the Linear has none)
    "act_scale",      # float: per-tensor input scale
    "act_lo",         # int: input integer lower bound
    "act_hi",         # int: input integer upper bound
    "act_bits",       # int: input bits
    "plugin_version",
    "plugin_namespace",
    "group_size",     # int: rows per weight-bit group (mixed-width nodes only, format version 2)
    "group_bits",     # tensor int32 [ceil(N / group_size)]: each group's bits (mixed-width nodes only)
)
#: Attributes only mixed-width nodes carry.
LOWBIT_GROUP_ATTRS = ("group_size", "group_bits")


def lowbit_attrs(weight_int, weight_scale, bias, bits, act_scale, act_lo, act_hi, act_bits):
    """The ``QvitLowBitLinear`` attributes, in :data:`LOWBIT_ATTRS` order (numpy values).

    One builder for the exporter (ONNX attributes) and the PyTorch CUDA extension (kernel
    arguments), so the node and the kernels cannot drift apart.
    """
    q = np.asarray(weight_int)
    if q.ndim != 2:
        raise FormatError("weight_int must be [N, K], got shape {}".format(q.shape))
    n, k = q.shape
    lo, hi = int(act_lo), int(act_hi)
    if hi - lo != (1 << check_bits(act_bits, "act_bits")) - 1 or lo < -128 or hi > 127:
        raise FormatError("input bounds [{}, {}] are not a {}-bit INT8 range".format(lo, hi, act_bits))
    attrs = (
        ("bits", int(bits)), ("in_features", int(k)), ("out_features", int(n)),
        ("weight_packed", pack(q, bits).view(np.int32)),
        ("weight_scale", np.asarray(weight_scale, np.float32).reshape(n)),
        ("bias", np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(n)),
        ("act_scale", float(np.float32(act_scale))), ("act_lo", lo), ("act_hi", hi), ("act_bits", int(act_bits)),
        ("plugin_version", LOWBIT_PLUGIN_VERSION), ("plugin_namespace", LOWBIT_PLUGIN_NAMESPACE),
    )
    assert tuple(a for a, _ in attrs) + LOWBIT_GROUP_ATTRS == LOWBIT_ATTRS
    return dict(attrs)


def lowbit_linear_reference(x, weight_packed, weight_scale, bias, bits, act_scale, act_lo, act_hi):
    """numpy reference of ``QvitLowBitLinear`` (float64 accumulate; tests and kernels check against it)."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    q = unpack(np.asarray(weight_packed).view(np.uint32), bits, k).astype(np.float64)
    xq = np.clip(round_half_even(x / np.float32(act_scale)), act_lo, act_hi).astype(np.float64)
    acc = xq.reshape(-1, k) @ q.T
    y = acc * (float(act_scale) * np.asarray(weight_scale, dtype=np.float64)) + np.asarray(bias, np.float64)
    return y.reshape(x.shape[:-1] + (q.shape[0],)).astype(np.float32)


# ------------------------------------------------------------------- the sidecar schema
#
# Every exported ONNX ``<stem>.onnx`` has ``<stem>.json`` beside it (qformat.io.sidecar_path)
# with at least these keys; the runtime (builder, bench, demo) reads only these.
SIDECAR_KEYS = (
    "format_version",   # FORMAT_VERSION
    "model",            # registry name, e.g. "deit_s"
    "format",           # "qdq" | "lowbit" | "fp32"
    "target",           # "tx2" | "orin-jp5" | "orin-jp6" | "trt10" | "ort"
    "opset",            # int
    "bits",             # {"weight": b, "act": b, "qkv": b, "attn": b, "embed": b, "head": b}
    "input_size",       # [C, H, W]
    "mean",             # per-channel list, applied to pixels scaled to [0, 1]
    "std",
    "class_names",      # list of str
    "input_name",       # ONNX graph input name
    "output_name",      # ONNX graph output name (logits)
    "metrics",          # dict copied from the checkpoint (may be empty)
    "exporter_revision",  # git revision or "unknown"
)
