"""Engine files, their sidecars and the cache key (ONNX hash, TensorRT version, GPU, precision, batch).

A serialized engine only runs on the TensorRT version and GPU model that built it, so
(like jetson-inference) the key of those facts is part of the file name and the sidecar
records them; loading an engine built elsewhere fails with "rebuild" instead of a
TensorRT deserialization crash.  Python 3.6-compatible.
"""

import hashlib
import json
import os
import time

from qformat.errors import UserError
from qformat.io import atomic_write, read_json, sha256_bytes, sha256_file, sidecar_path, write_json

ENGINE_SIDECAR_VERSION = 1
#: What an engine sidecar always holds (besides the model's preprocessing keys).
ENGINE_KEYS = ("engine_format_version", "cache_key", "tensorrt_version", "gpu_name", "compute_capability",
               "onnx_sha256", "onnx_path", "plugins", "precision", "batch", "max_batch", "built_at")


def cache_key(onnx_sha256, trt_version, gpu_name, compute_capability, precision, batch, max_batch=None,
              plugin_sha256=(), extra=None):
    """16 hex digits identifying an engine build."""
    facts = {
        "onnx": onnx_sha256, "trt": str(trt_version), "gpu": str(gpu_name), "cc": str(compute_capability),
        "precision": str(precision), "batch": int(batch), "max_batch": int(max_batch or batch),
        "plugins": sorted(plugin_sha256), "extra": extra or {},
    }
    blob = json.dumps(facts, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def default_engine_path(onnx_path, precision, batch, key):
    """``artifacts/deit_s_w4a4.qdq.onnx`` -> ``artifacts/deit_s_w4a4.qdq.int8.b1.<key>.engine``."""
    stem = onnx_path[:-len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path
    return "{}.{}.b{}.{}.engine".format(stem, precision, int(batch), key)


def write_engine(path, blob, sidecar):
    """Atomically write the engine, then its sidecar (so a sidecar never names a partial engine)."""
    atomic_write(path, blob)
    meta = dict(sidecar)
    meta["engine_sha256"] = sha256_bytes(blob)  # checked on load: a sidecar left from another build is refused
    meta["engine_format_version"] = ENGINE_SIDECAR_VERSION
    meta.setdefault("built_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(sidecar_path(path), meta)
    return meta


def read_engine_meta(path):
    """The sidecar of engine ``path``; a missing one means the engine's origin is unknown."""
    if not os.path.isfile(path):
        raise UserError("engine not found: {} (build it with `python3 -m runtime.build --onnx ...`)".format(path))
    side = sidecar_path(path)
    if not os.path.isfile(side):
        raise UserError("engine {} has no sidecar {}: rebuild it with `python3 -m runtime.build --onnx ...` "
                        "(the sidecar records TensorRT version, GPU and preprocessing)".format(path, side))
    meta = read_json(side, "engine sidecar")
    missing = [k for k in ENGINE_KEYS if k not in meta]
    if missing:
        raise UserError("engine sidecar {} lacks {}: rebuild the engine with `python3 -m runtime.build`".format(
            side, ", ".join(missing)))
    return meta


def check_engine_file(path, meta):
    """Refuse an engine whose sidecar was written for another build (interrupted build, copied files)."""
    want = meta.get("engine_sha256")
    if want and sha256_file(path) != want:
        raise UserError("engine sidecar {} was written for another build of {} (a build was interrupted, or "
                        "files were copied separately): rebuild it with `python3 -m runtime.build --onnx {}`".format(
                            sidecar_path(path), os.path.basename(path), meta.get("onnx_path") or "<model>.onnx"))


def mismatches(meta, trt_version, gpu, plugin_sha256=None):
    """Human-readable differences between where the engine was built and here."""
    out = []
    if str(meta.get("tensorrt_version")) != str(trt_version):
        out.append("TensorRT {} (engine) vs {} (here)".format(meta.get("tensorrt_version"), trt_version))
    if gpu:
        if str(meta.get("gpu_name")) != str(gpu.get("name")):
            out.append("GPU {!r} (engine) vs {!r} (here)".format(meta.get("gpu_name"), gpu.get("name")))
        elif str(meta.get("compute_capability")) != str(gpu.get("compute_capability")):
            out.append("compute capability {} (engine) vs {} (here)".format(
                meta.get("compute_capability"), gpu.get("compute_capability")))
    if plugin_sha256 is not None:
        want = sorted(p.get("sha256") for p in meta.get("plugins") or [])
        if want and sorted(plugin_sha256) != want:
            out.append("plugin library differs from the one the engine was built with")
    return out


def check_compatible(path, meta, trt_version, gpu, plugin_sha256=None):
    """Raise a UserError telling the user to rebuild when the engine was built elsewhere."""
    diff = mismatches(meta, trt_version, gpu, plugin_sha256)
    if diff:
        src = meta.get("onnx_path") or "<model>.onnx"
        raise UserError("engine {} was built elsewhere ({}): engines are specific to the TensorRT version "
                        "and GPU -- rebuild it here with `python3 -m runtime.build --onnx {}`".format(
                            path, "; ".join(diff), src))


def cached_engine(path, key):
    """``path`` when it exists with a sidecar of the same ``key`` (a cache hit), else None."""
    if not (os.path.isfile(path) and os.path.isfile(sidecar_path(path))):
        return None
    try:
        meta = read_json(sidecar_path(path), "engine sidecar")
        if meta.get("cache_key") != key:
            return None
        check_engine_file(path, meta)
    except UserError:
        return None
    return path
