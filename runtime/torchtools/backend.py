"""``--backend torch``: the trained checkpoint in PyTorch, through the trainer's one loader.

The accuracy reference of bench and demo, and (``--lowbit-cuda``) the packed low-bit CUDA kernels
swapped in from the checkpoint's spec records.  Loaded only for ``--backend torch``: it needs
torch and the ``train`` package, which a Jetson does not have.
"""

import os

import numpy as np
import torch

from qformat.errors import UserError
from runtime import model_meta
from runtime.backend_api import Backend


class TorchBackend(Backend):
    """A checkpoint from ``python -m train`` (quantized: converted; float: as trained)."""

    name = "torch"

    def __init__(self, checkpoint, lowbit_cuda=False, device=None):
        from train.deploy import load_deployable

        if not os.path.isfile(checkpoint):
            raise UserError("checkpoint not found: {} (train one with `make train`)".format(checkpoint))
        self.path = checkpoint
        dep = load_deployable(checkpoint, quantized_only=False)
        meta = dict(dep.meta)
        for k, v in (("format", "torch"), ("target", "torch"), ("input_name", "input"), ("output_name", "logits")):
            meta.setdefault(k, v)
        meta.setdefault("bits", dep.bits() if dep.quantized else {})
        self.meta = model_meta.validate(meta, checkpoint + " metadata")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = dep.model
        if lowbit_cuda:
            model = self._swap(model, dep.specs)
        self.model = model.eval().to(self.device)
        self.precision = "lowbit-cuda" if lowbit_cuda else ("torch-fakequant" if dep.quantized else "torch-fp32")

    @staticmethod
    def _swap(model, specs):
        try:
            from runtime.torchtools import gemm_ext
        except ImportError as e:
            raise UserError("--lowbit-cuda needs runtime/torchtools/gemm_ext.py and its CUDA extension ({})".format(
                e)) from None
        if not specs:
            raise UserError("--lowbit-cuda needs a quantized checkpoint (this one is float)")
        return gemm_ext.swap_linears(model, specs=specs) or model

    def _run(self, x):
        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            if isinstance(y, (tuple, list)):
                y = y[0]
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return y.float().cpu().numpy()

    def memory(self):
        m = Backend.memory(self)
        if self.device.startswith("cuda"):
            m["device_peak_mb"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
        return m
