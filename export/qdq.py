"""The ``qdq`` format: every quantized site as an exact Q/DQ subgraph (standard ONNX ops only).

Placement (see export/README.md for the picture):

* per-tensor activation quantizer ``s, [lo, hi]`` (LSQ+ zero-point already folded into the
  bounds by ``ActQuantizer.int_bounds``)::

      x -> Clip(lo*s, hi*s) -> QuantizeLinear(s, zp=0) -> DequantizeLinear(s, zp=0) -> x_hat

* per-head / per-channel quantizer ``s[g], [lo[g], hi[g]]``: the integer grid is made
  explicit and the per-group scale moved out of the Q/DQ pair, so TensorRT still sees
  per-tensor, zero-point-0 Q/DQ::

      x -> Div(s[g]) -> Clip(lo, hi) | Max(lo[g]) -> Min(hi[g]) -> Q(1) -> DQ(1) -> Mul(s[g])

  When both inputs of a MatMul (QK^T, A.V) come from such quantizers the ``Mul(s[g])`` is
  hoisted behind the MatMul (``(s_a[h] a_int) @ (s_b[h] b_int) = s_a[h] s_b[h] (a_int @ b_int)``,
  exact), so the MatMul reads DQ outputs directly -- what TensorRT fuses into INT8 MatMul.

* QuantLinear: input quantizer as above, weights ``int8 [K, N]`` (INT4 at opset >= 21 when
  every group of the weight fits 4 bits) -> DequantizeLinear(axis=1, per output channel, zp=0)
  -> MatMul -> Add(bias).  Bits per group need nothing else: the integer weights are frozen
  codes, exact in their container; per-head activation bits are per-head clip bounds above.
* QuantConv2d (patch embedding): input quantizer, weights ``int8 [O, C, kh, kw]`` -> DQ(axis=0) -> Conv.

All divisions, roundings and clips are the same float32 operations the frozen PyTorch
quantizer performs, so every integer code matches the trained model.
"""


from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

import qformat
from qformat.errors import UserError

from .emitters import Emitter, register_emitter


@register_emitter("qdq")
class QdqEmitter(Emitter):
    """Q/DQ for every activation quantizer, DequantizeLinear for every weight."""

    def _zp(self, base: str, name: str, spec: qformat.TensorSpec, hi: np.ndarray, scale) -> tuple[str, str]:
        if spec.needs_uint8:
            if not self.opts.uint8:
                raise UserError(f"{name}: {spec.max_bits}-bit unsigned range [0, {int(hi.max())}] does not fit INT8; "
                                "TensorRT has no UINT8 Q/DQ: retrain with attn_bits <= 7 or export --target ort")
            zp = self.b.const(f"{base}/zero_point", np.uint8(0))
        else:
            zp = self.b.const(f"{base}/zero_point", np.int8(0))
        return self.b.const(f"{base}/scale", np.float32(scale)), zp

    def act(self, name: str, spec: qformat.TensorSpec, x: str, out: str | None, hoisted: bool = False,
            label: str | None = None) -> str:
        base = label or name
        lo, hi = (np.asarray(v, np.float32) for v in spec.bounds())
        s = spec.scale_view().astype(np.float32)
        # UINT8 codes stay off ORT's saturating u8s8 integer MatMul (see export.rewrite)
        if spec.scale_axis is None and lo.size == 1 and not hoisted and not spec.needs_uint8:
            c = self.b.node("Clip", [x, self.b.const(f"{base}/clip_min", np.float32(lo.reshape(()) * s)),
                                     self.b.const(f"{base}/clip_max", np.float32(hi.reshape(()) * s))], f"{base}/Clip")
            scale, zp = self._zp(base, name, spec, hi, s.reshape(()))
            q = self.b.node("QuantizeLinear", [c, scale, zp], f"{base}/QuantizeLinear")
            self.taps[name] = (q, "q")
            return self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear", out)
        gs = self.b.const(f"{base}/group_scale", s)
        t = self.b.node("Div", [x, gs], f"{base}/Div")
        if np.all(lo == lo.flat[0]) and np.all(hi == hi.flat[0]):
            t = self.b.node("Clip", [t, self.b.const(f"{base}/clip_min", np.float32(lo.flat[0])),
                                     self.b.const(f"{base}/clip_max", np.float32(hi.flat[0]))], f"{base}/Clip")
        else:
            t = self.b.node("Max", [t, self.b.const(f"{base}/group_lo", lo)], f"{base}/Max")
            t = self.b.node("Min", [t, self.b.const(f"{base}/group_hi", hi)], f"{base}/Min")
        scale, zp = self._zp(base, name, spec, hi, 1.0)
        q = self.b.node("QuantizeLinear", [t, scale, zp], f"{base}/QuantizeLinear")
        self.taps[name] = (q, "q")
        if hoisted:
            return self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear", out)
        d = self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear")
        return self.b.node("Mul", [d, gs], f"{base}/Mul", out)

    def weight_dq(self, base: str, spec: qformat.TensorSpec, w_int: np.ndarray, axis: int) -> str:
        """Integer weights (INT4 when every group fits 4 bits and the target allows it) -> DequantizeLinear."""
        scale = spec.scale.astype(np.float32).reshape(-1)
        if self.opts.int4 and spec.max_bits <= 4:
            w = self.b.tensor(helper.make_tensor(f"{base}/weight_int4", TensorProto.INT4, list(w_int.shape),
                                                 w_int.astype(np.int8).flatten().tolist()))
            zp = self.b.tensor(helper.make_tensor(f"{base}/weight_zero_point", TensorProto.INT4, [scale.size],
                                                  [0] * scale.size))
        else:
            w = self.b.const(f"{base}/weight_int8", w_int.astype(np.int8))
            zp = self.b.const(f"{base}/weight_zero_point", np.zeros(scale.size, np.int8))
        s = self.b.const(f"{base}/weight_scale", scale)
        return self.b.node("DequantizeLinear", [w, s, zp], f"{base}/weight/DequantizeLinear", axis=axis)

    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        xq = self.act(site.name, site.input, x, None, label=f"{site.name}/input")
        w = self.weight_dq(site.name, site.weight, np.ascontiguousarray(site.weight_int.T), axis=1)
        self.matmul_add(site.name, xq, w, site.bias, out)

    def conv(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        xq = self.act(site.name, site.input, x, None, label=f"{site.name}/input")
        self.conv_node(site, xq, self.weight_dq(site.name, site.weight, site.weight_int, axis=0), out)
