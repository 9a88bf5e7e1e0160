"""The resolved configuration of a training run, hashed into its state so that ``--resume`` cannot drift.

Every flag of ``python -m train`` can change a number (learning rate, schedule length, batch caps,
augmentation seed, quantizer settings...) except the few in :data:`MAY_CHANGE_ON_RESUME`. A run
stores ``run_config`` (those flags) and ``run_config_hash`` in its metadata; ``--resume`` with any
other value is refused in one line listing what differs, before any work. A run saved before the
hash existed is compared on the keys it has, with a note saying so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Optional

from qformat.errors import UserError

#: Flags that may differ between a run and its ``--resume``: they change where or how visibly a run
#: goes, never a number it computes.
MAY_CHANGE_ON_RESUME = frozenset({"workers", "stop_after_epochs", "no_tensorboard", "resume", "force", "out"})


def _plain(value):
    """A JSON-stable form of one flag value (paths stay strings; anything else by its repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return repr(value)


def run_config(args: argparse.Namespace) -> dict:
    """The flags of ``args`` that a resumed run must keep (callables, e.g. a sub-command's handler, skipped)."""
    return {k: _plain(v) for k, v in sorted(vars(args).items())
            if k not in MAY_CHANGE_ON_RESUME and not k.startswith("_") and not callable(v)}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def stamp(args: argparse.Namespace) -> dict:
    """``{"run_config": ..., "run_config_hash": ...}`` for a run's metadata."""
    cfg = run_config(args)
    return {"run_config": cfg, "run_config_hash": config_hash(cfg)}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def diff(old: dict, new: dict) -> str:
    """``--lr 0.0005 -> 0.001, --max-train-batches None -> 5`` (flags only one side has: ``(absent)``)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "(absent)") != new.get(k, "(absent)"))
    return ", ".join("{} {} -> {}".format(_flag(k), old.get(k, "(absent)"), new.get(k, "(absent)")) for k in keys)


def check_resume(out: str, saved: dict, current: dict) -> Optional[str]:
    """Refuse (one-line :class:`UserError`) a ``--resume`` whose flags differ from the run saved in ``out``;
    returns a note for a run saved before configurations were hashed (then the caller compares what it has)."""
    if not saved.get("run_config_hash"):
        return ("note: --resume: {} was saved before runs recorded their full configuration; only its model, "
                "method, data, seed, epochs, batch size and quantizer settings are compared".format(out))
    if saved["run_config_hash"] == current["run_config_hash"]:
        return None
    changed = diff(saved.get("run_config") or {}, current["run_config"]) or "the configuration hash"
    raise UserError("--resume: {} was started with other flags ({}); resume with the flags it was started with, or "
                    "use another --out (only {} may change)".format(
                        out, changed, ", ".join(_flag(k) for k in sorted(MAY_CHANGE_ON_RESUME - {"resume", "out"}))))


def check_folder(out: str, args: argparse.Namespace) -> list:
    """The early check of :func:`check_resume` from the checkpoints' metadata in ``out`` (and its teacher/),
    before data loads; returns the notes to print."""
    from train import checkpoint as ckpt

    current, notes = stamp(args), []
    for sub in ("", "teacher"):
        saved = ckpt.read_meta(os.path.join(out, sub, "last.json"))
        if saved is not None:
            note = check_resume(os.path.join(out, sub) if sub else out, saved, current)
            if note:
                notes.append(note)
    return notes
