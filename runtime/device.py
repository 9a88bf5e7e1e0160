"""Which GPU this process runs on: name and compute capability, for engine cache keys and sidecars.

Engines are specific to a GPU model and TensorRT version, so both go into the engine's
key.  Queried through pycuda or cuda-python (whichever the device has; no torch on the
Jetson), else ``nvidia-smi``; on a Jetson the board name comes from the device tree.
Python 3.6-compatible.
"""

import subprocess

DEVICE_TREE_MODEL = "/proc/device-tree/model"


def jetson_model(path=DEVICE_TREE_MODEL):
    """``"NVIDIA Jetson AGX Orin Developer Kit"`` on a Jetson, else None."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return None
    return text if "jetson" in text.lower() or "tegra" in text.lower() else None


def _from_pycuda():
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    return {"name": dev.name(), "compute_capability": "{}.{}".format(major, minor),
            "total_memory": int(dev.total_memory())}


def cudart_module():
    """cuda-python's runtime bindings under either import path (12.x ``cuda.cudart``, 13 ``cuda.bindings``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _from_cuda_python():
    cudart = cudart_module()
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise RuntimeError("cudaGetDeviceProperties failed: {}".format(err))
    name = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00 "), "compute_capability": "{}.{}".format(props.major, props.minor),
            "total_memory": int(props.totalGlobalMem)}


def _from_nvidia_smi():
    out = subprocess.check_output(
        ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
        stderr=subprocess.DEVNULL, timeout=10).decode().splitlines()[0]
    name, cc, mem = [p.strip() for p in out.split(",")]
    return {"name": name, "compute_capability": cc, "total_memory": int(float(mem)) << 20}


def gpu_info():
    """``{"name", "compute_capability", "total_memory"}`` of GPU 0, or None without a GPU."""
    for probe in (_from_pycuda, _from_cuda_python, _from_nvidia_smi):
        try:
            info = probe()
        except Exception:  # noqa: BLE001 - any failure means "try the next probe"
            continue
        board = jetson_model()
        if board:
            info["board"] = board
        return info
    return None


def gpu_label(info):
    """Short form for file names and messages: ``"Orin (8.7)"``."""
    if not info:
        return "no GPU"
    return "{} ({})".format(info.get("name", "?"), info.get("compute_capability", "?"))
