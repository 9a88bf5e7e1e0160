"""Checkpoints: ``<stem>.safetensors`` (weights + quantizer scales) and ``<stem>.json`` (metadata).

The metadata also rides inside the safetensors header, so a lone ``.safetensors`` file is
self-describing; the JSON beside it is what people and other tools read. Both are written
through :func:`qformat.io.atomic_write`, so a crash never leaves a half-written file, and
both carry the same ``save_id``: a JSON left from an earlier save (the process died between
the two renames) is recognised on load and the header's metadata is used instead.

The trainer's resume state lives in ``last.state.pt`` and is *one file*: weights, metadata,
optimizer, scheduler, RNG and the metrics rows, renamed into place in one step. ``--resume``
reads only that file, so it can never combine weights of one epoch with state of another;
``last.*`` and ``metrics.csv`` are copies derived from it (and repaired from it on resume).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import uuid
from typing import Any, Optional

import torch
from torch import nn

from qformat import files
from qformat.errors import UserError
from qformat.io import atomic_write, read_json, remove_stale_temps, write_json

FORMAT = "qvit-edge-checkpoint"
VERSION = 1
_HEADER_KEY = "qvit_meta"
#: What a training run writes into its --out folder (and into --out/teacher/ for a teacher trained there).
RUN_FILES = ("last.state.pt", "last.safetensors", "last.json", "best.safetensors", "best.json", "metrics.csv")
#: Every path (relative to --out) a run may write, for the up-front path-length check: the teacher's files
#: sit one folder deeper, TensorBoard's event files have the longest names.
RUN_OUTPUTS = tuple(os.path.join("teacher", n) for n in RUN_FILES) + (
    os.path.join("teacher", "tb", "events.out.tfevents.0000000000.{}.0000000.0".format(os.uname().nodename)),)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stem_of(path: str) -> str:
    """``runs/x/best.safetensors`` / ``runs/x/best.json`` / ``runs/x/best`` -> ``runs/x/best``."""
    path = os.fspath(path)
    for ext in (".safetensors", ".json", ".state.pt"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def new_save_id() -> str:
    return uuid.uuid4().hex


def cpu_state(model_or_state: nn.Module | dict) -> dict:
    """Detached, contiguous CPU copies of a state dict (never aliases the live parameters)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # clone: safetensors refuses shared storage (tied weights, views)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(path_stem: str, model_or_state: nn.Module | dict, meta: dict) -> str:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` atomically; return the safetensors path.
    Both get ``meta["save_id"]`` (a new one when absent), which :func:`load_checkpoint` compares."""
    from safetensors.torch import save

    stem = stem_of(path_stem)
    meta = dict(meta, format=FORMAT, format_version=VERSION, save_id=meta.get("save_id") or new_save_id())
    blob = save(cpu_state(model_or_state), metadata={_HEADER_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write(stem + ".safetensors", blob)
    write_json(stem + ".json", meta)
    return stem + ".safetensors"


def header_meta(path: str) -> Optional[dict]:
    """The metadata inside a ``.safetensors`` header, read without the tensors; None if absent/unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return None
            header = json.loads(f.read(n))
        meta = json.loads(header.get("__metadata__", {}).get(_HEADER_KEY, "null"))
    except (OSError, ValueError, struct.error, AttributeError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def _sidecar_wins(side: dict, header: dict) -> bool:
    """The JSON wins (people may edit class names) unless the header says it belongs to another save."""
    return not header.get("save_id") or side.get("save_id") == header.get("save_id")


def _corrupt(path: str, why: Any) -> UserError:
    return UserError("checkpoint {} is corrupt or truncated ({}); re-create it (re-run training)".format(
        path, str(why).splitlines()[0] if str(why) else type(why).__name__))


def _load_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types and OSError/ValueError
        raise _corrupt(path, e) from None
    meta = {}
    if _HEADER_KEY in header:
        try:
            meta = json.loads(header[_HEADER_KEY])
        except ValueError as e:
            raise _corrupt(path, e) from None
    return sd, meta


def _load_torch(path: str) -> dict:
    """A timm/DeiT ``.pth``: either a state dict or a dict holding one under a usual key."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of many kinds
        raise _corrupt(path, e) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state", "model_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("{} does not hold a model state dict (expected a timm checkpoint or our .safetensors)"
                        .format(path))
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_checkpoint(path: str, require_meta: bool = True) -> tuple[dict, dict]:
    """Return (state_dict, meta). ``require_meta=False`` also accepts foreign weights
    (timm ``.pth``/``.safetensors`` state dicts) and returns ``meta={}`` for them."""
    path = os.fspath(path)
    if path.endswith((".pth", ".pt", ".bin")) and not path.endswith(".state.pt"):
        if not os.path.isfile(path):
            raise UserError("checkpoint not found: {}".format(path))
        if require_meta:
            raise UserError("{} is a plain state dict, not a qvit-edge checkpoint (train one with "
                            "python -m train, or pass it as --checkpoint)".format(path))
        return _load_torch(path), {}
    if os.path.isfile(path) and not path.endswith((".safetensors", ".json")):
        files.require(path, files.CHECKPOINT)  # notes.txt: "a text file", not "not found: notes.txt.safetensors"
        st = path
    else:
        st = stem_of(path) + ".safetensors" if not path.endswith(".safetensors") else path
    if not os.path.isfile(st):
        raise UserError("checkpoint not found: {}".format(st))
    sd, meta = _load_safetensors(st)
    side = stem_of(st) + ".json"
    if os.path.isfile(side):  # the sidecar wins (people may edit class names), but must parse and match
        side_meta = read_json(side, what="checkpoint metadata")
        if not isinstance(side_meta, dict):
            raise _corrupt(side, "not a JSON object")
        if _sidecar_wins(side_meta, meta):
            meta = side_meta
        else:
            sys.stderr.write("note: {} is from an earlier save than {} (a save was interrupted); using the "
                             "metadata stored inside {}\n".format(side, st, os.path.basename(st)))
    if meta.get("format") != FORMAT:
        if require_meta:
            raise UserError("{} is not a qvit-edge checkpoint (no metadata); train one with python -m train"
                            .format(st))
        meta = {}
    return sd, meta


def build_model(meta: dict) -> nn.Module:
    """Rebuild the (prepared, if quantized) model a checkpoint was trained as, weights not loaded."""
    from train.models import create_model

    model = create_model(meta["model"], num_classes=meta.get("num_classes"))
    if meta.get("quant"):
        from train.config import QuantConfig
        from train.qat import prepare

        prepare(model, QuantConfig.from_dict(meta["quant"]))
    return model


def load_state(model: nn.Module, sd: dict, path: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not match."""
    from train.mixedbits import check_allocation

    check_allocation(model, sd, path)  # a learned bit allocation that does not fit: say so first
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        def few(keys: list) -> str:
            return ", ".join(keys[:3]) + (" ... ({} in all)".format(len(keys)) if len(keys) > 3 else "")
        parts = [p for p in ("missing: " + few(missing) if missing else "",
                             "unexpected: " + few(unexpected) if unexpected else "",
                             "shape mismatch: " + few(shapes) if shapes else "") if p]
        raise UserError("{} does not fit the model ({}); check --model / --num-classes".format(path, "; ".join(parts)))
    model.load_state_dict(sd, strict=True)


def load_converted(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Checkpoint -> (eval-mode model with frozen integer weights, meta). For the exporter/runtime."""
    sd, meta = load_checkpoint(path)
    for key in ("model", "input_size", "mean", "std", "class_names"):
        if key not in meta:
            raise UserError("checkpoint {} metadata lacks {!r}; re-create it with python -m train".format(path, key))
    model = build_model(meta)
    load_state(model, sd, path)
    if meta.get("quant"):
        from train.qat import convert

        model = convert(model)
    return model.to(device).eval(), meta


def save_state(path: str, state: dict) -> None:
    """Atomically ``torch.save`` the resume state: one file that commits an epoch (weights under
    ``"model"``, their ``"meta"``, optimizer, scheduler, RNG, counters and metrics ``"rows"``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_state_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError("no training state to resume at {}; drop --resume to start a new run".format(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _corrupt(path, e) from None


def read_meta(path: str) -> Optional[dict]:
    """The metadata of a checkpoint (its JSON when that belongs to the weights, else the header's copy),
    or None when absent/unreadable (for reuse checks and summaries)."""
    header = header_meta(stem_of(path) + ".safetensors")
    try:
        with open(stem_of(path) + ".json", encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError):
        side = None
    meta = side if isinstance(side, dict) and (header is None or _sidecar_wins(side, header)) else header
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _sidecar_id(stem: str) -> Optional[str]:
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError):
        return None
    return side.get("save_id") if isinstance(side, dict) else None


def is_current(path_stem: str, save_id: str) -> bool:
    """Whether ``<stem>.safetensors`` and ``<stem>.json`` both belong to the save ``save_id``."""
    stem = stem_of(path_stem)
    return (header_meta(stem + ".safetensors") or {}).get("save_id") == save_id and _sidecar_id(stem) == save_id


def repair_sidecar(path_stem: str) -> bool:
    """Rewrite ``<stem>.json`` from the weights' header when a kill left it from an earlier save."""
    stem = stem_of(path_stem)
    header = header_meta(stem + ".safetensors")
    if not header or not header.get("save_id") or _sidecar_id(stem) == header["save_id"]:
        return False
    write_json(stem + ".json", header)
    return True


def run_files(out: str) -> list:
    """The files of an earlier training run in ``out`` (relative names; empty when there is none)."""
    found = []
    for sub in ("", "teacher"):
        d = os.path.join(out, sub)
        found += [os.path.join(sub, n) for n in RUN_FILES if os.path.isfile(os.path.join(d, n))]
    return found


def remove_run(out: str) -> list:
    """Delete an earlier run's files in ``out`` (checkpoints, state, metrics, tb/, teacher/); return them.
    Other files in the folder are left alone."""
    removed = []
    for sub in ("teacher", ""):
        d = os.path.join(out, sub)
        for n in RUN_FILES:
            if os.path.isfile(os.path.join(d, n)):
                os.unlink(os.path.join(d, n))
                removed.append(os.path.join(sub, n))
        if os.path.isdir(os.path.join(d, "tb")):
            shutil.rmtree(os.path.join(d, "tb"))
            removed.append(os.path.join(sub, "tb"))
        remove_stale_temps(d)
        if sub and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
    return removed
