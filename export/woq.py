"""The ``woq`` format: weight-only quantization -- integer weights through DequantizeLinear, float activations.

TensorRT's INT4 path (10.0+) is weight-only: INT4 weights (opset 21, every group of the weight
fitting 4 bits; INT8 containers otherwise) dequantized into an FP16 MatMul.  This format is the
trained model with its activation quantizers removed and its weights kept as their integer
codes, so an FP16 / INT8 / INT4 comparison (``bench --compare``) runs the same weights three ways.
It records no parity taps; parity is against the model without activation quantizers.
"""

from __future__ import annotations

import numpy as np

import qformat
from qformat.errors import UserError

from .emitters import register_emitter
from .qdq import QdqEmitter


@register_emitter("woq")
class WoqEmitter(QdqEmitter):
    hoists_group_scales = False

    @classmethod
    def check_target(cls, target) -> None:
        if target.tensorrt and not target.int4:
            raise UserError(f"--format woq is TensorRT's INT4 weight-only path (TensorRT 10+); --target "
                            f"{target.name} ({target.runtime}) has none: use --format qdq or fp32")

    def act(self, name: str, spec: qformat.TensorSpec, x: str, out: str | None, hoisted: bool = False) -> str:
        return self.b.node("Identity", [x], f"{name}/Identity", out)

    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        w = self.weight_dq(site.name, site.weight, np.ascontiguousarray(site.weight_int.T), axis=1)
        self.matmul_add(site.name, x, w, site.bias, out)

    def conv(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        self.conv_node(site, x, self.weight_dq(site.name, site.weight, site.weight_int, axis=0), out)
