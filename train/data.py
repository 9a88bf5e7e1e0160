"""Data: Fashion-MNIST (IDX files), ImageNet-layout folders, and a seeded synthetic set.

Every image leaves here as a float tensor shaped like the model's ``input_size`` (C, H, W),
normalised with the model's mean/std, so the trainer, the exporter's parity check and the
runtime all see the same preprocessing.

Augmentation choice for Fashion-MNIST: random crop with 2-pixel zero padding (the background
is black, so zero padding is what the camera would see) and *no* horizontal flip: every
piece of footwear in both splits faces left, so flipping only teaches an orientation the test
set never shows, which costs accuracy on the short budgets this project trains with.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from qformat.errors import UserError
from train.config import DATASETS

FMNIST_DIR = os.environ.get("QVIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_INSTALL = "apt-get install dataset-fashion-mnist"
SYNTHETIC_CLASSES = 10

# IDX type byte -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- IDX files

def parse_idx(buf: bytes, name: str = "IDX data", ndim: Optional[int] = None) -> np.ndarray:
    """Parse IDX bytes; validate magic number and size, so a corrupt file fails loudly here."""
    fix = "re-install it ({})".format(FMNIST_INSTALL)
    if len(buf) < 4:
        raise UserError("{} is truncated (no IDX header); {}".format(name, fix))
    zero, type_code, dims = struct.unpack(">HBB", buf[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or dims == 0:
        raise UserError("{} is not an IDX file (bad magic number 0x{}); {}".format(name, buf[:4].hex(), fix))
    if ndim is not None and dims != ndim:
        raise UserError("{} has {} dimensions, expected {}; {}".format(name, dims, ndim, fix))
    if len(buf) < 4 + 4 * dims:
        raise UserError("{} is truncated (incomplete IDX header); {}".format(name, fix))
    shape = struct.unpack(">" + "I" * dims, buf[4:4 + 4 * dims])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = memoryview(buf)[4 + 4 * dims:]
    if len(body) != expected:
        raise UserError("{} has {} data bytes, header says {} (truncated or corrupt); {}".format(
            name, len(body), expected, fix))
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str, ndim: Optional[int] = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw (sniffed from the gzip magic, not the name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UserError("cannot read {} ({}); re-install it ({})".format(path, e, FMNIST_INSTALL)) from None
    return parse_idx(raw, name=path, ndim=ndim)


def _find_idx(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    raise UserError("Fashion-MNIST file {}[.gz] not found in {}: {} or pass --data-dir".format(
        stem, data_dir, FMNIST_INSTALL))


def load_fmnist(data_dir: Optional[str] = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 images [N, 28, 28], int64 labels [N]) of the 'train' or 'test' split."""
    data_dir = data_dir or FMNIST_DIR
    if split not in ("train", "test"):
        raise UserError("unknown Fashion-MNIST split {!r}: use train or test".format(split))
    if not os.path.isdir(data_dir):
        raise UserError("Fashion-MNIST directory {} does not exist: {} or pass --data-dir".format(
            data_dir, FMNIST_INSTALL))
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(data_dir, prefix + "-images-idx3-ubyte"), ndim=3)
    labels = read_idx(_find_idx(data_dir, prefix + "-labels-idx1-ubyte"), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise UserError("Fashion-MNIST {} split in {}: {} images but {} labels; re-install it ({})".format(
            split, data_dir, images.shape[0], labels.shape[0], FMNIST_INSTALL))
    if images.dtype != np.uint8 or labels.size and labels.max() >= len(FMNIST_CLASSES):
        raise UserError("Fashion-MNIST {} split in {} has unexpected contents; re-install it ({})".format(
            split, data_dir, FMNIST_INSTALL))
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- adaptation

def adapt(x: torch.Tensor, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[..., c, h, w] pixels in [0, 1] -> model input: channels repeated, resized, normalised."""
    c, h, w = (int(v) for v in input_size)
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise UserError("cannot adapt {}-channel images to a {}-channel model".format(x.shape[1], c))
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - m) / s
    return x[0] if squeeze else x


def random_crop(x: torch.Tensor, pad: int, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back to size at a random offset (the classic MNIST-style shift)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[..., i:i + h, j:j + w]


class FashionMNIST(Dataset):
    """In-memory Fashion-MNIST adapted to one model's input (small: 47 MB of uint8)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], train: bool = False):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)
        self.input_size, self.mean, self.std, self.train = tuple(input_size), tuple(mean), tuple(std), train
        self.classes = list(FMNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].unsqueeze(0).float().div_(255.0)
        if self.train:
            x = random_crop(x, pad=2)
        return adapt(x, self.input_size, self.mean, self.std), int(self.labels[i])


# ----------------------------------------------------------------------------- synthetic

class Synthetic(Dataset):
    """Random but learnable images: a smooth per-class prototype plus per-sample noise.

    Each image is a pure function of (seed, split, index), so every rank sees the same data;
    the training split adds a random shift drawn from the global RNG, like Fashion-MNIST's
    augmentation, so smoke tests of resume exercise the RNG state too.
    """

    def __init__(self, n: int, input_size: Sequence[int], num_classes: int = SYNTHETIC_CLASSES,
                 seed: int = 0, split: str = "train", noise: float = 0.6):
        self.n, self.input_size, self.num_classes, self.noise = n, tuple(input_size), num_classes, noise
        self.train = split == "train"
        self.seed = seed * 2 + (0 if split == "train" else 1)
        c, h, w = self.input_size
        g = torch.Generator().manual_seed(seed)  # prototypes are shared by both splits
        coarse = torch.randn(num_classes, c, 4, 4, generator=g)
        self.prototypes = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        self.prototypes = self.prototypes / self.prototypes.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        self.classes = ["class_{}".format(k) for k in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = int(torch.randint(0, self.num_classes, (1,), generator=g))
        x = self.prototypes[y] + self.noise * torch.randn(self.input_size, generator=g)
        return (random_crop(x, pad=1) if self.train else x), y


# ----------------------------------------------------------------------------- image folders

class UnreadableImage(Exception):
    """An image file PIL cannot decode (corrupt, truncated, empty, not an image)."""

    def __init__(self, path: str, reason: str):
        super().__init__("{} ({})".format(path, reason))
        self.path, self.reason = path, reason


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_image(path: str, mode: str):
    """Decode ``path`` with PIL and convert it to ``mode`` ("L" or "RGB": the model's input channels)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise UnreadableImage(path, _reason(e)) from None


def image_mode(input_size: Sequence[int]) -> str:
    c = int(input_size[0])
    if c not in (1, 3):
        raise UserError("image folders feed 1- or 3-channel models, this one takes {} channels".format(c))
    return "L" if c == 1 else "RGB"


def readable_images(paths: Sequence[str]) -> tuple[list, list]:
    """(indices PIL can identify, [(path, reason)] it cannot): header-only, no pixels decoded."""
    from PIL import Image

    good, bad = [], []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                if 0 in im.size:
                    raise ValueError("empty image")
            good.append(i)
        except Exception as e:  # noqa: BLE001 - see load_image
            bad.append((p, _reason(e)))
    return good, bad


def warn_unreadable(bad: list, where: str, total: int) -> None:
    """One counted warning naming the skipped files; a UserError when nothing readable is left."""
    if not bad:
        return
    names = ", ".join("{} ({})".format(os.path.relpath(p, where) if p.startswith(where) else p, why)
                      for p, why in bad[:5])
    more = " and {} more".format(len(bad) - 5) if len(bad) > 5 else ""
    if len(bad) == total:
        raise UserError("no readable image in {}: all {} file(s) fail to decode: {}{}".format(
            where, total, names, more))
    sys.stderr.write("warning: skipped {} of {} image(s) in {} that cannot be decoded: {}{}\n".format(
        len(bad), total, where, names, more))


def _image_folder(root: str, split: str, input_size: Sequence[int], mean, std, train: bool,
                  resize: Optional[dict] = None):
    """``resize``: the model's ``interpolation`` / ``crop_pct`` (train.models.ModelSpec; timm's defaults without)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise UserError("image folder {} not found: --data-dir must hold train/ and val/ with one "
                        "sub-folder per class (ImageNet layout)".format(d))
    tf = create_transform(tuple(input_size), is_training=train, mean=tuple(mean), std=tuple(std), **(resize or {}))

    try:
        folder = ImageFolder(d, transform=tf, loader=functools.partial(load_image, mode=image_mode(input_size)))
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError("image folder {}: {}".format(d, e)) from None
    good, bad = readable_images([p for p, _ in folder.samples])
    warn_unreadable(bad, d, len(folder.samples))
    folder.samples = folder.imgs = [folder.samples[i] for i in good]
    folder.targets = [t for _, t in folder.samples]
    return CheckedImageFolder(folder)


class CheckedImageFolder(Dataset):
    """A torchvision ImageFolder whose files that break mid-decode are reported once and replaced by
    the next readable one (the header scan already dropped the ones that do not even open)."""

    def __init__(self, folder):
        self.folder, self.classes, self.root = folder, folder.classes, folder.root
        self.warned: set = set()

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int):
        n = len(self.folder.samples)
        for j in range(n):
            k = (i + j) % n
            try:
                return self.folder[k]
            except UnreadableImage as e:
                if k not in self.warned:
                    self.warned.add(k)
                    sys.stderr.write("warning: cannot decode {}; using another image in its place\n".format(e))
        raise UserError("no image in {} can be decoded".format(self.root))


# ----------------------------------------------------------------------------- held-out validation

#: the validation split is a function of this seed alone, never of ``--seed``: every run, whatever
#: its seed, validates on the same images (the same split as issue #13's study runner)
HOLDOUT_SEED = 0


def stratified_holdout(labels: np.ndarray, n: int, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``n`` indices drawn per class in proportion to its size
    (largest remainders), fixed by ``seed``; both sorted, disjoint, together all of ``labels``."""
    labels = np.asarray(labels)
    if not 0 < n < len(labels):
        raise UserError("--holdout {} must be between 1 and {} (the training split's size)".format(n, len(labels) - 1))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]] += 1
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(labels))
    val = np.concatenate([order[labels[order] == c][:q] for c, q in zip(classes, quota)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _holdout_datasets(data: str, n: int, input_size, mean, std, data_dir, seed: int, synthetic_n: int):
    """Train on the training split less ``n`` stratified images, validate on those ``n``."""
    if data == "fmnist":
        images, labels = load_fmnist(data_dir, "train")
        tr_idx, va_idx = stratified_holdout(labels, n)
        tr = FashionMNIST(images[tr_idx], labels[tr_idx], input_size, mean, std, train=True)
        va = FashionMNIST(images[va_idx], labels[va_idx], input_size, mean, std, train=False)
        return tr, va, list(FMNIST_CLASSES)
    if data == "synthetic":
        full = Synthetic(synthetic_n, input_size, seed=seed, split="train")
        plain = Synthetic(synthetic_n, input_size, seed=seed, split="train")
        plain.train = False  # same images, no shift: what validation should see
        labels = np.array([plain[i][1] for i in range(len(plain))])
        tr_idx, va_idx = stratified_holdout(labels, n)
        return Subset(full, tr_idx.tolist()), Subset(plain, va_idx.tolist()), list(full.classes)
    raise UserError("--holdout works with --data fmnist or synthetic; an image folder has its own val/")


# ----------------------------------------------------------------------------- loaders

@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler  # call .set_epoch(e) each epoch: the shuffle is f(seed, epoch)
    class_names: list
    num_classes: int


def build_datasets(data: str, input_size: Sequence[int], mean, std, data_dir: Optional[str] = None,
                   seed: int = 0, synthetic_size: tuple[int, int] = (512, 256), holdout: int = 0,
                   resize: Optional[dict] = None):
    """(train set, val set, class names) for ``data`` in fmnist | imagefolder | synthetic.
    ``holdout`` > 0: validate on that many images carved from the training split (stratified,
    fixed by :data:`HOLDOUT_SEED`) and train on the rest; the test split is not read."""
    if holdout:
        return _holdout_datasets(data, holdout, input_size, mean, std, data_dir, seed, synthetic_size[0])
    if data == "fmnist":
        tr = FashionMNIST(*load_fmnist(data_dir, "train"), input_size, mean, std, train=True)
        va = FashionMNIST(*load_fmnist(data_dir, "test"), input_size, mean, std, train=False)
        return tr, va, list(FMNIST_CLASSES)
    if data == "imagefolder":
        if not data_dir:
            raise UserError("--data imagefolder needs --data-dir DIR holding train/ and val/")
        tr = _image_folder(data_dir, "train", input_size, mean, std, train=True, resize=resize)
        va = _image_folder(data_dir, "val", input_size, mean, std, train=False, resize=resize)
        if tr.classes != va.classes:
            raise UserError("{}: train/ and val/ have different class folders".format(data_dir))
        check_classes(tr.classes, os.path.join(data_dir, "train"))
        return tr, va, list(tr.classes)
    if data == "synthetic":
        tr = Synthetic(synthetic_size[0], input_size, seed=seed, split="train")
        va = Synthetic(synthetic_size[1], input_size, seed=seed, split="val")
        return tr, va, list(tr.classes)
    raise UserError("unknown data set {!r}: use one of {}".format(data, ", ".join(DATASETS)))


def check_classes(classes: Sequence[str], where: str) -> None:
    """A classifier needs two classes; with five or fewer, top-5 accuracy means nothing (said once)."""
    if len(classes) < 2:
        raise UserError("{} has {} class folder(s) ({}): a classifier needs at least 2 classes, one sub-folder "
                        "each".format(where, len(classes), ", ".join(classes) or "none"))
    if len(classes) <= 5:
        sys.stderr.write("note: {} has {} classes: top-5 accuracy is not reported (it would be 100 %)\n".format(
            where, len(classes)))


def build_loaders(data: str, input_size: Sequence[int], mean, std, batch_size: int, data_dir: Optional[str] = None,
                  workers: Optional[int] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                  pin_memory: bool = False, holdout: int = 0, resize: Optional[dict] = None) -> Loaders:
    """Train/val loaders. Train order comes from a DistributedSampler (also with one process),
    so shuffling is a function of (seed, epoch) and resume replays it exactly. Validation is
    sharded without padding, so DDP evaluation counts each image once."""
    tr, va, classes = build_datasets(data, input_size, mean, std, data_dir=data_dir, seed=seed, holdout=holdout,
                                     resize=resize)
    if workers is None:  # in-memory sets are cheaper in-process than through worker pipes
        workers = min(8, os.cpu_count() or 1) if data == "imagefolder" else 0
    sampler = DistributedSampler(tr, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # no persistent workers: fresh workers each epoch are seeded from the main RNG, which resume restores
    kw = dict(num_workers=workers, pin_memory=pin_memory)
    train = DataLoader(tr, batch_size=batch_size, sampler=sampler, drop_last=True, **kw)
    if data == "imagefolder":  # its val/ is sorted by class: a fixed mix, so --max-eval-batches sees every class
        va = Subset(va, np.random.RandomState(0).permutation(len(va)).tolist())
    va_shard = va if world_size == 1 else Subset(va, range(rank, len(va), world_size))
    val = DataLoader(va_shard, batch_size=batch_size, shuffle=False, **kw)
    if len(train) == 0:
        raise UserError("batch size {} x {} processes is larger than the {} training images; lower --batch-size"
                        .format(batch_size, world_size, len(tr)))
    return Loaders(train, val, sampler, classes, len(classes))


def eval_images(n: int, split: str = "test", model: str = "vit_fmnist", data_dir: Optional[str] = None,
                input_size: Optional[Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real Fashion-MNIST images of ``split``, preprocessed for ``model``
    (or for an explicit input_size/mean/std, e.g. a checkpoint's metadata): deterministic
    float32 [n, C, H, W] and int64 labels [n], for parity checks between backends."""
    if input_size is None or mean is None or std is None:
        from train.models import model_spec

        spec = model_spec(model)
        input_size = input_size or spec.input_size
        mean = mean or spec.mean
        std = std or spec.std
    images, labels = load_fmnist(data_dir, split)
    x = torch.from_numpy(images[:n]).unsqueeze(1).float().div_(255.0)
    return adapt(x, input_size, mean, std).contiguous(), torch.from_numpy(labels[:n])
