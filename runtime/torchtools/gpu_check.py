"""`make gpu-check`: one command for a short GPU window -- build, prove the kernels exact, measure them.

Steps (each logged, timed, and bounded; the whole run aims at <= 8 minutes on an H100):

1. ``build``      the PyTorch extension (JIT, for the GPU found) and the kernels-only CMake library;
2. ``pytest``     the cuda-marked bit-exactness tests of every kernel, the INT4 tensor-core kernel
                  (tests/test_cuda_int4.py) and its CPU fragment emulation (tests/test_mma_int4.py);
3. ``sanitizer``  compute-sanitizer memcheck and racecheck over small checked cases of each kernel family;
4. ``bench``      ``bench_gemm`` on the DeiT-S layer shapes (W2/W3/W4 x A16/A8/A4 vs cuBLAS FP16 and INT8),
                  the per-layer M = 197 table and the GEMV bandwidth on 8192 x 8192 vs the measured copy;
5. ``e2e``        img/s of a DeiT-S at batch 1 and 32, FP16 vs W4A8 / W4A4 / W2A2 (CUDA graphs and eager);
6. ``ncu``        Nsight Compute on the large-M MMA case and the M = 1 GEMV, when ncu is there;
7. the Orin projection from runtime/roofline.py (labelled PROJECTION).

A tool the image cannot run (compute-sanitizer / ncu: "Device not supported", "LibraryNotLoaded", a
missing binary or library) makes its step SKIPPED with the tool's own line as the reason, not FAILED.
Every step has its own timeout and no step starts after BUDGET_S, so the whole check stays <= 8 minutes.

Results go to ``$OUT`` when it is set (the device tool's output folder), else ``runs/gpu-check/``:
``gpu_check.md`` (summary + tables), ``gpu_check.json``, build/pytest/tools/bench logs, the bench JSONs
(8 files: what a device window brings back).
Without a GPU it checks what it can (tools, the sm_90 kernel build) and says in one line what it skipped.
Nothing is installed: a missing requirement is one ``error:`` line in the first seconds.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from qformat import io as qio
from qformat.argtypes import ArgumentParser
from qformat.errors import UserError, main_guard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Python modules every GPU step needs (all in the GPU image; carry a wheel if one is missing).
REQUIRED_MODULES = ("torch", "numpy", "pytest")
OPTIONAL_MODULES = {"timm": "skips the end-to-end step", "xdist": "pytest runs on one process"}
REQUIRED_TOOLS = ("nvcc", "cmake")
OPTIONAL_TOOLS = {"ninja": "the extension build will fail (torch needs it)",
                  "compute-sanitizer": "skips the sanitizer step", "ncu": "skips the profile step",
                  "nvidia-smi": "no driver line"}
#: Seconds after which no new step starts (QVIT_GPU_CHECK_BUDGET overrides): a device window is short.
BUDGET_S = int(os.environ.get("QVIT_GPU_CHECK_BUDGET", "420"))  # + <= 60 s overrun: <= 8 min
#: What a profiling / sanitizer tool prints when the image cannot run it (not a finding about our kernels):
#: such a step is SKIPPED with the matching line as the reason, never FAILED.
TOOL_UNAVAILABLE = ("Device not supported", "LibraryNotLoaded", "Target application terminated before first",
                    "ERR_NVGPUCTRPERM", "not supported on this device", "Unable to find", "cannot open shared object",
                    "error while loading shared libraries", "No such file or directory")
#: The cuda-marked test files (bit-exactness of every kernel, the INT4 path, its CPU emulation).
CUDA_TESTS = ("tests/test_cuda_kernels.py", "tests/test_cuda_int4.py", "tests/test_cuda_gemv_ring.py",
              "tests/test_cuda_producer.py", "tests/test_mma_int4.py")
#: bench_gemm rows: batch-1 GEMV sizes, M = 197 (DeiT-S batch 1), 197 x 8 and 197 x 32.
BENCH_M = ("1", "16", "197", "1576", "6304")
#: End-to-end DeiT-S variants (weight bits x activation bits) next to FP16.
E2E_MODES = ("w4a8", "w4a4", "w2a2")


class Check:
    """Run state: output folder, per-step records, the clock."""

    def __init__(self, out_dir, has_gpu):
        self.out_dir = out_dir
        self.has_gpu = has_gpu
        self.t0 = time.time()
        self.steps = []
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        PYTHONUNBUFFERED="1")

    def elapsed(self):
        return time.time() - self.t0

    def run(self, name, cmd, log, timeout, env=None, tool=False):
        """Run ``cmd`` with output appended to ``log``; record and print one status line.  ``tool``: a failure
        whose output says the tool cannot run on this image (TOOL_UNAVAILABLE) is SKIPPED with that line."""
        left = BUDGET_S - self.elapsed()
        if left <= 0:
            return self.record(name, "skipped", 0.0, "time budget of {} s spent".format(BUDGET_S))
        timeout = int(min(timeout, left + 60))  # a step may overrun the budget by a minute at most
        t = time.time()
        path = os.path.join(self.out_dir, log)
        with open(path, "a") as f:
            f.write("\n$ {}\n".format(" ".join(cmd)))
            f.flush()
            start = f.tell()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                    env=env or self.env).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout after {} s".format(timeout)
            except OSError as e:  # the binary vanished or is not executable here
                f.write("{}\n".format(e))
                rc = "not runnable: {}".format(e)
        if rc != 0 and tool:
            reason = tool_unavailable(path, start)
            if reason:
                return self.record(name, "skipped", time.time() - t, "tool cannot run here: " + reason)
        status = "ok" if rc == 0 else "FAILED"
        return self.record(name, status, time.time() - t, "" if rc == 0 else "exit {} (see {})".format(rc, log))

    def record(self, name, status, seconds, detail):
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print("[{:6.1f} s] {:<22} {:<8} {}".format(self.elapsed(), name, status, detail), flush=True)
        return status == "ok"


def tool_unavailable(path, start=0):
    """The first output line (from byte ``start`` of the log) saying the tool itself cannot run, or None."""
    try:
        with open(path, errors="replace") as f:
            f.seek(start)
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        if any(p in line for p in TOOL_UNAVAILABLE):
            return line.strip()[:200]
    return None


def preflight():
    """Missing required modules/tools: one error line.  Returns (has_gpu, notes about optional parts)."""
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    missing += [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise UserError("gpu-check needs {} (carry Python packages as wheels: see /work/.library/device "
                        "README, 'a Python package missing there')".format(", ".join(missing)))
    notes = ["{} missing: {}".format(m, why) for m, why in OPTIONAL_MODULES.items()
             if importlib.util.find_spec(m) is None]
    notes += ["{} missing: {}".format(t, why) for t, why in OPTIONAL_TOOLS.items() if shutil.which(t) is None]
    import torch

    return torch.cuda.is_available(), notes


def device_info():
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "capability": "{}.{}".format(p.major, p.minor), "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 1), "torch": torch.__version__, "cuda": torch.version.cuda}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                            "--format=csv,noheader"], stdout=subprocess.PIPE, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    return info


def build_library(check, arch):
    """The kernels-only static library (CMake) for ``arch``: what the TensorRT plugin links."""
    bdir = os.path.join(ROOT, "build", "gpu-check-kernels")
    ok = check.run("build kernels (cmake)", ["cmake", "-S", os.path.join(ROOT, "runtime", "cuda"), "-B", bdir,
                                              "-DQVIT_KERNELS_ONLY=ON", "-DQVIT_CUDA_ARCHS=" + arch], "build.log", 120)
    return ok and check.run("build kernels (make)", ["cmake", "--build", bdir, "-j", str(os.cpu_count() or 4)],
                            "build.log", 300)


def build_extension(check, cc):
    env = dict(check.env, MAX_JOBS=str(os.cpu_count() or 4), QVIT_EXT_VERBOSE="1")
    code = "from runtime.torchtools import gemm_ext; gemm_ext.load_extension(); print('extension ok')"
    return check.run("build torch extension", [sys.executable, "-c", code], "build.log", 420, env=env)


def run_pytest(check):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"] + list(CUDA_TESTS)
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    return check.run("pytest cuda + int4", cmd, "pytest.log", 300)


def run_sanitizer(check):
    if shutil.which("compute-sanitizer") is None:
        return check.record("compute-sanitizer", "skipped", 0.0, "compute-sanitizer not on PATH")
    ok = True
    for tool in ("memcheck", "racecheck"):
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", "--kernel-name", "kns=qvit",
               sys.executable, "-m", "runtime.torchtools.sanitize_cases"]
        ok &= check.run("sanitizer " + tool, cmd, "tools.log", 150, tool=True)
    return ok


def run_bench(check):
    legacy = ["--legacy"] if os.environ.get("QVIT_BENCH_LEGACY", "1") != "0" else []
    ok = check.run("bench_gemm (layers)", [sys.executable, "-m", "runtime.torchtools.bench_gemm"] + legacy +
                   ["--m"] + list(BENCH_M) + ["--out", os.path.join(check.out_dir, "bench_gemm.json")],
                   "bench.log", 300)
    if importlib.util.find_spec("timm") is None:
        return ok and check.record("bench_gemm (e2e)", "skipped", 0.0, "timm missing")
    return ok and check.run("bench_gemm (e2e deit_s)", [sys.executable, "-m", "runtime.torchtools.bench_gemm",
                                                        "--model-e2e", "deit_s", "--e2e-modes"] + list(E2E_MODES) +
                            ["--out", os.path.join(check.out_dir, "bench_e2e.json")],
                            "bench.log", 240)


def run_ncu(check):
    if shutil.which("ncu") is None:
        return check.record("ncu", "skipped", 0.0, "ncu not on PATH")
    ok = True
    for case, kernel in (("mma_deit", "mma_sync"), ("gemv_large", "gemv_dp4a"), ("ring_large", "gemv_ring"),
                         ("int4_deit", "mma_int4")):
        cmd = ["ncu", "--clock-control", "none", "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis",
               "--section", "Occupancy", "--section", "LaunchStats", "-k", "regex:" + kernel, "-c", "1",
               sys.executable, "-m", "runtime.torchtools.sanitize_cases", "--profile", case]
        if case in ("ring_large", "int4_deit") and torch_capability() < (8, 0):
            continue
        ok &= check.run("ncu " + case, cmd, "tools.log", 60, tool=True)
    return ok


def torch_capability():
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gemv_bandwidth(bench):
    """The W4 GEMV on the 8192 x 8192 layer at M = 1 (fp16 x): achieved GB/s and its share of the measured copy,
    for the auto kernel (lowbit_w4a16) and the persistent ring (lowbit_w4ring); the faster one first."""
    copy = bench.get("copy_gbps")
    found = []
    for r in bench.get("rows", []):
        if r.get("model") == "large" and r.get("m") == 1 and r.get("backend") in ("lowbit_w4a16", "lowbit_w4ring") \
                and r.get("gbps"):
            found.append({"gbps": r["gbps"], "copy_gbps": copy, "share_of_copy": r["gbps"] / copy if copy else None,
                          "kernel": r.get("kernel")})
    if not found:
        return None
    found.sort(key=lambda g: -g["gbps"])
    best = dict(found[0])
    best["all"] = found
    return best


def write_summary(check, info):
    bench = _read(os.path.join(check.out_dir, "bench_gemm.json")) or {}
    e2e = _read(os.path.join(check.out_dir, "bench_e2e.json")) or {}
    lines = ["# gpu-check", "", "Device: {}".format(json.dumps(info)), "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += ["| {step} | {status} | {seconds} | {detail} |".format(**s) for s in check.steps]
    if bench.get("markdown"):
        lines += ["", "## Layers", "", bench["markdown"],
                  "", "Device-to-device copy: {:.0f} GB/s".format(bench.get("copy_gbps", 0.0))]
    if bench.get("m197_markdown"):
        lines += ["", "## Per layer at M = 197 (DeiT-S batch 1) vs cuBLAS FP16", "", bench["m197_markdown"]]
    gemv = gemv_bandwidth(bench)
    if gemv:
        lines += ["", "GEMV W4 (fp16 x) 8192x8192 at M = 1: " + ", ".join(
            "{} {:.0f} GB/s = {:.0f}% of the measured copy".format(g["kernel"], g["gbps"],
                                                                     100 * (g["share_of_copy"] or 0))
            for g in gemv["all"])]
    if e2e.get("e2e"):
        from runtime.torchtools.bench_gemm import format_e2e

        lines += ["", "## End to end", "", format_e2e(e2e["e2e"])]
    from runtime import roofline

    lines += ["", "## Orin (PROJECTION, not measured)", "", roofline.precision_markdown()]
    text = "\n".join(lines) + "\n"
    qio.atomic_write(os.path.join(check.out_dir, "gpu_check.md"), text.encode("utf-8"))
    qio.write_json(os.path.join(check.out_dir, "gpu_check.json"),
                   {"device": info, "steps": check.steps, "gemv_bandwidth": gemv, "e2e": e2e.get("e2e"),
                    "orin_projection": roofline.precision_rows()})
    return text


@main_guard
def main(argv=None, prog="python -m runtime.torchtools.gpu_check"):
    ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] + " Results go to $OUT (or runs/gpu-check/)."
                   ).parse_args(argv)
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu-check")
    os.makedirs(out_dir, exist_ok=True)
    has_gpu, notes = preflight()
    for n in notes:
        print("note: " + n)
    check = Check(out_dir, has_gpu)
    if not has_gpu:
        build_library(check, "90")
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False): ran the preflight and the sm_90 "
              "kernels-only build; skipped the extension build, pytest -m cuda, compute-sanitizer, bench_gemm, "
              "the end-to-end run and ncu")
        return 0 if all(s["status"] == "ok" for s in check.steps) else 1
    info = device_info()
    print("device: {}".format(info))
    cc = info["capability"]
    check.env["TORCH_CUDA_ARCH_LIST"] = cc  # every step loads the one cached build
    if build_extension(check, cc):
        build_library(check, cc.replace(".", ""))
        run_pytest(check)
        run_sanitizer(check)
        run_bench(check)
        run_ncu(check)
    text = write_summary(check, info)
    print(text[-6000:])
    return 0 if all(s["status"] in ("ok", "skipped") for s in check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
