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

Mixed bits per output-row group (format version 2)
--------------------------------------------------
A weight may give each group of ``group_size`` consecutive output rows its own width
``group_bits[g]`` (e.g. the rows of one attention head in qkv).  Row ``n`` is then packed at
``b_n = group_bits[n // group_size]`` exactly as above, with ``packed_words(K, b_n)`` words,
and the rows are concatenated with no padding between them into one 1-D word array
(:func:`pack_rows` / :func:`unpack_rows`; the last group may be shorter).  A weight whose
groups all share one width is the version-1 ``[N, W]`` layout, bit for bit.

Groups along the *input* axis (e.g. the W_O columns that read head i, whose codes follow
head i's width) have no packed layout of their own: ``lowbit`` stores such a weight at its
widest group's width (lossless, every code fits), and ``qdq`` stores INT8 (or INT4 when every
group fits 4 bits) integers that are exact by construction.  Per-group activation bits
(q/k/v and the attention map per head) are per-group integer clip bounds in ``qdq``.

The record that says which tensor is quantized how -- kind, signedness, bits (scalar or per
group), group axis and size, scale(s), integer offsets -- is :class:`qformat.spec.TensorSpec`
(one quantizer) inside :class:`qformat.spec.SiteSpec` (one quantized place of the network).
"""

import math

import numpy as np

from .grid import (  # noqa: F401  (the package's names; grid holds the arithmetic)
    FORMATS,
    INT8_MAX,
    INT8_MIN,
    MAX_BITS,
    MIN_BITS,
    PACKED_BITS,
    TENSOR_KINDS,
    WORD_BITS,
    FormatError,
    check_bits,
    int_bounds,
    qrange,
    zero_point_range,
)

FORMAT_VERSION = 2
#: Sidecar / graph format versions this code reads (1: uniform bits only).
READABLE_FORMAT_VERSIONS = (1, 2)


def check_format_version(version, where="sidecar"):
    """Refuse a sidecar / graph written by a newer exporter (one clear line)."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise FormatError("{}: format_version {!r} is not an integer; re-export the model".format(
            where, version)) from None
    if v not in READABLE_FORMAT_VERSIONS:
        raise FormatError("{} has format_version {}, this code reads {}: {}".format(
            where, v, "/".join(str(r) for r in READABLE_FORMAT_VERSIONS),
            "update qvit-edge" if v > FORMAT_VERSION else "re-export the model"))
    return v


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


def row_bits(group_bits, group_size, n):
    """Bits of each of ``n`` rows: ``group_bits[r // group_size]`` (validated, int64 ``[n]``)."""
    gb = np.asarray(group_bits, dtype=np.int64).reshape(-1)
    gs = int(group_size)
    if gs < 1:
        raise FormatError("group_size must be >= 1, got {}".format(group_size))
    groups = -(-int(n) // gs)
    if gb.size != groups:
        raise FormatError("{} rows in groups of {} need {} group bit-widths, got {}".format(n, gs, groups, gb.size))
    for b in gb:
        values_per_word(int(b))
    return gb[np.arange(int(n)) // gs]


def _row_offsets(bits_per_row, k):
    words = np.array([packed_words(k, int(b)) for b in bits_per_row], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(words)]).astype(np.int64), words


def pack_rows(q, bits_per_row):
    """Pack ``q[N, K]`` with row ``n`` at ``bits_per_row[n]`` bits: 1-D ``uint32`` rows, concatenated."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise FormatError("pack_rows expects a 2-D [N, K] matrix, got shape {}".format(q.shape))
    rb = np.asarray(bits_per_row, dtype=np.int64).reshape(-1)
    if rb.size != q.shape[0]:
        raise FormatError("{} row bit-widths for {} rows".format(rb.size, q.shape[0]))
    offsets, words = _row_offsets(rb, q.shape[1])
    out = np.zeros(int(offsets[-1]), dtype=np.uint32)
    for b in np.unique(rb):
        rows = np.nonzero(rb == b)[0]
        packed = pack(q[rows], int(b))
        idx = offsets[rows][:, None] + np.arange(packed.shape[1])[None, :]
        out[idx] = packed
    return out


def unpack_rows(words, bits_per_row, k):
    """Inverse of :func:`pack_rows`: 1-D words -> int8 codes ``[N, k]``."""
    w = np.asarray(words).reshape(-1).view(np.uint32) if np.asarray(words).dtype == np.int32 else \
        np.asarray(words, dtype=np.uint32).reshape(-1)
    rb = np.asarray(bits_per_row, dtype=np.int64).reshape(-1)
    offsets, nwords = _row_offsets(rb, k)
    if w.size != int(offsets[-1]):
        raise FormatError("{} words cannot hold {} rows of K={} at widths {}".format(
            w.size, rb.size, k, sorted(set(int(b) for b in rb))))
    out = np.zeros((rb.size, int(k)), dtype=np.int8)
    for b in np.unique(rb):
        rows = np.nonzero(rb == b)[0]
        idx = offsets[rows][:, None] + np.arange(int(nwords[rows[0]]))[None, :]
        out[rows] = unpack(w[idx], int(b), k)
    return out


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
#: A node with one weight width carries the first twelve (the version-1 node, unchanged); a
#: node with mixed widths per output-row group also carries the last two.
LOWBIT_ATTRS = (
    "bits",           # int: weight bits, one of PACKED_BITS (mixed node: max(group_bits))
    "in_features",    # int: K
    "out_features",   # int: N
    "weight_packed",  # tensor int32 [N, packed_words(K, bits)] (uint32 words, bit-cast); mixed: 1-D pack_rows
    "weight_scale",   # tensor float32 [N]
    "bias",           # tensor float32 [N] (zeros when the Linear has none)
    "act_scale",      # float: per-tensor input scale
    "act_lo",         # int: input integer lower bound
    "act_hi",         # int: input integer upper bound
    "act_bits",       # int: input bits
    "plugin_version",
    "plugin_namespace",
    "group_size",     # int: output rows per group (mixed nodes only; the last group may be shorter)
    "group_bits",     # tensor int32 [ceil(N / group_size)]: each group's width, in PACKED_BITS (mixed only)
)
#: The attributes only a mixed-width node carries (the tail of LOWBIT_ATTRS).
LOWBIT_GROUP_ATTRS = ("group_size", "group_bits")


def lowbit_layout(site):
    """How a linear :class:`~qformat.spec.SiteSpec` packs: ``(bits, group_size, group_bits)``.

    ``group_size``/``group_bits`` are None for one width (input-axis groups are stored at the
    widest group's width, lossless).  Raises :class:`FormatError` naming why a site cannot be
    a ``QvitLowBitLinear`` (a width outside PACKED_BITS, a per-channel input scale).
    """
    w, a = site.weight, site.input
    if site.op != "linear" or w is None:
        raise FormatError("{}: only Linear layers have a packed low-bit form".format(site.name))
    if a.scale.size != 1 or a.mixed:
        raise FormatError("{}: the low-bit node takes one per-tensor input scale and width".format(site.name))
    row_axis = -site.weight_int.ndim
    if w.mixed and w.group_axis == row_axis:
        bad = sorted(set(b for b in w.bits if b not in PACKED_BITS))
        if bad:
            raise FormatError("{}: row-group widths {} have no packed layout".format(site.name, bad))
        return max(w.bits), w.group_size, tuple(w.bits)
    if w.max_bits not in PACKED_BITS:
        raise FormatError("{}: {}-bit weights have no packed layout".format(site.name, w.max_bits))
    return w.max_bits, None, None


def lowbit_attrs(site):
    """The ``QvitLowBitLinear`` attributes of a linear :class:`~qformat.spec.SiteSpec`, in
    :data:`LOWBIT_ATTRS` order (numpy values).

    The one builder for the exporter (ONNX attributes), the PyTorch CUDA extension (kernel
    arguments) and the plugin's fields, so the node and the kernels cannot drift apart.
    """
    bits, group_size, group_bits = lowbit_layout(site)
    q = np.asarray(site.weight_int)
    n, k = q.shape
    a = site.input
    lo, hi = (int(v) for v in a.bounds())
    if hi - lo != (1 << a.bits) - 1 or lo < INT8_MIN or hi > INT8_MAX:
        raise FormatError("{}: input bounds [{}, {}] are not a {}-bit INT8 range".format(site.name, lo, hi, a.bits))
    if group_bits is None:
        packed = pack(q, bits).view(np.int32)
    else:
        packed = pack_rows(q, row_bits(group_bits, group_size, n)).view(np.int32)
    attrs = [
        ("bits", int(bits)), ("in_features", int(k)), ("out_features", int(n)), ("weight_packed", packed),
        ("weight_scale", np.asarray(site.weight.scale, np.float32).reshape(n)),
        ("bias", np.zeros(n, np.float32) if site.bias is None else np.asarray(site.bias, np.float32).reshape(n)),
        ("act_scale", float(np.float32(a.scale.reshape(())))), ("act_lo", lo), ("act_hi", hi),
        ("act_bits", int(a.bits)),
        ("plugin_version", LOWBIT_PLUGIN_VERSION), ("plugin_namespace", LOWBIT_PLUGIN_NAMESPACE),
    ]
    if group_bits is not None:
        attrs += [("group_size", int(group_size)), ("group_bits", np.asarray(group_bits, np.int32))]
    assert tuple(name for name, _ in attrs) == LOWBIT_ATTRS[:len(attrs)]
    return dict(attrs)


def lowbit_weight_codes(weight_packed, bits, k, n, group_size=None, group_bits=None):
    """Signed codes ``[n, k]`` of a node's ``weight_packed`` in either layout."""
    words = np.asarray(weight_packed)
    words = words.view(np.uint32) if words.dtype == np.int32 else words.astype(np.uint32)
    if group_bits is None:
        return unpack(words.reshape(int(n), -1), bits, k)
    return unpack_rows(words, row_bits(group_bits, group_size, n), k)


def lowbit_linear_reference(x, weight_packed, weight_scale, bias, bits, act_scale, act_lo, act_hi,
                            group_size=None, group_bits=None):
    """numpy reference of ``QvitLowBitLinear`` in both layouts (float64 accumulate; tests and kernels
    check against it).  ``group_size``/``group_bits`` given: the mixed-width layout."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    n = np.asarray(weight_scale).size
    q = lowbit_weight_codes(weight_packed, bits, k, n, group_size, group_bits).astype(np.float64)
    xq = np.clip(round_half_even(x / np.float32(act_scale)), act_lo, act_hi).astype(np.float64)
    acc = xq.reshape(-1, k) @ q.T
    y = acc * (float(act_scale) * np.asarray(weight_scale, dtype=np.float64)) + np.asarray(bias, np.float64)
    return y.reshape(x.shape[:-1] + (q.shape[0],)).astype(np.float32)


def lowbit_reference(x, attrs):
    """:func:`lowbit_linear_reference` of a node given as its attribute dict (:func:`lowbit_attrs`)."""
    return lowbit_linear_reference(x, attrs["weight_packed"], attrs["weight_scale"], attrs["bias"], attrs["bits"],
                                   attrs["act_scale"], attrs["act_lo"], attrs["act_hi"], attrs.get("group_size"),
                                   attrs.get("group_bits"))


# ------------------------------------------------------------------- the sidecar schema
#
# Every exported ONNX ``<stem>.onnx`` has ``<stem>.json`` beside it (qformat.io.sidecar_path)
# with at least these keys; the runtime (builder, bench, demo) reads only these.
SIDECAR_KEYS = (
    "format_version",   # FORMAT_VERSION
    "model",            # registry name, e.g. "deit_s"
    "format",           # one of FORMATS
    "target",           # a row of qformat.targets.TARGETS
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

from .spec import SiteSpec, TensorSpec  # noqa: E402,F401  (the record lives in its own module)
