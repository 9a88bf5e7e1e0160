"""The ``fp32`` format: the converted model with every quantizer removed (dequantized float weights).

A reference for accuracy and speed, and the graph a plain FP16/FP32 engine is built from.
It has no activation codes, so it records no parity taps.
"""

from __future__ import annotations

import numpy as np

import qformat

from .emitters import Emitter, register_emitter


@register_emitter("fp32")
class Fp32Emitter(Emitter):
    hoists_group_scales = False

    def act(self, name: str, spec: qformat.TensorSpec, x: str, out: str | None, hoisted: bool = False) -> str:
        return self.b.node("Identity", [x], f"{name}/Identity", out)

    def linear(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        w = self.b.const(f"{site.name}/weight", np.ascontiguousarray(site.dequantized_weight().T))
        self.matmul_add(site.name, x, w, site.bias, out)

    def conv(self, site: qformat.SiteSpec, x: str, out: str) -> None:
        self.conv_node(site, x, self.b.const(f"{site.name}/weight", site.dequantized_weight()), out)
