"""Checkpoints: ``<stem>.safetensors`` (weights + quantizer scales) and ``<stem>.json`` (metadata).

The metadata also rides inside the safetensors header, so a lone ``.safetensors`` file is
self-describing; the JSON beside it is what people and other tools read. Both are written
through :func:`qformat.io.atomic_write`, so a crash never leaves a half-written file.
The trainer's resume state (optimizer, scheduler, RNG) lives in ``<stem>.state.pt``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from qformat.errors import UserError
from qformat.io import atomic_write, read_json, write_json

FORMAT = "qvit-edge-checkpoint"
VERSION = 1
_HEADER_KEY = "qvit_meta"


def stem_of(path: str) -> str:
    """``runs/x/best.safetensors`` / ``runs/x/best.json`` / ``runs/x/best`` -> ``runs/x/best``."""
    path = os.fspath(path)
    for ext in (".safetensors", ".json", ".state.pt"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def save_checkpoint(path_stem: str, model_or_state: nn.Module | dict, meta: dict) -> str:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` atomically; return the safetensors path."""
    from safetensors.torch import save

    stem = stem_of(path_stem)
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # clone: safetensors refuses shared storage (tied weights, views) and we must not alias live params
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = dict(meta, format=FORMAT, format_version=VERSION)
    blob = save(tensors, metadata={_HEADER_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write(stem + ".safetensors", blob)
    write_json(stem + ".json", meta)
    return stem + ".safetensors"


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
    st = stem_of(path) + ".safetensors" if not path.endswith(".safetensors") else path
    if not os.path.isfile(st):
        raise UserError("checkpoint not found: {}".format(st))
    sd, meta = _load_safetensors(st)
    side = stem_of(st) + ".json"
    if os.path.isfile(side):  # the sidecar wins (people may edit class names), but must parse
        meta = read_json(side, what="checkpoint metadata")
        if not isinstance(meta, dict):
            raise _corrupt(side, "not a JSON object")
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
        from train.quant import prepare

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
        from train.quant import convert

        model = convert(model)
    return model.to(device).eval(), meta


def save_state(path: str, state: dict) -> None:
    """Atomically ``torch.save`` the resume state (optimizer, scheduler, RNG, counters)."""
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
    """The JSON metadata beside a checkpoint, or None when absent/unreadable (for reuse checks)."""
    p = stem_of(path) + ".json"
    try:
        with open(p, encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None
