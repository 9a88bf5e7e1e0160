"""Start from weights of your own: a timm checkpoint on disk (``--init-from``), or timm's pretrained
weights from the local cache (``--pretrained``: no network when they are there).

``--init-from`` takes a ``.safetensors`` file, a ``.pth`` / ``.pt`` / ``.bin`` state dict (or a dict
holding one under ``state_dict`` / ``model``), or a folder holding ``model.safetensors`` /
``pytorch_model.bin`` (a timm or Hugging Face model folder, a cache snapshot, or the
``models--org--name`` cache folder itself).  Keys go through timm's own remapping for the model
family (``checkpoint_filter_fn``: older layouts, position embeddings resized to the model's grid);
a classifier of another size starts fresh, said in one line; any other difference is one
``error:`` line naming it, before training starts.  The preprocessing (mean, std, interpolation,
crop) follows the weights' ``pretrained_cfg`` -- the folder's ``config.json``, else timm's for the
architecture -- wherever it fits the model's input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

from qformat.errors import UserError

#: what a model folder holds, preferred first (timm's hub layout writes both names)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class InitSource:
    path: str  # the weights file
    cfg: Optional[dict]  # its pretrained_cfg, when the folder says (config.json) or timm knows it
    what: str  # how messages name it: "--init-from X" / "--pretrained (timm/...)"


def _snapshot(folder: str) -> str:
    """A ``models--org--name`` cache folder -> the snapshot ``refs/main`` points at (else the newest)."""
    snaps = os.path.join(folder, "snapshots")
    if not os.path.isdir(snaps):
        return folder
    try:
        with open(os.path.join(folder, "refs", "main")) as f:
            ref = os.path.join(snaps, f.read().strip())
        if os.path.isdir(ref):
            return ref
    except OSError:
        pass
    found = sorted((os.path.join(snaps, d) for d in os.listdir(snaps)), key=os.path.getmtime)
    return found[-1] if found else folder


def _folder_cfg(folder: str) -> Optional[dict]:
    """``pretrained_cfg`` of a timm hub ``config.json`` in ``folder`` (None when absent or not timm's)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg.get("pretrained_cfg") if isinstance(cfg, dict) and isinstance(cfg.get("pretrained_cfg"), dict) else None


def resolve(path: str) -> InitSource:
    """The weights file and pretrained_cfg behind ``--init-from PATH``, or a one-line refusal."""
    what = "--init-from " + path
    if not os.path.exists(path):
        raise UserError("{}: no such file or folder".format(what))
    if os.path.isdir(path):
        folder = _snapshot(path)
        found = [os.path.join(folder, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))]
        if not found:
            raise UserError("{} holds none of {}: give the weights file itself, or a timm / Hugging Face model "
                            "folder".format(what, ", ".join(WEIGHT_FILES)))
        return InitSource(found[0], _folder_cfg(folder), what)
    if not path.endswith(SUFFIXES):
        raise UserError("{}: expected a {} file or a model folder".format(what, " / ".join(SUFFIXES)))
    return InitSource(path, _folder_cfg(os.path.dirname(os.path.abspath(path))), what)


def _hub_cfg(timm_name: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise UserError("timm has no pretrained weights for {}: use --init-from FILE".format(timm_name))
    return cfg.to_dict()


def pretrained(timm_name: str) -> InitSource:
    """timm's default pretrained weights of ``timm_name`` from the local Hugging Face cache (no network);
    fetched only when absent and the hub is not set offline; else one line saying how to get them."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cfg = _hub_cfg(timm_name)
    hub = cfg.get("hf_hub_id")
    what = "--pretrained ({})".format(hub or timm_name)
    for name in WEIGHT_FILES if hub else ():
        cached = try_to_load_from_cache(hub, name)
        if isinstance(cached, str):
            return InitSource(cached, _folder_cfg(os.path.dirname(cached)) or cfg, what)
    fetch = ("--pretrained: the weights of {} ({}) are not in the local cache ({}); fetch them once where there is "
             "internet: python -c \"import timm; timm.create_model('{}', pretrained=True)\" (then copy that cache "
             "folder here, or pass the file with --init-from)").format(timm_name, hub, constants.HF_HUB_CACHE,
                                                                       timm_name)
    if not hub or constants.HF_HUB_OFFLINE:
        raise UserError(fetch)
    try:
        return InitSource(hf_hub_download(hub, WEIGHT_FILES[0]), cfg, what)
    except Exception as e:  # noqa: BLE001 - offline, proxy, hub errors: all mean "not here"
        raise UserError("{} ({})".format(fetch, type(e).__name__)) from None


def with_preprocessing(spec, cfg: Optional[dict]):
    """``spec`` with the mean, std, interpolation and crop of ``cfg`` (a pretrained_cfg) where they fit its input."""
    if not cfg or tuple(cfg.get("input_size") or ()) != tuple(spec.input_size):
        return spec
    c = int(spec.input_size[0])
    mean, std = tuple(cfg.get("mean") or spec.mean), tuple(cfg.get("std") or spec.std)
    if len(mean) not in (1, c) or len(std) not in (1, c):
        return spec
    return dataclasses.replace(spec, mean=mean, std=std, interpolation=cfg.get("interpolation") or spec.interpolation,
                               crop_pct=float(cfg.get("crop_pct") or spec.crop_pct))


def _shape(t) -> str:
    return "[{}]".format(", ".join(str(int(v)) for v in t.shape))


def _mismatch(own: dict, sd: dict) -> str:
    """What differs between a state dict and the model, in a few words."""
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    parts = ["{} is {} there, {} here".format(k, _shape(sd[k]), _shape(own[k])) for k in shapes[:2]]
    if len(shapes) > 2:
        parts.append("{} more shapes differ".format(len(shapes) - 2))
    if missing:
        parts.append("missing {}{}".format(", ".join(missing[:3]), " (+{})".format(len(missing) - 3)
                                           if len(missing) > 3 else ""))
    if extra:
        parts.append("not in the model {}{}".format(", ".join(extra[:3]), " (+{})".format(len(extra) - 3)
                                                    if len(extra) > 3 else ""))
    return "; ".join(parts)


def _head_keys(model: nn.Module) -> list:
    from train.families import family_of

    return ["{}.{}".format(name, p) for name, lin in family_of(model).heads(model) for p, _ in lin.named_parameters()]


def load_into(model: nn.Module, src: InitSource, say: bool = True) -> list:
    """Load ``src`` into the float ``model``; return the classifier keys that start fresh (another class
    count, or a headless checkpoint), said in one line unless ``say`` is False."""
    from train import checkpoint as ckpt
    from train.families import family_of

    sd, meta = ckpt.load_checkpoint(src.path, require_meta=False)
    if meta.get("quant"):
        raise UserError("{} is a quantized checkpoint; pass full-precision weights (use --resume to continue QAT)"
                        .format(src.what))
    if not meta:  # foreign weights: timm's own remapping for this family
        try:
            sd = family_of(model).filter_checkpoint(dict(sd), model)
        except Exception as e:  # noqa: BLE001 - a filter that trips on foreign keys: say which file
            raise UserError("{} cannot be remapped to {} by timm's checkpoint filter ({}: {})".format(
                src.what, getattr(model, "qvit_name", type(model).__name__), type(e).__name__,
                str(e).splitlines()[0] if str(e) else "")) from None
    own = model.state_dict()
    fresh = [k for k in _head_keys(model) if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    rest_own = dict((k, v) for k, v in own.items() if k not in fresh)
    rest_sd = dict((k, v) for k, v in sd.items() if k not in fresh)
    if set(rest_sd) != set(rest_own) or any(tuple(v.shape) != tuple(rest_sd[k].shape) for k, v in rest_own.items()):
        raise UserError("{} does not fit --model {}: {}".format(
            src.what, getattr(model, "qvit_name", type(model).__name__), _mismatch(rest_own, rest_sd)))
    if fresh and say:
        head_w = next((k for k in fresh if k.endswith("weight") and k in sd), None)
        had = "{} classes".format(int(sd[head_w].shape[0])) if head_w else "no classifier"
        sys.stderr.write("note: {} has {}, this run has {}: the classifier head ({}) starts fresh\n".format(
            src.what, had, int(own[fresh[0]].shape[0]), ", ".join(fresh)))
    for k in fresh:
        sd[k] = own[k]
    model.load_state_dict(sd, strict=True)
    return fresh
