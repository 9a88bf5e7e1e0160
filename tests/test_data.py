"""IDX parsing, Fashion-MNIST loading, adaptation to a model's input, synthetic data, loaders."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qformat.errors import UserError
from train import data


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_idx_roundtrip(shape, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    np.testing.assert_array_equal(data.parse_idx(_idx_bytes(arr)), arr)


def test_idx_int32_big_endian():
    arr = np.arange(-3, 3, dtype=">i4").reshape(2, 3)
    out = data.parse_idx(_idx_bytes(arr))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("buf,match", [
    (b"", "truncated"),
    (b"\x01\x00\x08\x01" + b"\x00" * 8, "bad magic"),
    (b"\x00\x00\x07\x01" + b"\x00" * 8, "bad magic"),
    (b"\x00\x00\x08\x03\x00\x00", "incomplete IDX header"),
    (struct.pack(">HBBIII", 0, 8, 3, 2, 28, 28) + b"\x00" * 100, "header says 1568"),
])
def test_idx_corrupt(buf, match):
    with pytest.raises(UserError, match=match):
        data.parse_idx(buf, name="x")


def test_idx_wrong_ndim():
    with pytest.raises(UserError, match="expected 3"):
        data.parse_idx(_idx_bytes(np.zeros(4, np.uint8)), ndim=3)


def _write_fake_fmnist(d, n=12, gz=True, corrupt=None):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        files = {prefix + "-images-idx3-ubyte": _idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                 prefix + "-labels-idx1-ubyte": _idx_bytes(rng.integers(0, 10, (n,), dtype=np.uint8))}
        for name, b in files.items():
            if name == corrupt:
                b = b[: len(b) // 2]
            with open(os.path.join(d, name + (".gz" if gz else "")), "wb") as f:
                f.write(gzip.compress(b) if gz else b)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fmnist_gz_or_raw(tmp_path, gz):
    _write_fake_fmnist(str(tmp_path), gz=gz)
    x, y = data.load_fmnist(str(tmp_path), "test")
    assert x.shape == (12, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64


def test_load_fmnist_errors(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        data.load_fmnist(str(tmp_path / "nope"), "train")
    with pytest.raises(UserError, match="not found"):
        data.load_fmnist(str(tmp_path), "train")  # exists, but empty
    _write_fake_fmnist(str(tmp_path / "c"), corrupt="t10k-images-idx3-ubyte")
    with pytest.raises(UserError, match="truncated or corrupt"):
        data.load_fmnist(str(tmp_path / "c"), "test")
    (tmp_path / "g").mkdir()
    _write_fake_fmnist(str(tmp_path / "g"))
    with open(tmp_path / "g" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="cannot read"):
        data.load_fmnist(str(tmp_path / "g"), "train")


def test_real_fmnist(fmnist_dir):
    x, y = data.load_fmnist(fmnist_dir, "test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    assert len(data.FMNIST_CLASSES) == 10


@pytest.mark.parametrize("size", [(1, 28, 28), (3, 32, 32), (3, 224, 224)])
def test_adapt(size):
    x = torch.rand(2, 1, 28, 28)
    out = data.adapt(x, size, [0.5] * size[0], [0.25] * size[0])
    assert out.shape == (2, *size)
    if size[1:] == (28, 28):
        torch.testing.assert_close(out, (x - 0.5) / 0.25)
    if size[0] == 3:
        assert torch.equal(out[:, 0], out[:, 2])  # grayscale repeated
    assert data.adapt(x[0], size, [0.5] * size[0], [0.25] * size[0]).shape == size


def test_random_crop_keeps_shape_and_content():
    x = torch.arange(16.0).view(1, 4, 4)
    out = data.random_crop(x, pad=1, gen=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert set(out.flatten().tolist()) <= set(x.flatten().tolist()) | {0.0}


def test_synthetic_deterministic_and_balanced():
    a = data.Synthetic(64, (1, 28, 28), seed=1, split="val")
    b = data.Synthetic(64, (1, 28, 28), seed=1, split="val")
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(8))
    assert not torch.equal(a[0][0], data.Synthetic(64, (1, 28, 28), seed=2, split="val")[0][0])
    assert len({a[i][1] for i in range(64)}) == 10


def test_build_loaders_synthetic_and_ddp_shards():
    ld = data.build_loaders("synthetic", (1, 28, 28), (0.5,), (0.5,), batch_size=8)
    x, y = next(iter(ld.train))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64 and ld.num_classes == 10
    shards = [data.build_loaders("synthetic", (1, 28, 28), (0.5,), (0.5,), 8, rank=r, world_size=2) for r in (0, 1)]
    assert sum(len(s.val.dataset) for s in shards) == 256  # each val image counted once
    with pytest.raises(UserError, match="unknown data set"):
        data.build_loaders("cifar", (1, 28, 28), (0.5,), (0.5,), 8)
    with pytest.raises(UserError, match="--data-dir"):
        data.build_loaders("imagefolder", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, 8)


def test_fmnist_loader_adapts(tmp_path):
    _write_fake_fmnist(str(tmp_path), n=20)
    ld = data.build_loaders("fmnist", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, 4, data_dir=str(tmp_path))
    x, _ = next(iter(ld.train))
    assert x.shape == (4, 3, 32, 32)
    assert ld.class_names[9] == "Ankle boot"


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    ld = data.build_loaders("imagefolder", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, 2, data_dir=str(tmp_path), workers=0)
    assert ld.class_names == ["cat", "dog"]
    assert next(iter(ld.val))[0].shape == (2, 3, 32, 32)
    with pytest.raises(UserError, match="ImageNet layout"):
        data.build_loaders("imagefolder", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, 2, data_dir=str(tmp_path / "train"))


def _rgb_folder(root, classes=("cat", "dog"), n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_skips_undecodable_files_and_converts_rgb_to_the_model_channels(tmp_path, capsys):
    _rgb_folder(tmp_path)
    (tmp_path / "train" / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (tmp_path / "train" / "dog" / "empty.png").write_bytes(b"")
    good = (tmp_path / "train" / "cat" / "0.png").read_bytes()
    (tmp_path / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])  # opens, fails to decode
    ld = data.build_loaders("imagefolder", (1, 28, 28), (0.3,), (0.3,), 2, data_dir=str(tmp_path), workers=0)
    err = capsys.readouterr().err
    assert "warning: skipped 2 of 9 image(s)" in err and "cat/corrupt.jpg" in err and "dog/empty.png" in err
    assert "top-5 accuracy is not reported" in err
    ds = ld.train.dataset
    assert len(ds) == 7
    xs = [ds[i][0] for i in range(len(ds))]  # every item decodes, RGB -> the model's one channel
    assert all(x.shape == (1, 28, 28) for x in xs)
    err = capsys.readouterr().err
    assert err.count("warning: cannot decode") == 1 and "truncated.png (image file is truncated)" in err
    assert next(iter(ld.val))[0].shape == (2, 1, 28, 28)


def test_imagefolder_with_nothing_readable_or_one_class(tmp_path):
    _rgb_folder(tmp_path / "a")
    for f in (tmp_path / "a" / "train").rglob("*.png"):
        f.write_bytes(b"")
    with pytest.raises(UserError, match=r"no readable image in .*train: all 6 file\(s\) fail to decode"):
        data.build_loaders("imagefolder", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, 2, data_dir=str(tmp_path / "a"))
    _rgb_folder(tmp_path / "b", classes=("only",))
    with pytest.raises(UserError, match=r"has 1 class folder\(s\) \(only\): a classifier needs at least 2"):
        data.build_loaders("imagefolder", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, 2, data_dir=str(tmp_path / "b"))


def test_eval_images(fmnist_dir):
    x, y = data.eval_images(5, model="vit_fmnist", data_dir=fmnist_dir)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.tolist() == [9, 2, 1, 1, 6]
    x2, _ = data.eval_images(5, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, data_dir=fmnist_dir)
    assert x2.shape == (5, 3, 32, 32)
    assert torch.equal(x, data.eval_images(5, model="vit_fmnist", data_dir=fmnist_dir)[0])  # deterministic
