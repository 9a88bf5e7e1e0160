"""Fast QAT: the student's training forward and backward compiled by ``torch.compile`` (Inductor).

Fake quantization is elementwise work around every matmul (scale, round, clamp, zero-point, STE,
LSQ gradient terms); run eagerly, each piece reads and writes the whole tensor, forward and
backward.  Inductor fuses them (and the LayerNorm/GELU/softmax around them) into one generated
loop per region -- C++/OpenMP on CPU, Triton on GPU -- and AOTAutograd compiles the backward the
same way.  :class:`FusedForward` installs the compiled forward on one model *instance*:

* only training-mode calls with gradients run compiled; evaluation, calibration and the
  no-grad teacher run the eager forward, so the compiled step sees one batch shape (the train
  loaders drop their last short batch, ``drop_last=True``) and is compiled once per run;
* the model's class, parameters and state-dict keys do not change (no ``_orig_mod.`` prefix):
  a checkpoint trained fused resumes eager and the reverse;
* every graph Inductor compiles is counted (:attr:`FusedForward.graphs`): graph breaks and
  recompiles both show up there, and the trainer logs the count.

:func:`availability` says why compilation cannot run here (no C++ compiler, no Triton), and
:func:`enable` then falls back to eager with one line.  The eager path (``--compile off``) is the
reference: the fused path computes the same functions, but Inductor's generated LayerNorm,
softmax, GELU and reductions may round differently in the last bit, so after many steps the two
trajectories are not bit-identical (tests/test_fused_qat.py states the tolerances).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, Optional

import torch
from torch import nn

COMPILE_MODES = ("auto", "on", "off")
#: ``--compile auto`` compiles a phase of at least this many steps.  Inductor took ~3 min (baseline) to
#: ~14 min (learned bits, loaded machine) with a cold cache for vit_fmnist on this 2-core CPU, and the fused
#: step saved ~40 % of a ~0.6 s eager step (issue 20's indicative figures): about 700 steps to break even
#: cold, so a one-epoch run (quickstart) stays eager and the study's 1k+ step runs compile.
AUTO_MIN_STEPS = 1000


def availability(device: torch.device) -> Optional[str]:
    """None when Inductor can compile for ``device`` here, else the reason it cannot (one phrase)."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # a broken or minimal torch build
        return f"torch._inductor does not import ({type(e).__name__})"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed"
        return None
    if device.type != "cpu":
        return f"no Inductor backend for device {device.type!r}"
    cxx = os.environ.get("CXX")
    if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++/clang++) on PATH"
    return None


def require(device: torch.device) -> None:
    """``--compile on``: refuse (one line, exit 2) before any work when Inductor cannot compile here."""
    from qformat.errors import UserError

    why = availability(device)
    if why is not None:
        raise UserError(f"--compile on: cannot compile the training step here ({why}); use --compile off or auto")


def not_ready(model: nn.Module) -> Optional[str]:
    """Why ``model`` must stay eager (None: it can be compiled).  The compiled forward assumes every
    quantizer calibrated and not frozen (train.quantizers skips those checks under compile)."""
    for name, m in model.named_modules():
        init = getattr(m, "initialized", None)
        if torch.is_tensor(init) and not bool(init):
            return f"{name} is not calibrated yet"
        frozen = getattr(m, "frozen", None)
        if torch.is_tensor(frozen) and bool(frozen) and hasattr(m, "zero_point"):
            return f"{name} is converted (frozen)"
        data_init = getattr(m, "data_initialized", None)
        if torch.is_tensor(data_init) and not bool(data_init):
            return f"{name} (IRM init='std') has not seen its first batch"
    if getattr(model, "qvit_converted", False):
        return "the model is converted"
    return None


class FusedForward:
    """The compiled training forward of one model instance (see the module docstring).

    Installed as the instance's ``forward`` attribute, so ``model(x)`` -- and DDP, forward hooks
    (DGD's q/k recorders), the objectives -- reach it unchanged; :meth:`remove` restores the class's.
    """

    def __init__(self, model: nn.Module, dynamic: Optional[bool] = False) -> None:
        from torch._dynamo import lookup_backend

        self.model = model
        self.eager = model.forward
        self.graphs = 0
        inductor = lookup_backend("inductor")

        def counting(gm, example_inputs):
            self.graphs += 1
            return inductor(gm, example_inputs)

        self.compiled = torch.compile(self.eager, backend=counting, dynamic=dynamic)
        model.forward = self  # an instance attribute: no state-dict key, no class change

    def __call__(self, *args, **kwargs):
        if self.model.training and torch.is_grad_enabled():
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)

    def remove(self) -> None:
        if self.model.__dict__.get("forward") is self:
            del self.model.forward

    def note(self) -> str:
        """``fused: 1 graph compiled`` (more than one: graph breaks or recompiles)."""
        return f"fused: {self.graphs} graph{'s' if self.graphs != 1 else ''} compiled"


def fused_of(model: nn.Module) -> Optional[FusedForward]:
    """The model's installed :class:`FusedForward`, if any."""
    fwd = model.__dict__.get("forward")
    return fwd if isinstance(fwd, FusedForward) else None


def enable(model: nn.Module, mode: str, device: torch.device,
           log: Callable[[str], None] = lambda s: sys.stderr.write(s + "\n")) -> Optional[FusedForward]:
    """Compile ``model``'s training forward for ``mode`` (``auto``: where available, ``on``: required,
    ``off``: never).  Returns the installed forward, or None when the run stays eager (``auto``
    says why in one line).  Idempotent: a model already fused keeps its compiled forward (and cache)."""
    from qformat.errors import UserError

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: use one of {COMPILE_MODES}")
    if mode == "off":
        return None
    existing = fused_of(model)
    if existing is not None:
        return existing
    why = availability(device) or not_ready(model)
    if why is not None:
        if mode == "on":
            raise UserError(f"--compile on: cannot compile the training step here ({why}); use --compile off")
        log(f"note: --compile auto: {why}; training runs eager")
        return None
    return FusedForward(model)
