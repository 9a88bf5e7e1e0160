"""Shared fixtures: tiny models built in code, data made locally; nothing from a hub."""

import os
import shutil

import pytest

FMNIST_DIR = os.environ.get("QVIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_nvcc = pytest.mark.skip(reason="needs nvcc on PATH")
    skip_trt = pytest.mark.skip(reason="needs the TensorRT Python bindings")
    has_cuda = _has_cuda()
    has_nvcc = shutil.which("nvcc") is not None
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "nvcc" in item.keywords and not has_nvcc:
            item.add_marker(skip_nvcc)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def fmnist_dir():
    if not os.path.isfile(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.fail(f"Fashion-MNIST missing under {FMNIST_DIR}: apt-get install dataset-fashion-mnist")
    return FMNIST_DIR
