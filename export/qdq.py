"""Replace the tracer's marker nodes with exact Q/DQ subgraphs (standard ONNX ops only).

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

* QuantLinear: input quantizer as above, weights ``int8 [K, N]`` (INT4 at opset >= 21 for
  4-bit) -> DequantizeLinear(axis=1, per output channel, zp=0) -> MatMul -> Add(bias).
* QuantConv2d (patch embedding): input quantizer, weights ``int8 [O, C, kh, kw]`` -> DQ(axis=0) -> Conv.

All divisions, roundings and clips are the same float32 operations the frozen PyTorch
quantizer performs, so every integer code matches the trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from qformat.errors import UserError

from .graph import Builder, consumers, producers
from .trace import MARKER_DOMAIN, Site

_PASS = ("Transpose", "Identity")


@dataclass
class ActParams:
    """An activation quantizer's frozen parameters as numpy arrays (scale-shaped bounds)."""

    name: str
    scale: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    bits: int
    signed: bool

    @classmethod
    def of(cls, name: str, q) -> ActParams:
        lo, hi = q.int_bounds()
        s = q.scale.detach().float().cpu().numpy().astype(np.float32)
        return cls(name, s, lo.detach().cpu().numpy().astype(np.float32), hi.detach().cpu().numpy().astype(np.float32),
                   int(q.bits), bool(q.signed))

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def needs_uint8(self) -> bool:
        return float(self.hi.max()) > 127


@dataclass
class Options:
    fmt: str  # "qdq" | "lowbit" | "fp32"
    opset: int
    int4: bool  # 4-bit weights as ONNX INT4 (opset >= 21)
    allow_uint8: bool  # unsigned 8-bit softmax output as UINT8 (ONNX Runtime only)


class Rewriter:
    """Turns a skeleton with markers into the final graph for one format."""

    def __init__(self, model: onnx.ModelProto, sites: list[Site], opts: Options) -> None:
        self.model, self.sites, self.opts = model, sites, opts
        self.b = Builder(model.graph)
        self.lowbit_nodes = 0

    # ------------------------------------------------------------------ activations
    def _zp(self, base: str, p: ActParams, scale_one: bool) -> tuple[str, str]:
        if p.needs_uint8:
            if not self.opts.allow_uint8:
                raise UserError(f"{p.name}: {p.bits}-bit unsigned range [0, {int(p.hi.max())}] does not fit INT8; "
                                "TensorRT has no UINT8 Q/DQ: retrain with attn_bits <= 7 or export --target ort")
            zp = self.b.const(f"{base}/zero_point", np.uint8(0))
        else:
            zp = self.b.const(f"{base}/zero_point", np.int8(0))
        scale = self.b.const(f"{base}/scale", np.float32(1.0 if scale_one else p.scale.reshape(())))
        return scale, zp

    def act(self, x: str, p: ActParams, out: str | None, hoisted: bool = False) -> str:
        """Emit the quantizer for ``x``; return the name of the (dequantized) result."""
        base = p.name
        if self.opts.fmt == "fp32":
            return self.b.node("Identity", [x], f"{base}/Identity", out)
        if p.per_tensor and not hoisted:
            s = np.float32(p.scale.reshape(()))
            lo = self.b.const(f"{base}/clip_min", np.float32(np.float32(p.lo.reshape(())) * s))
            hi = self.b.const(f"{base}/clip_max", np.float32(np.float32(p.hi.reshape(())) * s))
            c = self.b.node("Clip", [x, lo, hi], f"{base}/Clip")
            scale, zp = self._zp(base, p, scale_one=False)
            q = self.b.node("QuantizeLinear", [c, scale, zp], f"{base}/QuantizeLinear")
            return self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear", out)
        s = self.b.const(f"{base}/group_scale", p.scale.astype(np.float32))
        t = self.b.node("Div", [x, s], f"{base}/Div")
        if np.all(p.lo == p.lo.flat[0]) and np.all(p.hi == p.hi.flat[0]):
            lo = self.b.const(f"{base}/clip_min", np.float32(p.lo.flat[0]))
            hi = self.b.const(f"{base}/clip_max", np.float32(p.hi.flat[0]))
            t = self.b.node("Clip", [t, lo, hi], f"{base}/Clip")
        else:
            lo = self.b.const(f"{base}/group_lo", p.lo.astype(np.float32))
            hi = self.b.const(f"{base}/group_hi", p.hi.astype(np.float32))
            t = self.b.node("Max", [t, lo], f"{base}/Max")
            t = self.b.node("Min", [t, hi], f"{base}/Min")
        scale, zp = self._zp(base, p, scale_one=True)
        q = self.b.node("QuantizeLinear", [t, scale, zp], f"{base}/QuantizeLinear")
        if hoisted:
            return self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear", out)
        d = self.b.node("DequantizeLinear", [q, scale, zp], f"{base}/DequantizeLinear")
        return self.b.node("Mul", [d, s], f"{base}/Mul", out)

    # ------------------------------------------------------------------ weights
    def weight_dq(self, base: str, w_int: np.ndarray, scale: np.ndarray, axis: int, bits: int) -> str:
        scale = np.asarray(scale, np.float32).reshape(-1)
        if self.opts.int4 and bits == 4:
            w = self.b.tensor(helper.make_tensor(f"{base}/weight_int4", TensorProto.INT4, list(w_int.shape),
                                                 w_int.astype(np.int8).flatten().tolist()))
            zp = self.b.tensor(helper.make_tensor(f"{base}/weight_zero_point", TensorProto.INT4, [scale.size],
                                                  [0] * scale.size))
        else:
            w = self.b.const(f"{base}/weight_int8", w_int.astype(np.int8))
            zp = self.b.const(f"{base}/weight_zero_point", np.zeros(scale.size, np.int8))
        s = self.b.const(f"{base}/weight_scale", scale)
        return self.b.node("DequantizeLinear", [w, s, zp], f"{base}/weight/DequantizeLinear", axis=axis)

    def linear(self, site: Site, x: str, out: str) -> None:
        m, base = site.module, site.name
        w_int = m.weight_int.detach().cpu().numpy()
        w_scale = m.weight_scale.detach().cpu().numpy()
        bias = m.bias.detach().cpu().numpy().astype(np.float32) if m.bias is not None else None
        p = ActParams.of(f"{base}.a_quant", m.a_quant)
        if self.opts.fmt == "lowbit" and m.w_quant.bits in _packed_bits():
            if not p.per_tensor:
                raise UserError(f"{base}: the lowbit node takes a per-tensor input scale but this model uses "
                                f"per-channel Linear input scales (granularity=paper); export --format qdq")
            from .functions import lowbit_node

            self.b.nodes.append(lowbit_node(
                self.b.unique(f"{base}/QvitLowBitLinear"), x, out, bits=m.w_quant.bits, weight_int=w_int,
                weight_scale=w_scale, bias=bias if bias is not None else np.zeros(w_int.shape[0], np.float32),
                act_scale=float(p.scale.reshape(())), act_lo=int(p.lo.reshape(())), act_hi=int(p.hi.reshape(())),
                act_bits=p.bits))
            self.lowbit_nodes += 1
            return
        if self.opts.fmt == "fp32":
            w = self.b.const(f"{base}/weight", (w_int.astype(np.float32) * w_scale.reshape(-1, 1)).T.copy())
            xq = x
        else:
            xq = self.act(x, p, None)
            w = self.weight_dq(base, np.ascontiguousarray(w_int.T), w_scale, axis=1, bits=m.w_quant.bits)
        if bias is None:
            self.b.node("MatMul", [xq, w], f"{base}/MatMul", out)
            return
        y = self.b.node("MatMul", [xq, w], f"{base}/MatMul")
        self.b.node("Add", [y, self.b.const(f"{base}/bias", bias)], f"{base}/Add", out)

    def conv(self, site: Site, x: str, out: str) -> None:
        m, base = site.module, site.name
        if isinstance(m.padding, str):
            raise UserError(f"{base}: padding={m.padding!r} is not supported by the exporter (use explicit ints)")
        w_int = m.weight_int.detach().cpu().numpy()
        w_scale = m.weight_scale.detach().cpu().numpy()
        if self.opts.fmt == "fp32":
            w = self.b.const(f"{base}/weight", w_int.astype(np.float32) * w_scale.reshape(-1, 1, 1, 1))
            xq = x
        else:
            xq = self.act(x, ActParams.of(f"{base}.a_quant", m.a_quant), None)
            w = self.weight_dq(base, w_int, w_scale, axis=0, bits=m.w_quant.bits)
        inputs = [xq, w]
        if m.bias is not None:
            inputs.append(self.b.const(f"{base}/bias", m.bias.detach().cpu().numpy().astype(np.float32)))
        pads = [int(p) for p in m.padding]
        self.b.node("Conv", inputs, f"{base}/Conv", out, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                    pads=pads + pads, dilations=list(m.dilation), group=int(m.groups))

    # ------------------------------------------------------------------ attention MatMuls
    def _hoist_plan(self) -> tuple[set[int], dict[str, list[int]]]:
        """Per-group act markers whose scale can move behind the MatMul they feed."""
        g = self.model.graph
        prod, users = producers(g), consumers(g)

        def source(name: str):
            n = prod.get(name)
            while n is not None and n.op_type in _PASS:
                if len(users[n.output[0]]) != 1:
                    return None
                n = prod.get(n.input[0])
            if n is not None and n.domain == MARKER_DOMAIN and n.op_type == "Act":
                return n
            return None

        hoisted: set[int] = set()
        matmuls: dict[str, list[int]] = {}
        if self.opts.fmt == "fp32":
            return hoisted, matmuls
        for n in g.node:
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
                continue
            srcs = [source(i) for i in n.input]
            if any(s is None for s in srcs):
                continue
            idxs = [_idx(s) for s in srcs]
            groups = [i for i, s in zip(idxs, srcs) if len(users[s.output[0]]) == 1
                      and not ActParams.of("", self.sites[i].module).per_tensor]
            if groups:
                matmuls[n.output[0]] = groups
                hoisted.update(groups)
        return hoisted, matmuls

    def _transpose_first(self) -> None:
        """``Act -> Transpose`` becomes ``Transpose -> Act`` so DQ feeds the MatMul directly.

        (K^T in QK^T.)  Exact: quantization is elementwise, and the per-head/per-channel scale
        axes are kept in place by the permutation (checked).  It also sidesteps ONNX Runtime's
        transpose optimizer, which at opset 21 rewrites ``DQ -> Transpose`` into a Q node with
        a mismatched ``output_dtype``.
        """
        g = self.model.graph
        users = consumers(g)
        order = list(g.node)
        for n in list(order):
            if n.domain != MARKER_DOMAIN or n.op_type != "Act":
                continue
            us = users.get(n.output[0], [])
            if len(us) != 1 or us[0].op_type != "Transpose":
                continue
            t = us[0]
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
            p = ActParams.of("", self.sites[_idx(n)].module)
            if perm is None:
                continue
            if not p.per_tensor:
                keep = [len(perm) - 3] if p.scale.ndim == 3 else [len(perm) - 1]  # head axis / channel axis
                if any(perm[k] != k for k in keep):
                    continue
            x, a, b = n.input[0], n.output[0], t.output[0]
            t.input[0], t.output[0] = x, a
            n.input[0], n.output[0] = a, b
            order.remove(t)
            order.insert(order.index(n), t)
        del g.node[:]
        g.node.extend(order)

    def run(self) -> onnx.ModelProto:
        g = self.model.graph
        self._transpose_first()
        hoisted, matmuls = self._hoist_plan()
        for n in g.node:
            if n.domain == MARKER_DOMAIN:
                site = self.sites[_idx(n)]
                x, y = n.input[0], n.output[0]
                if site.kind == "act":
                    self.act(x, ActParams.of(site.name, site.module), y, hoisted=_idx(n) in hoisted)
                elif site.kind == "linear":
                    self.linear(site, x, y)
                else:
                    self.conv(site, x, y)
            elif n.output and n.output[0] in matmuls:
                out = n.output[0]
                tmp = self.b.unique(out + "_int")
                n.output[0] = tmp
                self.b.nodes.append(n)
                scale = np.float32(1.0)
                for i in matmuls[out]:
                    scale = scale * ActParams.of("", self.sites[i].module).scale.astype(np.float32)
                label = n.name.rsplit("/", 1)[0] if "/" in n.name else n.name
                self.b.node("Mul", [tmp, self.b.const(f"{label}/group_scales", scale.astype(np.float32))],
                            f"{label}/GroupScale", out)
            else:
                self.b.nodes.append(n)
        del g.node[:]
        g.node.extend(self.b.nodes)
        g.initializer.extend(self.b.inits)
        return self.model


def _idx(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "idx":
            return int(a.i)
    raise ValueError(f"marker {node.name} has no idx")


def _packed_bits() -> tuple[int, ...]:
    import qformat

    return tuple(qformat.PACKED_BITS)
