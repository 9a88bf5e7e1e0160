"""Bit-widths, integer grids and zero-point limits: the arithmetic every other part of the contract
builds on (see the package docstring for the conventions).  numpy only, Python 3.6-compatible.
"""

import numpy as np

MIN_BITS = 2
MAX_BITS = 8
PACKED_BITS = (2, 3, 4)  # bit-widths with a packed layout (plugins / kernels)
#: The integer container of every activation code TensorRT runs (zero-point-0 INT8); wider codes need UINT8.
INT8_MIN, INT8_MAX = -128, 127
WORD_BITS = 32

#: Tensor kinds a quantizer can belong to: layer weights, layer inputs, attention q/k/v, the
#: attention map (softmax output).  Default bit-widths are configured per kind.
TENSOR_KINDS = ("weight", "act", "qkv", "attn")
#: The ONNX export formats (the sidecar's ``format``); export has one emitter per format.
FORMATS = ("qdq", "lowbit", "fp32")


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
    return qmax - INT8_MAX, qmin - INT8_MIN


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
