"""The spec record: how each quantized place of a network is quantized, as plain numpy data.

``train``'s ``convert`` produces one :class:`SiteSpec` per quantized site; the exporter (every
format), its parity check, :func:`qformat.lowbit_attrs`, the PyTorch CUDA extension and the
TensorRT plugin's attributes all read these records and nothing else about the quantizers.

A :class:`TensorSpec` describes one quantizer::

    kind        one of TENSOR_KINDS: "weight", "act" (layer input), "qkv", "attn" (softmax out)
    signed      signed grid [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b - 1]
    bits        an int, or one int per group of ``group_size`` indices along ``group_axis``
    scale       float32, () per tensor or [S] along ``scale_axis``
    zero_point  integers like ``scale`` (LSQ+ offsets, 0 for weights and unsigned tensors)

Axes count from the end of the tensor (-1 = last), so one record serves every rank the
tensor takes: weights ``[N, K]``: rows (output channels) -2, columns -1; conv weights
``[O, C, kh, kw]``: -4; q/k/v and the attention map ``[B, H, N, d]``: heads -3; layer
inputs ``[..., C]``: channels -1.  The quantizer is exactly::

    x_hat = s * clip(round_half_even(x / s), lo, hi)      [lo, hi] = [qmin(b) - z, qmax(b) - z]

with ``s``, ``z`` and ``b`` broadcast along their axes (:meth:`TensorSpec.scale_view`,
:meth:`TensorSpec.bounds`).  Bits per group need a per-group (or finer) scale along the same
axis, except for weights, whose integer codes are frozen: their groups may run along the
input axis while the scale is per output row.

Python 3.6-compatible, numpy only (the runtime reads sidecars on JetPack 4.6).
"""

import numpy as np

from .grid import INT8_MAX, TENSOR_KINDS, FormatError, check_bits, qrange, zero_point_range


def _axis_view(a, axis):
    """A 1-D array laid along tensor axis ``axis`` (negative) as a broadcastable view."""
    a = np.asarray(a)
    if axis is None or a.ndim == 0:
        return a.reshape(())
    return a.reshape((-1,) + (1,) * (-int(axis) - 1))


def _check_axis(axis, what):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or int(axis) >= 0:
        raise FormatError("{} must be a negative axis (counted from the end), got {!r}".format(what, axis))
    return int(axis)


def normalise_bits(bits, group_axis, group_size):
    """``(bits, group_axis, group_size)``: one width collapses to an int with no groups."""
    if isinstance(bits, (list, tuple, np.ndarray)):
        widths = tuple(check_bits(int(b), "bits") for b in np.asarray(bits).reshape(-1))
        if not widths:
            raise FormatError("bits per group must not be empty")
        if len(set(widths)) > 1:
            group_axis = _check_axis(group_axis, "group_axis")
            if group_axis is None or group_size is None or int(group_size) < 1:
                raise FormatError("bits per group need a group_axis and a group_size >= 1")
            return widths, group_axis, int(group_size)
        bits = widths[0]
    return check_bits(bits), None, None


class TensorSpec:
    """One frozen quantizer: kind, signedness, bits (scalar or per group), scale(s), integer offsets."""

    __slots__ = ("kind", "signed", "bits", "group_axis", "group_size", "scale", "scale_axis", "zero_point")

    def __init__(self, kind, signed, bits, scale, scale_axis=None, zero_point=0, group_axis=None, group_size=None):
        if kind not in TENSOR_KINDS:
            raise FormatError("kind {!r} is not one of {}".format(kind, ", ".join(TENSOR_KINDS)))
        self.kind, self.signed = kind, bool(signed)
        self.bits, self.group_axis, self.group_size = normalise_bits(bits, group_axis, group_size)
        self.scale_axis = _check_axis(scale_axis, "scale_axis")
        s = np.asarray(scale, dtype=np.float32)
        self.scale = s.reshape(()) if self.scale_axis is None else s.reshape(-1)
        if self.scale_axis is None and s.size != 1:
            raise FormatError("a per-tensor scale must be one value, got {}".format(s.size))
        if not (np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise FormatError("scales must be positive and finite")
        z = np.asarray(zero_point, dtype=np.float64)
        z = z.reshape(self.scale.shape) if z.size == self.scale.size else np.broadcast_to(z, self.scale.shape)
        self.zero_point = np.rint(z).astype(np.int64)
        self._check_groups()
        self._check_zero_points()

    # ------------------------------------------------------------------ views
    @property
    def mixed(self):
        """Whether the groups have different widths."""
        return isinstance(self.bits, tuple)

    @property
    def max_bits(self):
        return max(self.bits) if self.mixed else self.bits

    def bits_along(self, n):
        """Width of each of ``n`` indices along the group axis (int64 ``[n]``)."""
        if not self.mixed:
            return np.full(int(n), self.bits, dtype=np.int64)
        groups = -(-int(n) // self.group_size)
        if groups != len(self.bits):
            raise FormatError("{} indices in groups of {} need {} widths, the spec has {}".format(
                n, self.group_size, groups, len(self.bits)))
        return np.asarray(self.bits, dtype=np.int64)[np.arange(int(n)) // self.group_size]

    def scale_view(self):
        """``scale`` shaped to broadcast against the tensor."""
        return _axis_view(self.scale, self.scale_axis)

    def bounds(self, extent=None):
        """Zero-point-0 integer clip bounds ``(lo, hi)`` as broadcastable int64 arrays.

        ``extent``: the tensor's size along the group axis; it defaults to the number of
        scales when groups and scales share the axis (every activation spec).
        """
        if self.mixed:
            if extent is None:
                if self.group_axis != self.scale_axis:
                    raise FormatError("bounds of input-axis groups need the tensor's extent along that axis")
                extent = self.scale.size
            b = self.bits_along(extent)
            lims = np.array([qrange(int(v), self.signed) for v in b], dtype=np.int64)
            qmin, qmax = _axis_view(lims[:, 0], self.group_axis), _axis_view(lims[:, 1], self.group_axis)
        else:
            qmin, qmax = (np.asarray(v, dtype=np.int64) for v in qrange(self.bits, self.signed))
        z = _axis_view(self.zero_point, self.scale_axis)
        return qmin - z, qmax - z

    @property
    def needs_uint8(self):
        """Codes above INT8 (an unsigned 8-bit tensor): UINT8, which only ONNX Runtime runs."""
        return int(np.max(self.bounds()[1])) > INT8_MAX

    def summary(self):
        """JSON-friendly description without the scales (the sidecar's allocation table)."""
        d = {"kind": self.kind, "signed": self.signed,
             "bits": list(self.bits) if self.mixed else self.bits,
             "scale": "tensor" if self.scale_axis is None else "axis {} x{}".format(self.scale_axis, self.scale.size)}
        if self.mixed:
            d.update(group_axis=self.group_axis, group_size=self.group_size)
        return d

    def __repr__(self):
        return "TensorSpec({})".format(", ".join("{}={}".format(k, v) for k, v in sorted(self.summary().items())))

    # ------------------------------------------------------------------ checks
    def _check_groups(self):
        if not self.mixed:
            return
        if self.kind != "weight" and self.group_axis != self.scale_axis:
            raise FormatError("{} bits per group need a scale per group along the same axis (axis {}), "
                              "this spec's scale is {}".format(self.kind, self.group_axis,
                                                               "per tensor" if self.scale_axis is None
                                                               else "along axis {}".format(self.scale_axis)))
        if self.group_axis == self.scale_axis:
            self.bits_along(self.scale.size)  # the groups must cover the scales exactly

    def _check_zero_points(self):
        if not np.any(self.zero_point):
            return
        if self.kind == "weight" or not self.signed:
            raise FormatError("{} {} tensors have zero-point 0".format(
                "signed" if self.signed else "unsigned", self.kind))
        widths = self.bits_along(self.scale.size) if self.mixed else np.full(self.scale.size, self.bits)
        for z, b in zip(self.zero_point.reshape(-1), widths):
            zlo, zhi = zero_point_range(int(b), self.signed)
            if not zlo <= int(z) <= zhi:
                raise FormatError("zero-point {} outside [{}, {}] for {}-bit signed".format(z, zlo, zhi, b))


SITE_OPS = ("act", "linear", "conv")


class SiteSpec:
    """One quantized place of the network, named by its module path.

    ``op="act"``: a standalone activation quantizer (q, k, v, attention map): ``input`` is its
    spec.  ``op="linear"``/``"conv"``: a layer whose input (``input``) and weight (``weight``)
    are quantized; ``weight_int`` holds the frozen integer codes (``[N, K]`` or
    ``[O, C, kh, kw]``), ``bias`` the float bias (or None), ``conv`` the convolution geometry
    (``kernel_shape``, ``strides``, ``pads`` [begin..., end...], ``dilations``, ``group``).
    """

    __slots__ = ("name", "op", "input", "weight", "weight_int", "bias", "conv")

    def __init__(self, name, op, input, weight=None, weight_int=None, bias=None, conv=None):
        if op not in SITE_OPS:
            raise FormatError("site op {!r} is not one of {}".format(op, ", ".join(SITE_OPS)))
        self.name, self.op, self.input = str(name), op, input
        self.weight, self.bias, self.conv = weight, None if bias is None else np.asarray(bias, np.float32), conv
        self.weight_int = None if weight_int is None else np.asarray(weight_int, dtype=np.int8)
        if op != "act":
            self._check_layer()

    def _check_layer(self):
        w, q = self.weight, self.weight_int
        if w is None or q is None or w.kind != "weight":
            raise FormatError("{}: a {} site needs a weight spec and integer weights".format(self.name, self.op))
        if w.scale_axis != -q.ndim or w.scale.size != q.shape[0]:
            raise FormatError("{}: weight scales must be one per output channel".format(self.name))
        extent = None if not w.mixed else q.shape[w.group_axis]
        lo, hi = w.bounds(extent)
        if q.size and (np.any(q < lo) or np.any(q > hi)):
            raise FormatError("{}: integer weights fall outside their groups' bit ranges".format(self.name))
        if self.op == "conv" and not self.conv:
            raise FormatError("{}: a conv site needs its geometry".format(self.name))

    @property
    def out_features(self):
        return int(self.weight_int.shape[0])

    def dequantized_weight(self):
        """``s[n] * q[n, ...]`` as float32 (the fp32 export and the float reference)."""
        return (self.weight_int.astype(np.float32) * self.weight.scale_view()).astype(np.float32)

    def summary(self):
        d = {"name": self.name, "op": self.op, "input": self.input.summary()}
        if self.weight is not None:
            d["weight"] = self.weight.summary()
        return d

    def __repr__(self):
        return "SiteSpec({!r}, {})".format(self.name, self.op)


def linear_site(name, weight_int, weight_scale, bias, w_bits, act_scale, act_bits, act_zero_point=0,
                group_size=None):
    """A linear :class:`SiteSpec` from plain arrays: ``w_bits`` an int, or one width per group of
    ``group_size`` output rows; the input per tensor, signed, with an integer zero-point."""
    q = np.asarray(weight_int)
    mixed = isinstance(w_bits, (list, tuple, np.ndarray))
    w = TensorSpec("weight", True, w_bits, weight_scale, scale_axis=-2, group_axis=-2 if mixed else None,
                   group_size=group_size)
    a = TensorSpec("act", True, act_bits, act_scale, zero_point=act_zero_point)
    return SiteSpec(name, "linear", a, w, q, bias)


def allocation(sites):
    """The sidecar's per-site table: name, op and the input / weight bits of every site."""
    return [s.summary() for s in sites]
