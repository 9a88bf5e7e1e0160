"""The validation split carved from the training set: fixed, stratified, disjoint, seed-independent."""

import numpy as np
import pytest

from qformat.errors import UserError
from train.data import build_datasets, build_loaders, load_fmnist, stratified_holdout


def test_stratified_holdout_quotas_and_determinism():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    tr, va = stratified_holdout(labels, 20)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
    assert np.bincount(labels[va]).tolist() == [10, 6, 3, 1]
    assert np.array_equal(va, stratified_holdout(labels, 20)[1])
    assert not np.array_equal(va, stratified_holdout(labels, 20, seed=1)[1])
    tr7, va7 = stratified_holdout(labels, 7)  # largest remainders: still exactly n
    assert len(va7) == 7 and len(tr7) == 93
    for bad in (0, 100, -3):
        with pytest.raises(UserError, match="--holdout"):
            stratified_holdout(labels, bad)


def test_fmnist_holdout_5000_is_500_per_class_and_never_the_test_split(fmnist_dir):
    images, labels = load_fmnist(fmnist_dir, "train")
    tr, va, _ = build_datasets("fmnist", (1, 28, 28), (0.286,), (0.353,), data_dir=fmnist_dir, holdout=5000)
    assert len(tr) == 55000 and len(va) == 5000 and not va.train and tr.train
    assert np.bincount(va.labels.numpy()).tolist() == [500] * 10
    _, va_idx = stratified_holdout(labels, 5000)
    assert np.array_equal(va.images.numpy(), images[va_idx])  # from the training split, not t10k
    a = build_loaders("fmnist", (1, 28, 28), (0.286,), (0.353,), 128, data_dir=fmnist_dir, seed=1, holdout=5000)
    b = build_loaders("fmnist", (1, 28, 28), (0.286,), (0.353,), 128, data_dir=fmnist_dir, seed=7, holdout=5000)
    assert np.array_equal(a.val.dataset.images.numpy(), b.val.dataset.images.numpy())  # --seed never moves it


def test_synthetic_holdout_validates_without_augmentation():
    tr, va, _ = build_datasets("synthetic", (1, 28, 28), (0.5,), (0.5,), holdout=64)
    assert len(tr) == 448 and len(va) == 64
    x1, _ = va[3]
    x2, _ = va[3]
    assert (x1 == x2).all()  # no random shift on validation images
    with pytest.raises(UserError, match="image folder"):
        build_datasets("imagefolder", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, data_dir="/nonexistent", holdout=10)
