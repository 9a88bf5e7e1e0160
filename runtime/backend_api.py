"""What every inference backend is: ``prepare(batch)``, ``run(x) -> logits``, ``memory()``, ``close()``.

The base class lives apart from the implementations so the torch-side backend
(:mod:`runtime.torchtools.backend`) can subclass it without importing the device core's
TensorRT / ONNX Runtime backends.  Python 3.6-compatible.
"""

import os
import resource

from runtime.preprocess import check_input

#: Backend names (bench/demo ``--backend``); runtime.backends.open_backend maps them to classes.
BACKENDS = ("trt", "ort", "torch")


class BatchUnsupported(Exception):
    """The model/engine cannot run this batch size (fixed batch, profile limit)."""


def host_peak_rss_mb():
    """Peak resident memory of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Backend:
    name = "?"
    meta = None  # type: dict
    path = ""
    precision = "fp32"

    def max_batch(self):
        """Largest batch accepted, or None when any batch works."""
        return None

    def prepare(self, batch):
        mb = self.max_batch()
        if mb is not None and batch > mb:
            raise BatchUnsupported("{} accepts batch <= {}".format(self.name, mb))
        if getattr(self, "fixed_batch", None) and batch != self.fixed_batch:
            raise BatchUnsupported("{} has a fixed batch of {}".format(os.path.basename(self.path), self.fixed_batch))

    def run(self, x):
        """Logits for a preprocessed ``[N, C, H, W]`` batch. Refuses (UserError) a batch of the wrong shape
        or one with NaN/Inf frames (:class:`runtime.preprocess.NonFiniteInput`), at the cost of one sum."""
        return self._run(check_input(x, self.meta, self.path))

    def _run(self, x):
        raise NotImplementedError

    def memory(self):
        return {"host_peak_rss_mb": round(host_peak_rss_mb(), 1)}

    def close(self):
        pass
