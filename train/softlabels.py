"""``python -m train.softlabels`` / ``qvit softlabels``: the multi-crop soft-label store of VVTQ (FKD-style).

Before QAT, the FP teacher labels ``M`` random crops of every training image once; training then
reads the crops' parameters and the teacher's top-k probabilities from the store and never runs
the teacher (``python -m train --multicrop-kd STORE``).  A store is a folder::

    manifest.json            what it was made from -- data set and its content fingerprint,
                             teacher file and its sha256, model input, crops, top-k, augmentation,
                             seed -- the training images and the teacher's (``images``,
                             ``teacher_images``: train/provenance.py, checked against a run's
                             validation split) -- and one entry per finished chunk (file, images, sha256)
    chunk-00000.safetensors  index [n] (training-set positions), box [n, M, 4] (top, left, height,
                             width in source pixels), flip [n, M], topk_index / topk_prob [n, M, k]

Chunks are written atomically and listed in the manifest when done, so an interrupted run
continues where it stopped (same command); each chunk's crops come from a generator seeded by
(seed, chunk), so a resumed store equals one written in one go.  Every chunk's sha256 is checked
when it is read.  Training refuses a store made for other data, another teacher or another
model input with one ``error:`` line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from qformat.argtypes import fraction, nonneg_int, positive_float, positive_int, seed_int
from qformat.cli import parser
from qformat.errors import UserError, main_guard
from qformat.io import atomic_write, read_json, sha256_file, write_json
from train.data import FashionMNIST, Synthetic, adapt
from train.provenance import check_no_leak, lineage, run_images

FORMAT = "qvit-softlabels"
VERSION = 1
MANIFEST = "manifest.json"
#: manifest keys that define a store: a resumed run must ask for exactly these
HEADER_KEYS = ("format", "version", "data", "teacher", "input", "num_classes", "crops", "topk", "augment", "seed",
               "chunk_size")


# ----------------------------------------------------------------------------- the training images, un-augmented

class Source:
    """A training set seen as raw images: ``pixels(i)`` (``[C, h, w]`` before the model's resize and
    normalisation), ``label(i)``, ``finish(crop)`` (-> model input) and a content fingerprint."""

    def __init__(self, ds: Dataset):
        self.ds, self.indices = ds, None
        if isinstance(ds, Subset):
            self.ds, self.indices = ds.dataset, np.asarray(ds.indices, dtype=np.int64)
        if isinstance(self.ds, Synthetic):  # its training shift is augmentation: the store crops the plain image
            self.ds = copy.copy(self.ds)
            self.ds.train = False
        elif not isinstance(self.ds, FashionMNIST):
            raise UserError("--multicrop-kd / train.softlabels work with --data fmnist or synthetic "
                            f"(in-memory images); got {type(self.ds).__name__}")

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.ds)

    def _base(self, i: int) -> int:
        return int(self.indices[i]) if self.indices is not None else int(i)

    def pixels(self, i: int) -> torch.Tensor:
        j = self._base(i)
        if isinstance(self.ds, FashionMNIST):
            return self.ds.images[j].unsqueeze(0).float().div_(255.0)
        return self.ds[j][0]

    def label(self, i: int) -> int:
        j = self._base(i)
        return int(self.ds.labels[j]) if isinstance(self.ds, FashionMNIST) else int(self.ds[j][1])

    def labels(self) -> torch.Tensor:
        if isinstance(self.ds, FashionMNIST):
            lab = self.ds.labels.to(torch.int64)
            return lab if self.indices is None else lab[torch.from_numpy(self.indices)]
        return torch.tensor([self.label(i) for i in range(len(self))], dtype=torch.int64)

    def finish(self, crop: torch.Tensor) -> torch.Tensor:
        if isinstance(self.ds, FashionMNIST):
            return adapt(crop, self.ds.input_size, self.ds.mean, self.ds.std)
        size = tuple(self.ds.input_size[1:])
        if tuple(crop.shape[-2:]) == size:
            return crop
        return F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]

    def source_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.pixels(0).shape[-2:])

    def fingerprint(self) -> str:
        """sha256 of what the images are: Fashion-MNIST's bytes and labels, or the synthetic set's recipe;
        plus the positions a hold-out kept."""
        h = hashlib.sha256()
        if isinstance(self.ds, FashionMNIST):
            h.update(self.ds.images.numpy().tobytes())
            h.update(self.ds.labels.numpy().astype(np.int64).tobytes())
        else:
            h.update(json.dumps([self.ds.n, self.ds.seed, list(self.ds.input_size), self.ds.num_classes,
                                 self.ds.noise]).encode())
        if self.indices is not None:
            h.update(self.indices.tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- crops

@dataclasses.dataclass
class Augment:
    """RandomResizedCrop + horizontal flip, as FKD/VVTQ label them (torchvision's sampling rule)."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0

    def sample(self, rng: np.random.Generator, n: int, crops: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes int16 [n, crops, 4] as (top, left, height, width), flips uint8 [n, crops])."""
        boxes = np.empty((n * crops, 4), dtype=np.int16)
        for k in range(n * crops):
            boxes[k] = self._box(rng, h, w)
        flips = (rng.random(n * crops) < self.flip).astype(np.uint8)
        return boxes.reshape(n, crops, 4), flips.reshape(n, crops)

    def _box(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_r))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        return 0, 0, h, w  # the whole image, as torchvision's fallback does for square images


def render(source: Source, i: int, box: Sequence[int], flip: int) -> torch.Tensor:
    """The model input of crop ``box`` (top, left, height, width) of training image ``i``."""
    t, left, h, w = (int(v) for v in box)
    crop = source.pixels(i)[..., t:t + h, left:left + w]
    if flip:
        crop = crop.flip(-1)
    return source.finish(crop)


def recover(topk_index: torch.Tensor, topk_prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full probability vectors from top-k: the stored k as they are, the rest of the mass spread evenly
    over the other classes (FKD's "marginal smoothing")."""
    k = topk_index.shape[-1]
    rest = (1.0 - topk_prob.sum(-1, keepdim=True)).clamp(min=0.0) / max(num_classes - k, 1)
    out = rest.expand(*topk_prob.shape[:-1], num_classes).clone() if num_classes > k else \
        torch.zeros(*topk_prob.shape[:-1], num_classes)
    return out.scatter_(-1, topk_index.long(), topk_prob.float())


# ----------------------------------------------------------------------------- the store on disk

def _chunk_name(c: int) -> str:
    return f"chunk-{c:05d}.safetensors"


def store_header(source: Source, teacher_path: str, meta: dict, crops: int, topk: int, aug: Augment, seed: int,
                 chunk_size: int, data: str, holdout: int) -> dict:
    """Everything that defines a store (the manifest less its chunk list)."""
    return {
        "format": FORMAT, "version": VERSION,
        "data": {"name": data, "images": len(source), "holdout": holdout, "fingerprint": source.fingerprint(),
                 "source_size": list(source.source_size())},
        "teacher": {"path": os.path.abspath(teacher_path), "sha256": sha256_file(teacher_path),
                    "model": meta["model"]},
        "input": {"size": list(meta["input_size"]), "mean": list(meta["mean"]), "std": list(meta["std"])},
        "num_classes": int(meta["num_classes"]), "crops": crops, "topk": topk,
        "augment": {"scale": list(aug.scale), "ratio": list(aug.ratio), "flip": aug.flip}, "seed": seed,
        "chunk_size": chunk_size,
    }


def _diff(a: dict, b: dict) -> Optional[str]:
    for key in HEADER_KEYS:
        if a.get(key) != b.get(key):
            return f"{key}: {json.dumps(a.get(key), sort_keys=True)} vs {json.dumps(b.get(key), sort_keys=True)}"
    return None


def _chunk_ok(out: str, entry: dict) -> bool:
    path = os.path.join(out, entry["file"])
    return os.path.isfile(path) and sha256_file(path) == entry["sha256"]


@torch.no_grad()
def _label_chunk(teacher: torch.nn.Module, source: Source, first: int, count: int, header: dict, c: int,
                 batch_size: int, device: torch.device, bar) -> dict[str, torch.Tensor]:
    crops, k = header["crops"], header["topk"]
    aug = Augment(tuple(header["augment"]["scale"]), tuple(header["augment"]["ratio"]), header["augment"]["flip"])
    h, w = header["data"]["source_size"]
    boxes, flips = aug.sample(np.random.default_rng([header["seed"], c]), count, crops, h, w)
    jobs = [(i, m) for i in range(count) for m in range(crops)]
    idx = torch.empty(count * crops, k, dtype=torch.int16)
    prob = torch.empty(count * crops, k, dtype=torch.float32)
    for s in range(0, len(jobs), batch_size):
        part = jobs[s:s + batch_size]
        x = torch.stack([render(source, first + i, boxes[i, m], flips[i, m]) for i, m in part]).to(device)
        p = teacher(x).float().softmax(-1).cpu()
        top = p.topk(k, dim=-1)
        idx[s:s + len(part)], prob[s:s + len(part)] = top.indices.to(torch.int16), top.values
        bar.update(len(part) / crops)
    return {"index": torch.arange(first, first + count, dtype=torch.int64), "box": torch.from_numpy(boxes),
            "flip": torch.from_numpy(flips), "topk_index": idx.reshape(count, crops, k),
            "topk_prob": prob.reshape(count, crops, k)}


def write_store(out: str, teacher: torch.nn.Module, source: Source, header: dict, batch_size: int = 512,
                device: Optional[torch.device] = None, force: bool = False, progress: bool = True) -> dict:
    """Write (or continue) the store in ``out``; returns the finished manifest."""
    from safetensors.torch import save
    from tqdm import tqdm

    path = os.path.join(out, MANIFEST)
    manifest = dict(header, chunks=[], complete=False)
    if os.path.isfile(path) and not force:
        old = read_json(path, "soft-label manifest")
        why = _diff(old, header) if isinstance(old, dict) else "not a manifest"
        if why:
            raise UserError(f"{out} holds a soft-label store made with other settings ({why}); give another --out "
                            "or --force to replace it")
        manifest["chunks"] = [e for e in old.get("chunks", []) if _chunk_ok(out, e)]
    os.makedirs(out, exist_ok=True)
    write_json(path, manifest)
    done = {e["chunk"] for e in manifest["chunks"]}
    n, size = len(source), header["chunk_size"]
    device = device or torch.device("cpu")
    teacher = teacher.to(device).eval()
    with tqdm(total=n, initial=sum(e["count"] for e in manifest["chunks"]), unit="img", desc="soft labels",
              disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
        for c in range(math.ceil(n / size)):
            if c in done:
                continue
            first = c * size
            tensors = _label_chunk(teacher, source, first, min(size, n - first), header, c, batch_size, device, bar)
            blob = save(tensors, metadata={"format": FORMAT, "chunk": str(c)})
            atomic_write(os.path.join(out, _chunk_name(c)), blob)
            manifest["chunks"].append({"chunk": c, "file": _chunk_name(c), "first": first,
                                       "count": int(tensors["index"].numel()),
                                       "sha256": hashlib.sha256(blob).hexdigest()})
            manifest["chunks"].sort(key=lambda e: e["chunk"])
            write_json(path, manifest)
    manifest["complete"] = True
    write_json(path, manifest)
    return manifest


class SoftLabelStore:
    """A finished store, read and checked: crop boxes, flips and top-k labels of every training image."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_store_manifest(path)
        m = self.manifest
        self.digest = sha256_file(os.path.join(path, MANIFEST))
        parts = [self._read(e) for e in m["chunks"]]
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if not torch.equal(cat["index"], torch.arange(m["data"]["images"])):
            raise UserError(f"soft-label store {path} does not cover images 0..{m['data']['images'] - 1} in order; "
                            "rewrite it with python -m train.softlabels --force")
        self.box, self.flip = cat["box"], cat["flip"]
        self.topk_index, self.topk_prob = cat["topk_index"], cat["topk_prob"]

    def _read(self, entry: dict) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        file = os.path.join(self.path, entry["file"])
        try:
            with open(file, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise UserError(f"soft-label store {self.path}: cannot read {entry['file']} ({e}); re-run "
                            "python -m train.softlabels with the same flags to rewrite it") from None
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise UserError(f"soft-label store {self.path}: {entry['file']} fails its checksum (corrupt or edited); "
                            "re-run python -m train.softlabels with the same flags to rewrite it")
        return load(blob)

    def check(self, source: Source, teacher_path: Optional[str], input_size, mean, std) -> None:
        """One ``error:`` line when this store was made for other data, another teacher or model input."""
        m, where = self.manifest, f"soft-label store {self.path}"
        d = m["data"]
        fp = source.fingerprint()
        if d["fingerprint"] != fp or d["images"] != len(source):
            raise UserError(f"{where} labels {d['name']} ({d['images']} training images, holdout {d['holdout']}, "
                            f"fingerprint {d['fingerprint'][:12]}) but this run trains on {len(source)} other images "
                            f"(fingerprint {fp[:12]}); pass the store's --data/--holdout or write a store for this "
                            "data with python -m train.softlabels")
        if teacher_path is None:
            raise UserError(f"{where}: this run has no FP teacher to check it against; pass --teacher "
                            f"{m['teacher']['path']}")
        sha = sha256_file(teacher_path)
        if sha != m["teacher"]["sha256"]:
            raise UserError(f"{where} holds the labels of teacher {m['teacher']['path']} (sha256 "
                            f"{m['teacher']['sha256'][:12]}), but this run's teacher is {teacher_path} (sha256 "
                            f"{sha[:12]}); pass --teacher {m['teacher']['path']} or write a store with this teacher")
        want = {"size": [int(v) for v in input_size], "mean": list(mean), "std": list(std)}
        if m["input"] != want:
            raise UserError(f"{where} was rendered for model input {m['input']}, this model takes {want}; write a "
                            "store for this model")


def read_store_manifest(path: str) -> dict:
    """The manifest of a finished store, or one ``error:`` line saying what to do."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise UserError(f"--multicrop-kd {path}: no soft-label store there ({MANIFEST} missing); write one with "
                        f"python -m train.softlabels --teacher CKPT --out {path}")
    m = read_json(file, "soft-label manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{file} is not a soft-label store manifest (format {FORMAT})")
    if m.get("version") != VERSION:
        raise UserError(f"{file}: store version {m.get('version')}, this code reads {VERSION}; rewrite it")
    if not m.get("complete") or not m.get("chunks"):
        raise UserError(f"soft-label store {path} is unfinished ({len(m.get('chunks', []))} chunk(s)); re-run "
                        "python -m train.softlabels with the same flags to finish it")
    return m


# ----------------------------------------------------------------------------- training from the store

class MultiCropDataset(Dataset):
    """Item i: the store's M crops of training image i, their labels and the teacher's probabilities."""

    def __init__(self, source: Source, store: SoftLabelStore):
        self.source, self.store = source, store
        self.num_classes = int(store.manifest["num_classes"])
        self.labels = source.labels()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        st = self.store
        x = torch.stack([render(self.source, i, st.box[i, m], int(st.flip[i, m])) for m in range(st.box.shape[1])])
        soft = recover(st.topk_index[i], st.topk_prob[i], self.num_classes)
        return x, self.labels[i].repeat(x.shape[0]), soft


def collate_crops(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[(crops [M, ...], labels [M], soft [M, K])] * B`` -> one batch of ``B * M`` crops."""
    xs, ys, ps = zip(*batch)
    return torch.cat(xs), torch.cat(ys), torch.cat(ps)


def store_loaders(loaders, store_path: str, teacher_path: Optional[str], input_size, mean, std, batch_size: int,
                  seed: int, rank: int = 0, world_size: int = 1):
    """``loaders`` with the training loader reading crops and soft labels from the store.

    A batch holds ``batch_size // M`` images with all ``M`` of their crops (FKD), so a step sees
    ``batch_size`` crops like a step of the other rows.  Returns (loaders, store).
    """
    source = Source(loaders.train.dataset)
    store = SoftLabelStore(store_path)
    store.check(source, teacher_path, input_size, mean, std)
    ds = MultiCropDataset(source, store)
    crops = int(store.manifest["crops"])
    per_step = max(1, batch_size // crops)
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    train = DataLoader(ds, batch_size=per_step, sampler=sampler, drop_last=True, collate_fn=collate_crops,
                       num_workers=loaders.train.num_workers)
    if len(train) == 0:
        raise UserError(f"--batch-size {batch_size} with {crops} crops per image needs more than {len(ds)} images")
    return dataclasses.replace(loaders, train=train, sampler=sampler), store


# ----------------------------------------------------------------------------- command line

def _load_teacher(path: str, model_name: Optional[str]) -> tuple[torch.nn.Module, dict]:
    from train.checkpoint import load_checkpoint, load_state
    from train.models import create_model, model_spec

    sd, meta = load_checkpoint(path, require_meta=False)
    if meta.get("quant"):
        raise UserError(f"--teacher {path} is a quantized checkpoint; the store needs the full-precision teacher")
    name = model_name or meta.get("model")
    if not name:
        raise UserError(f"--teacher {path} carries no model name (a plain state dict): add --model NAME")
    spec = model_spec(name)
    classes = int(meta.get("num_classes") or spec.num_classes)
    model = create_model(name, num_classes=classes)
    load_state(model, sd, path)
    return model.eval(), {"model": name, "num_classes": classes, "input_size": list(spec.input_size),
                          "mean": list(spec.mean), "std": list(spec.std), "lineage": lineage(meta)}


def build_parser(prog: str = "python -m train.softlabels"):
    p = parser(prog, __doc__.split("\n\n")[0], defaults_help=True)
    p.add_argument("--teacher", required=True, help="FP teacher checkpoint (python -m train --method fp)")
    p.add_argument("--model", default=None, help="registry name, when --teacher is a plain state dict")
    p.add_argument("--out", required=True, help="store folder (created; an unfinished one is continued)")
    p.add_argument("--data", default="fmnist", choices=("fmnist", "synthetic"))
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--holdout", type=nonneg_int, default=0, help="as python -m train --holdout: label the rest")
    p.add_argument("--crops", type=positive_int, default=4, help="random crops per training image (M)")
    p.add_argument("--topk", type=positive_int, default=5, help="probabilities kept per crop")
    p.add_argument("--scale", type=fraction, nargs=2, default=(0.5, 1.0), metavar=("LO", "HI"),
                   help="crop area range (RandomResizedCrop)")
    p.add_argument("--ratio", type=positive_float, nargs=2, default=(3 / 4, 4 / 3), metavar=("LO", "HI"),
                   help="crop aspect-ratio range")
    p.add_argument("--flip", type=fraction, default=None,
                   help="horizontal flip probability (default 0.5; 0 for fmnist, whose footwear all faces left)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="crop sampling (and, for --data synthetic, its images: use the training run's --seed)")
    p.add_argument("--chunk-size", type=positive_int, default=4096, help="images per chunk file")
    p.add_argument("--batch-size", type=positive_int, default=512, help="crops per teacher forward")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="replace a store made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check(args) -> None:
    for flag, (lo, hi) in (("--scale", args.scale), ("--ratio", args.ratio)):
        if lo > hi:
            raise UserError(f"{flag} {lo:g} {hi:g}: the low end is above the high end")
    if args.scale[0] == 0:
        raise UserError("--scale: the smallest crop area must be above 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no CUDA GPU is visible; use --device cpu")


@main_guard
def main(argv: Optional[list] = None, prog: str = "python -m train.softlabels") -> int:
    args = build_parser(prog).parse_args(argv)
    _check(args)
    from train.data import build_datasets

    teacher, meta = _load_teacher(args.teacher, args.model)
    tr, _, classes = build_datasets(args.data, meta["input_size"], meta["mean"], meta["std"], data_dir=args.data_dir,
                                    seed=args.seed, holdout=args.holdout)
    if len(classes) != meta["num_classes"]:
        raise UserError(f"--teacher has {meta['num_classes']} classes, --data {args.data} has {len(classes)}")
    source = Source(tr)
    flip = args.flip if args.flip is not None else (0.0 if args.data == "fmnist" else 0.5)
    if args.topk > meta["num_classes"]:
        raise UserError(f"--topk {args.topk} is above the teacher's {meta['num_classes']} classes")
    aug = Augment(tuple(args.scale), tuple(args.ratio), flip)
    header = store_header(source, args.teacher, meta, args.crops, args.topk, aug, args.seed, args.chunk_size,
                          args.data, args.holdout)
    # which images the teacher trained on, so a run using the store is checked against its validation split
    images, val = run_images(args.data, args.data_dir, args.holdout, args.seed)
    check_no_leak(val, [("--teacher", args.teacher, meta["lineage"])], args.data_dir, notes=False)  # the run notes
    header.update(images=images, teacher_images=meta["lineage"])
    m = write_store(args.out, teacher, source, header, args.batch_size, torch.device(args.device), args.force,
                    progress=not args.quiet)
    print(f"soft labels: {len(source)} images x {args.crops} crops, top-{args.topk}, {len(m['chunks'])} chunk(s) "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
