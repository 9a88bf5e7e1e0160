"""Which images a model trained on, and which a run validates on: recorded, and checked for overlap.

A checkpoint's metadata carries ``images`` (the training images of this run) and ``ancestors`` (the
``images`` records of the FP weights it started from and, for a student, of its teacher): the data
set's content id, the split the images come from, the ``--holdout`` settings that carved it and the
sha256 of the sorted index set (the index list itself when small).  Before a run trains, every
model whose outputs or weights feed it -- ``--teacher``, ``--checkpoint``, the teacher behind a
``--multicrop-kd`` store -- is checked against the run's validation images: an overlap is refused in
one line (the "held-out" accuracy would be scored on images the teacher has seen).  A record cannot
lie about a split: the index set is recomputed from (data set, holdout, seed) and its hash compared.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from typing import Optional

import numpy as np

from qformat.errors import UserError
from qformat.io import read_json
from train.checkpoint import read_meta

#: data sets whose runs record their images (every ``--data`` the trainer reads)
IMAGE_DATA = ("fmnist", "synthetic", "imagefolder")
#: index lists up to this many images are stored verbatim (small synthetic sets); larger ones by hash
SMALL = 2048
RECORD_KEYS = ("data", "dataset", "split", "holdout", "holdout_seed", "count", "sha256")


def index_hash(indices) -> str:
    """sha256 of a sorted int64 index set (the identity of a split)."""
    return hashlib.sha256(np.sort(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()


@functools.lru_cache(maxsize=8)
def _train_labels(data: str, data_dir: Optional[str], seed: int, synthetic_n: int) -> tuple[str, np.ndarray]:
    """(content id, labels of the training split) of ``data``: what a holdout is carved from."""
    if data == "fmnist":
        from train.data import load_fmnist

        images, labels = load_fmnist(data_dir, "train")
        h = hashlib.sha256(images.tobytes())
        h.update(labels.astype(np.int64).tobytes())
        return "fmnist-train:" + h.hexdigest()[:16], labels
    if data == "synthetic":
        from train.data import Synthetic

        plain = Synthetic(synthetic_n, (1, 28, 28), seed=seed, split="train")
        plain.train = False
        labels = np.array([plain[i][1] for i in range(len(plain))])
        return "synthetic:" + json.dumps([synthetic_n, seed]), labels
    raise UserError("no image record for --data {}".format(data))


def split_indices(data: str, data_dir: Optional[str], holdout: int, seed: int = 0,
                  synthetic_n: int = 512) -> tuple[str, np.ndarray, np.ndarray]:
    """(content id, train indices, validation indices) of the training split under ``--holdout``
    (validation empty when ``holdout`` is 0: the run then validates on the test split)."""
    from train.data import HOLDOUT_SEED, stratified_holdout

    ident, labels = _train_labels(data, data_dir, seed, synthetic_n)
    if not holdout:
        return ident, np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    tr, va = stratified_holdout(labels, holdout, HOLDOUT_SEED)
    return ident, tr, va


def _record(data: str, ident: str, split: str, holdout: int, indices: Optional[np.ndarray]) -> dict:
    from train.data import HOLDOUT_SEED

    rec = {"data": data, "dataset": ident, "split": split, "holdout": int(holdout), "holdout_seed": HOLDOUT_SEED}
    if indices is not None:
        rec.update(count=int(len(indices)), sha256=index_hash(indices))
        if len(indices) <= SMALL:
            rec["indices"] = [int(i) for i in np.sort(indices)]
    return rec


def run_images(data: str, data_dir: Optional[str], holdout: int, seed: int = 0) -> tuple[dict, dict]:
    """(training images, validation images) of a run, as records."""
    if data == "imagefolder":
        ident = "imagefolder:" + os.path.realpath(data_dir or ".")
        return _record(data, ident, "train", 0, None), _record(data, ident, "val", 0, None)
    ident, tr, va = split_indices(data, data_dir, holdout, seed)
    val = _record(data, ident, "train", holdout, va) if holdout else _record(data, ident, "test", 0, None)
    return _record(data, ident, "train", holdout, tr), val


def lineage(meta: dict) -> Optional[list]:
    """Every training-image record behind a checkpoint (its own and its ancestors'); None when the
    checkpoint predates these records and its settings cannot rebuild them."""
    if meta.get("images"):
        return [meta["images"]] + [r for r in meta.get("ancestors") or [] if r]
    if meta.get("data") in ("fmnist", "synthetic") and "holdout" in meta and not meta.get("teacher"):
        # written before the record existed, but by a trainer that recorded its split: rebuild it
        rec = {"data": meta["data"], "dataset": None, "split": "train", "holdout": int(meta["holdout"] or 0),
               "rebuilt_from_seed": int(meta.get("seed", 0))}
        return [rec]
    return None


def _indices(rec: dict, data_dir: Optional[str]) -> Optional[np.ndarray]:
    """The index set a record names (recomputed and checked against its hash); None if it cannot be."""
    if rec.get("indices") is not None:
        return np.asarray(rec["indices"], dtype=np.int64)
    if rec["data"] not in ("fmnist", "synthetic"):
        return None
    seed = int(rec.get("rebuilt_from_seed", 0))
    if rec["data"] == "synthetic" and rec.get("dataset"):
        seed = int(json.loads(rec["dataset"].split(":", 1)[1])[1])
    ident, tr, va = split_indices(rec["data"], data_dir, rec["holdout"], seed)
    if rec.get("dataset") not in (None, ident):
        return None
    out = tr if rec["split"] == "train" else None
    if out is None or (rec.get("sha256") and index_hash(out) != rec["sha256"]):
        return None
    return out


def overlap(val: dict, trained: dict, data_dir: Optional[str]) -> Optional[int]:
    """How many of ``val``'s images ``trained`` contains: 0 for other data or another split, None
    when it cannot be told (another copy of the data, a split recipe that no longer reproduces)."""
    if val["data"] != trained["data"] or val["split"] != trained["split"]:
        return 0
    if val.get("count") == 0:
        return 0
    if trained.get("dataset") and val.get("dataset") and trained["dataset"] != val["dataset"]:
        return None if val["data"] == "fmnist" else 0
    va, tr = _indices_val(val, data_dir), _indices(trained, data_dir)
    if va is None or tr is None:
        return None
    return int(np.intersect1d(va, tr).size)


def _indices_val(rec: dict, data_dir: Optional[str]) -> Optional[np.ndarray]:
    if rec.get("indices") is not None:
        return np.asarray(rec["indices"], dtype=np.int64)
    if rec["data"] == "imagefolder":
        return None
    seed = int(json.loads(rec["dataset"].split(":", 1)[1])[1]) if rec["data"] == "synthetic" else 0
    _, _, va = split_indices(rec["data"], data_dir, rec["holdout"], seed)
    return va if index_hash(va) == rec.get("sha256") else None


def check_no_leak(val: dict, sources: list, data_dir: Optional[str], notes: bool = True) -> None:
    """Refuse (one line) when a source's training images include this run's validation images.
    ``sources``: (what, path, lineage or None) per model feeding the run; a source without a
    record gets one ``note:`` line (unless ``notes`` is off) saying the overlap cannot be checked, and how
    to fix that."""
    for what, path, records in sources:
        if records is None:
            if notes:
                sys.stderr.write("note: {} {} does not record which images it trained on (made before this check "
                                 "existed): its overlap with this run's validation images cannot be checked; "
                                 "retrain it with this code (python -m train --method fp --holdout {}) to have it "
                                 "checked\n".format(what, path, val.get("holdout", 0)))
            continue
        for rec in records:
            n = overlap(val, rec, data_dir)
            if n is None and notes:
                sys.stderr.write("note: {} {} trained on {} images of {} whose overlap with this run's validation "
                                 "split cannot be recomputed (other data files or split recipe); retrain it with "
                                 "this code to have it checked\n".format(what, path, rec.get("count", "?"),
                                                                         rec["data"]))
            elif n:
                raise UserError("{} {} trained on {} of this run's {} validation images (it held out {} images, this "
                                "run --holdout {}): its accuracy would be scored on images it has seen; use the "
                                "teacher's --holdout {} or a teacher trained with --holdout {}".format(
                                    what, path, n, val.get("count"), rec.get("holdout"), val.get("holdout"),
                                    rec.get("holdout"), val.get("holdout")))


# ----------------------------------------------------------------------------- a run's command line

def image_records(args: argparse.Namespace) -> dict:
    """A run's metadata keys ``images`` (what it trains on) and ``val_images`` (what it validates on)."""
    if args.data not in IMAGE_DATA:
        return {"images": None, "val_images": None}
    train, val = run_images(args.data, args.data_dir, args.holdout, args.seed)
    return {"images": train, "val_images": {k: v for k, v in val.items() if k != "indices"}}


def _sources(args: argparse.Namespace) -> list:
    """(what, path, lineage) of every model whose weights or outputs feed this run."""
    out, seen = [], set()
    for what, path in (("--teacher", args.teacher), ("--checkpoint", args.checkpoint)):
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append((what, path, lineage(read_meta(path) or {})))
    store = getattr(args, "multicrop_kd", None)
    if store:  # train.cli has checked it is a finished store (train.softlabels.read_store_manifest)
        manifest = read_json(os.path.join(store, "manifest.json"), "soft-label manifest")
        out.append(("--multicrop-kd store", store, manifest.get("teacher_images")))
    return out


def ancestors(args: argparse.Namespace, fp_path: Optional[str]) -> list:
    """The training-image records behind this run's initial weights and teacher (None entries: unknown)."""
    out = []
    for path in dict.fromkeys(p for p in (args.checkpoint, args.teacher, fp_path) if p and os.path.isfile(p)):
        out += lineage(read_meta(path) or {}) or [None]
    return out


def check_sources(args: argparse.Namespace) -> None:
    """Before any work: no model feeding this run has trained on its validation images."""
    if args.data not in IMAGE_DATA or args.pretrained or not args.holdout:
        return  # validation on the test split (or val/): no model trained here has seen it
    val = run_images(args.data, args.data_dir, args.holdout, args.seed)[1]
    check_no_leak(val, _sources(args), args.data_dir)
