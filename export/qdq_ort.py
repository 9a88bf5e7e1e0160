"""The ``qdq`` format for ONNX Runtime on a CPU (``--target ort``): the exact graph its fusions run fastest.

ONNX Runtime fuses ``DequantizeLinear -> MatMul`` into one integer kernel (MatMulIntegerToFloat)
when the activation is UINT8 with a per-tensor scale and zero-point, whatever that zero-point is.
TensorRT's rules (zero-point 0, float Clip before Q) are not needed here, so:

* activation quantizer ``s, [lo, hi]`` (LSQ+ offsets folded into the bounds): UINT8 codes
  ``c + Z`` with ``Z = -lo`` (:meth:`qformat.TensorSpec.uint8_zero_point`), so Q's saturation at 0
  *is* the lower clip; the upper bound of a b < 8-bit grid is not implied by u8 saturation and
  stays a one-sided float clip::

      x -> Clip(max=hi*s) -> QuantizeLinear(s, Z:u8) -> DequantizeLinear(s, Z) -> MatMul (fused)

  (8-bit grids need no clip at all.)
* per-head / per-channel scales: QuantizeLinear takes them per axis (no Div), and when the
  quantizer feeds a MatMul together with another one (QK^T, A.V) its DQ is per tensor with
  scale 1 and one common zero-point, so ORT fuses the MatMul on integers; the per-head scales
  move behind it (export.rewrite), together with a scalar Mul that follows (the attention scale)::

      x -> Min(hi[h]*s[h]) -> Q(s[h], Z, axis=heads) -> DQ(1, Z) -> MatMul -> Mul(s_a[h] s_b[h] c)

  Both operands of such a MatMul are UINT8: x86 runs u8 x u8 by widening to int16 (VPMADDWD),
  which is exact for any codes.
* weights: INT8 per output channel with zero-point 0 (INT4 storage at opset >= 21 behind a
  ``Cast`` that ONNX Runtime folds when the session is created, so the file is small and the
  kernel still reads INT8).  Exactness rule (qformat.targets.int_matmul_exact): ORT's x86 u8 x s8
  kernel without VNNI sums pairs of products in saturating int16, so where
  ``2 * max(u8 code) * max|w| > 32767`` (8-bit weights behind an 8-bit input) the weights are
  stored as UINT8 ``w + 128`` with zero-point 128 instead: the u8 x u8 kernel, exact.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

import qformat
from qformat import targets

from .emitters import Tap, register_emitter
from .graph import int4_tensor
from .qdq import QdqEmitter

U8_MAX = 255


@register_emitter("qdq", variant="ort")
class OrtQdqEmitter(QdqEmitter):
    """UINT8 activations with their integer zero-points, per-axis Q, weights by the pair-sum rule."""

    def can_hoist(self, spec: qformat.TensorSpec) -> bool:
        return spec.scale_axis is not None and spec.uint8_zero_point(common=True) is not None

    def _clip(self, base: str, x: str, spec: qformat.TensorSpec, z) -> str:
        """Float clips for the bounds that u8 saturation at ``z`` does not already apply."""
        lo, hi = (np.asarray(v, np.int64) for v in spec.bounds())
        s = spec.scale_view().astype(np.float32)
        need_lo, need_hi = bool(np.any(lo + z > 0)), bool(np.any(hi + z < U8_MAX))
        lo_x, hi_x = (np.float32(lo) * s).astype(np.float32), (np.float32(hi) * s).astype(np.float32)
        if spec.scale_axis is None or lo_x.size == 1:
            if not (need_lo or need_hi):
                return x
            ins = [x, self.b.const(f"{base}/clip_min", lo_x.reshape(())) if need_lo else "",
                   self.b.const(f"{base}/clip_max", hi_x.reshape(())) if need_hi else ""]
            return self.b.node("Clip", ins if need_hi else ins[:2], f"{base}/Clip")
        if need_lo:
            x = self.b.node("Max", [x, self.b.const(f"{base}/group_lo", lo_x)], f"{base}/Max")
        if need_hi:
            x = self.b.node("Min", [x, self.b.const(f"{base}/group_hi", hi_x)], f"{base}/Min")
        return x

    def act(self, name: str, spec: qformat.TensorSpec, x: str, out: str | None, hoisted: bool = False,
            label: str | None = None) -> str:
        base = label or name
        z = np.asarray(spec.uint8_zero_point(common=True) if hoisted else spec.uint8_zero_point(), np.int64)
        t = self._clip(base, x, spec, z)
        per_axis = spec.scale_axis is not None and spec.scale.size > 1
        shape = (-1,) if per_axis else ()
        scale = self.b.const(f"{base}/scale", spec.scale.astype(np.float32).reshape(shape))
        zp = self.b.const(f"{base}/zero_point", np.resize(z.reshape(-1), spec.scale.size).astype(np.uint8)
                          .reshape(shape))
        axis = {"axis": int(spec.scale_axis)} if per_axis else {}
        q = self.b.node("QuantizeLinear", [t, scale, zp], f"{base}/QuantizeLinear", **axis)
        self.taps[name] = Tap(q, "q", z if per_axis and not hoisted else int(z.max()))
        if hoisted:  # integer grid on both MatMul inputs: per-tensor DQ, the scales follow the MatMul
            unit = self.b.const(f"{base}/unit_scale", np.float32(1))
            zc = self.b.const(f"{base}/common_zero_point", np.uint8(z))
            return self.b.node("DequantizeLinear", [q, unit, zc], f"{base}/DequantizeLinear", out)
        return self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear", out, **axis)

    def weight_dq(self, base: str, spec: qformat.TensorSpec, w_int: np.ndarray, axis: int, a_max: int = U8_MAX) -> str:
        """Per-channel weight DQ: INT8 (INT4 storage + Cast) where the u8 x s8 kernel is exact, else UINT8 + 128."""
        scale = spec.scale.astype(np.float32).reshape(-1)
        w_abs = int(np.abs(w_int.astype(np.int64)).max()) if w_int.size else 0
        if not targets.int_matmul_exact(a_max, w_abs, self.opts.pair_sum_max):
            w = self.b.const(f"{base}/weight_uint8", (w_int.astype(np.int16) + 128).astype(np.uint8))
            zp = self.b.const(f"{base}/weight_zero_point", np.full(scale.size, 128, np.uint8))
        else:
            if self.opts.int4 and spec.max_bits <= 4:
                w4 = self.b.tensor(int4_tensor(f"{base}/weight_int4", w_int))
                w = self.b.node("Cast", [w4], f"{base}/weight/Cast", to=TensorProto.INT8)  # folded at load
            else:
                w = self.b.const(f"{base}/weight_int8", w_int.astype(np.int8))
            zp = self.b.const(f"{base}/weight_zero_point", np.zeros(scale.size, np.int8))
        s = self.b.const(f"{base}/weight_scale", scale)
        return self.b.node("DequantizeLinear", [w, s, zp], f"{base}/weight/DequantizeLinear", axis=axis)

    def _input(self, site: qformat.SiteSpec, x: str) -> tuple[str, int]:
        """The layer input's DQ output and the largest u8 code it can hold."""
        spec = site.input
        if spec.scale_axis is not None and spec.scale.size > 1:
            # a scale (and width) per input channel group: ORT's integer MatMul takes one activation scale
            # and zero-point, so this input stays on the float path (Q/DQ, then the group scales), exact
            return QdqEmitter.act(self, site.name, spec, x, None, label=f"{site.name}/input"), U8_MAX
        z = spec.uint8_zero_point()
        return self.act(site.name, spec, x, None, label=f"{site.name}/input"), int(np.max(spec.bounds()[1] + z))

    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        xq, a_max = self._input(site, x)
        w = self.weight_dq(site.name, site.weight, np.ascontiguousarray(site.weight_int.T), axis=1, a_max=a_max)
        self.matmul_add(site.name, xq, w, site.bias, out)

    def conv(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        xq, a_max = self._input(site, x)
        self.conv_node(site, xq, self.weight_dq(site.name, site.weight, site.weight_int, axis=0, a_max=a_max), out)

