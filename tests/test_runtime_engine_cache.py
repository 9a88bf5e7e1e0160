"""Engine cache keys and engine sidecars: an engine built elsewhere fails with 'rebuild', not a crash."""

import sys

import pytest
from conftest import make_toy_model
from test_runtime_trt_compat import make_fake_trt

from qformat.errors import UserError
from qformat.io import read_json, sidecar_path, write_json
from runtime import backends, build, engine_cache

GPU = {"name": "Orin", "compute_capability": "8.7"}


def test_cache_key_covers_every_fact():
    base = dict(onnx_sha256="a" * 64, trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                precision="int8", batch=1)
    k = engine_cache.cache_key(**base)
    assert len(k) == 16 and k == engine_cache.cache_key(**base)
    for field, other in (("onnx_sha256", "b" * 64), ("trt_version", "8.6.1"), ("gpu_name", "Xavier"),
                         ("compute_capability", "7.2"), ("precision", "fp16"), ("batch", 4)):
        assert engine_cache.cache_key(**dict(base, **{field: other})) != k, field
    assert engine_cache.default_engine_path("a/m.qdq.onnx", "int8", 1, k) == "a/m.qdq.int8.b1.{}.engine".format(k)


def _engine(tmp_path, monkeypatch, version="10.3.0"):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version))
    monkeypatch.setattr(build, "gpu_info", lambda: dict(GPU))
    onnx = make_toy_model(tmp_path, "toy_w4a4.qdq")
    path, _ = build.build(build.parse_args(["--onnx", onnx, "--max-batch", "8"]), log=lambda *a: None)
    return path


def test_engine_sidecar_mismatch_says_rebuild(tmp_path, monkeypatch):
    path = _engine(tmp_path, monkeypatch, "8.6.1")
    meta = engine_cache.read_engine_meta(path)
    engine_cache.check_compatible(path, meta, "8.6.1", GPU)  # same place: fine
    with pytest.raises(UserError, match=r"TensorRT 8\.6\.1 \(engine\) vs 10\.3\.0 \(here\).*rebuild it here"):
        engine_cache.check_compatible(path, meta, "10.3.0", GPU)
    with pytest.raises(UserError, match="GPU 'Orin' .* vs 'NVIDIA GeForce RTX 4090'"):
        engine_cache.check_compatible(path, meta, "8.6.1", {"name": "NVIDIA GeForce RTX 4090",
                                                            "compute_capability": "8.9"})
    # the TensorRT backend checks before touching CUDA: same message on a device with another TensorRT
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt("10.3.0"))
    monkeypatch.setattr(backends, "gpu_info", lambda: dict(GPU))
    with pytest.raises(UserError, match="built elsewhere.*python3 -m runtime.build --onnx"):
        backends.TrtBackend(path)


def test_matching_engine_reaches_cuda_and_needs_pycuda(tmp_path, monkeypatch):
    path = _engine(tmp_path, monkeypatch)
    monkeypatch.setattr(backends, "gpu_info", lambda: dict(GPU))
    for mod in ("pycuda", "pycuda.driver", "cuda", "cuda.bindings", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    with pytest.raises(UserError, match="pycuda or cuda-python"):
        backends.TrtBackend(path)


def test_missing_or_partial_engine_sidecar(tmp_path, monkeypatch):
    path = _engine(tmp_path, monkeypatch)
    side = read_json(sidecar_path(path))
    del side["tensorrt_version"]
    write_json(sidecar_path(path), side)
    with pytest.raises(UserError, match="lacks tensorrt_version.*rebuild"):
        engine_cache.read_engine_meta(path)
    assert engine_cache.cached_engine(path, side["cache_key"]) == path
    assert engine_cache.cached_engine(path, "0" * 16) is None
    (tmp_path / "foreign.engine").write_bytes(b"x")
    with pytest.raises(UserError, match="has no sidecar.*rebuild"):
        engine_cache.read_engine_meta(str(tmp_path / "foreign.engine"))


def test_engine_replaced_under_its_sidecar_is_refused_and_rebuilt(tmp_path, monkeypatch):
    """A build killed between the engine and its sidecar (or a copied engine) leaves a pair that does not match:
    the backend refuses it before deserializing, and the cache treats it as a miss."""
    path = _engine(tmp_path, monkeypatch)
    side = read_json(sidecar_path(path))
    assert len(side["engine_sha256"]) == 64
    assert engine_cache.cached_engine(path, side["cache_key"]) == path
    with open(path, "ab") as f:
        f.write(b"another build")
    assert engine_cache.cached_engine(path, side["cache_key"]) is None
    monkeypatch.setattr(backends, "gpu_info", lambda: dict(GPU))
    with pytest.raises(UserError, match="was written for another build of .*rebuild it"):
        backends.TrtBackend(path)


def test_engine_input_disagreeing_with_its_sidecar(tmp_path, monkeypatch):
    path = _engine(tmp_path, monkeypatch)
    side = read_json(sidecar_path(path))
    side.update(input_size=[1, 28, 28], mean=[0.3], std=[0.3])
    write_json(sidecar_path(path), side)
    monkeypatch.setattr(backends, "gpu_info", lambda: dict(GPU))
    monkeypatch.setattr("runtime.cuda_mem.open_cuda", lambda: type("C", (), {"mem_info": lambda s: (1, 2)})())
    with pytest.raises(UserError, match=r"\[N, 3, 32, 32\] but .*\.engine\.json says input_size \[1, 28, 28\]"):
        backends.TrtBackend(path)
