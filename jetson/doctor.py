"""``qvit doctor`` / ``python3 -m jetson.doctor``: one screen on what this machine can run, and what to fix.

Board and L4T/JetPack (or "not a Jetson"), GPU and compute capability, CUDA, TensorRT and ONNX Runtime
(with its providers), whether ``libqvit_plugins.so`` is built and for which GPU architectures, the
export target that fits (qformat.targets) and the Docker image for it, power mode, locked clocks and
temperatures (runtime.board) -- each problem with the one command that fixes it.  Runs anywhere (it
says plainly what is absent); never imports torch.  Python 3.6-compatible.

    qvit doctor            # the screen
    qvit doctor --json     # the same facts, machine-readable
    qvit doctor --recorded tests/fixtures/jetson/thor-jp70   # a board's recorded outputs (tests)
"""

import json
import os
import re
import subprocess
import sys

from jetson import l4t
from qformat import targets
from qformat.argtypes import ArgumentParser
from qformat.errors import UserError, main_guard
from runtime import board
from runtime.device import gpu_info, jetson_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join("build", "plugins", "libqvit_plugins.so")
BUILD_PLUGINS = "cmake -S runtime/cuda -B build/plugins -DQVIT_CUDA_ARCHS={} && cmake --build build/plugins -j"
#: target rows whose image is not docker/Dockerfile.jetson (with the row's base) -- the rest of the Jetson rows
DOCKERFILES = {"thor-jp7": "docker/Dockerfile.jetson-jp7", "trt10": "docker/Dockerfile.x86"}


def _version(module):
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: both mean "not usable here"
        return None
    return getattr(mod, "__version__", "?")


def _cuda_version(host):
    """The CUDA toolkit release: ``nvcc --version``, else /usr/local/cuda/version.json or version.txt."""
    m = re.search(r"release (\d+\.\d+)", host.command("nvcc") or "")
    if m:
        return m.group(1)
    try:
        return ".".join(json.loads(host.read("usr/local/cuda/version.json"))["cuda"]["version"].split(".")[:2])
    except (TypeError, ValueError, KeyError):
        pass
    m = re.search(r"CUDA Version (\d+\.\d+)", host.read("usr/local/cuda/version.txt") or "")
    return m.group(1) if m else None


def software(host):
    """GPU, TensorRT, ONNX Runtime and plugin path: probed here, or ``host.json`` of a recorded board."""
    if host.recorded:
        rec = json.loads(host.read("host.json") or "{}")
        return {"gpu": rec.get("gpu"), "tensorrt": rec.get("tensorrt"), "onnxruntime": rec.get("onnxruntime"),
                "ort_providers": rec.get("ort_providers", []), "plugin": rec.get("plugin")}
    ort = _version("onnxruntime")
    providers = []
    if ort:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    env = [p for p in os.environ.get("QVIT_PLUGINS", "").split(":") if p]
    plugin = next((p for p in env + [os.path.join(ROOT, PLUGIN)] if os.path.isfile(p)), None)
    return {"gpu": gpu_info(), "tensorrt": _version("tensorrt"), "onnxruntime": ort, "ort_providers": providers,
            "plugin": plugin}


def plugin_archs(host, path):
    """``{"elf": ["87"], "ptx": ["90"]}`` of the plugin library, or None without cuobjdump."""
    if host.which("cuobjdump") is None:
        return None
    out = host.command("cuobjdump", [path])
    if out is None:
        return None
    elf = sorted(set(re.findall(r"ELF file.*?sm_(\d+)", out)), key=int)
    ptx = sorted(set(re.findall(r"PTX file.*?sm_(\d+)", out)), key=int)
    return {"elf": elf, "ptx": ptx}


def pick_target(trt_version, l4t_info, board_name):
    """The target row for this machine: by its TensorRT (a Jetson row of this board first), else by its
    L4T release or board, else ONNX Runtime."""
    name = (board_name or "").lower()
    if trt_version:
        rows = targets.for_trt_version(tuple(int(v) for v in re.findall(r"\d+", trt_version)[:2]))
        mine = [t for t in rows if any(b in name for b in t.boards)] if name else [t for t in rows if not t.boards]
        return (mine or rows or [None])[0]
    if l4t_info and l4t_info.get("target"):
        return targets.get_target(l4t_info["target"])
    return targets.for_board(board_name) if board_name else targets.get_target("ort")


def docker_command(t):
    """``docker build ...`` for a target row, or None where no image is recorded."""
    if t is None or not t.tensorrt:
        return None
    tag = "qvit-edge:" + t.name
    if t.name in DOCKERFILES:
        return "docker build -f {} -t {} .".format(DOCKERFILES[t.name], tag)
    if not t.docker_base:
        return None
    extra = " --build-arg PYCUDA_VERSION=2021.1" if t.python == "3.6" else ""
    return "docker build -f docker/Dockerfile.jetson --build-arg BASE_IMAGE={}{} -t {} .".format(
        t.docker_base, extra, tag)


def _l4t(host):
    def run(argv, **kw):
        if host.recorded:
            raise OSError("recorded board: no dpkg")
        return subprocess.check_output(argv, **kw)

    return l4t.detect(host.path(l4t.RELEASE_FILE), run=run)


def collect(host=None):
    """Every fact of the screen, as one dict (``--json``)."""
    host = host or board.Host()
    name = jetson_model(host.path("proc/device-tree/model"))
    info = _l4t(host) if name or host.read(l4t.RELEASE_FILE) else None
    sw = software(host)
    facts = {"board": name, "l4t": info, "cuda": _cuda_version(host)}
    facts.update(sw)
    facts["plugin_archs"] = plugin_archs(host, sw["plugin"]) if sw["plugin"] else None
    t = pick_target(sw["tensorrt"], info, name)
    facts["target"] = t.name if t else None
    facts["docker"] = docker_command(t)
    facts["board_state"] = board.state(host) if name else None
    return facts


def _cc(facts):
    gpu = facts.get("gpu") or {}
    return gpu.get("compute_capability", "").replace(".", "") or None


def problems(facts):
    """``[(what is wrong, the command that fixes it)]``."""
    out = []
    jetson = facts["board"] is not None
    if facts["tensorrt"] is None and (jetson or facts.get("gpu")):
        out.append(("TensorRT's Python bindings are not importable",
                    "sudo apt-get install python3-libnvinfer" if jetson else "pip install tensorrt"))
    elif facts["tensorrt"] and facts["target"] is None:
        out.append(("TensorRT {} has no target row (qformat/targets.py: {})".format(
            facts["tensorrt"], ", ".join(t.trt_range() for t in targets.TARGETS if t.tensorrt)),
            "use a JetPack / TensorRT of the table, or its Docker image (docker/)"))
    cc = _cc(facts)
    if facts["plugin"] is None and (jetson or facts.get("gpu")):
        out.append(("libqvit_plugins.so is not built (the lowbit format needs it)", BUILD_PLUGINS.format(cc or "87")))
    archs = facts.get("plugin_archs")
    if archs and cc and cc not in archs["elf"]:
        ptx = [p for p in archs["ptx"] if int(p) <= int(cc)]
        built = ", ".join("sm_" + a for a in archs["elf"]) or "nothing"
        out.append(("libqvit_plugins.so has no sm_{} code (built for {}): {}".format(
            cc, built, "the driver JIT-compiles its PTX {} on first load".format(ptx[-1]) if ptx else
            "its kernels cannot run on this GPU"), BUILD_PLUGINS.format(cc)))
    if jetson and facts.get("board_state"):
        out += board.problems(facts["board_state"])
    return out


def _row(label, value):
    return "  {:<13} {}".format(label, value)


def _jetson_rows(f):
    info, st = f["l4t"] or {}, f["board_state"] or {}
    mode, clocks = st.get("nvpmodel"), st.get("clocks")
    temps = st.get("temps_c") or {}
    return [
        _row("L4T", "{} = JetPack {} (from {})".format(info.get("l4t"), info.get("jetpack") or "unknown",
                                                      info.get("source")) if info else "unknown"),
        _row("power mode", "{} ({})".format(mode["name"], mode["id"]) if mode else "unknown (nvpmodel absent)"),
        _row("clocks", "unknown (jetson_clocks --show needs root)" if clocks is None else
             "locked" if clocks["locked"] else "not locked (dynamic frequency scaling)"),
        _row("temperatures", ", ".join("{} {:.1f} C".format(k, v) for k, v in sorted(temps.items())) or "unknown"),
    ]


def render(f):
    """The screen: facts, then the problems with their fixes."""
    gpu, archs = f.get("gpu"), f.get("plugin_archs")
    lines = ["qvit doctor", _row("board", f["board"] or "not a Jetson")]
    if f["board"]:
        lines += _jetson_rows(f)
    lines += [
        _row("GPU", "{} (compute capability {})".format(gpu["name"], gpu["compute_capability"]) if gpu else
             "none visible (pycuda / cuda-python / nvidia-smi)"),
        _row("CUDA", f["cuda"] or "no toolkit found (nvcc, /usr/local/cuda)"),
        _row("TensorRT", f["tensorrt"] or "not installed"),
        _row("ONNX Runtime", "{} ({})".format(f["onnxruntime"], ", ".join(f["ort_providers"]))
             if f["onnxruntime"] else "not installed"),
        _row("plugin", "not built ({})".format(PLUGIN) if not f["plugin"] else "{}: {}".format(
            f["plugin"], "architectures unknown (no cuobjdump on PATH)" if archs is None else
            "sm_{} (PTX {})".format(", sm_".join(archs["elf"]) or "-", ", ".join(archs["ptx"]) or "-"))),
        _row("target", "--target {}".format(f["target"]) if f["target"] else "none fits"),
        _row("docker", f["docker"] or "no image for this target (run from the source tree: pip install -e .)"),
    ]
    found = problems(f)
    lines.append("problems: none" if not found else "problems ({}):".format(len(found)))
    for what, fix in found:
        lines += ["  - " + what, "      fix: " + fix]
    return "\n".join(lines)


@main_guard
def main(argv=None, prog="python3 -m jetson.doctor"):
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--recorded", default=None, metavar="DIR",
                   help="read a board's recorded files and command outputs instead of this machine's")
    args = p.parse_args(argv)
    if args.recorded and not os.path.isdir(args.recorded):
        raise UserError("--recorded {}: no such folder".format(args.recorded))
    host = board.Host(args.recorded, recorded=True) if args.recorded else board.Host()
    facts = collect(host)
    print(json.dumps(facts, indent=1, sort_keys=True) if args.json else render(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
