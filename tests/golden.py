"""Golden runs: every training method, a few steps on fixed data, fingerprinted (``tests/golden_runs.json``).

A refactor of the training side must leave every number where it was.  Each golden run trains a
fixed ``vit_fmnist`` (seeded random FP teacher, seeded synthetic data, one thread) for a few steps
through the real command line (``train.cli.parse_args`` -> ``train.trainer.run``), then records

* ``exact`` -- the configs the checkpoint's metadata holds (method, bits, quant, distill, vvtq) and the
  op types of the exported graphs: the same on every platform;
* ``coarse`` -- per tensor (checkpoint weights, the objective's resume state, ONNX initializers) the
  float64 sum and sum of absolute values: checked everywhere with a relative tolerance;
* ``platforms[<key>]`` -- sha256 of every tensor and of each exported graph (nodes, functions and
  initializers; no producer metadata), checked where the platform key (torch version, the CPU
  capability ATen dispatches on, the ISA flags oneDNN picks kernels by) is the one recorded.

Record the current code's values (an existing platform entry is kept unless ``--force``)::

    python -m tests.golden --record [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from typing import Any

from qformat.errors import UserError, main_guard

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_runs.json")
#: relative tolerance of the coarse fingerprint (float sums across CPUs and torch versions)
RTOL = 1e-3
#: hex digits kept of each tensor's sha256 (64 bits: equality, not security)
SHA_CHARS = 16
#: ISA flags that change which float kernels MKL/oneDNN run (and so the last bits of a result)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16")

COMMON = ["--model", "vit_fmnist", "--data", "synthetic", "--batch-size", "8", "--epochs", "1",
          "--max-train-batches", "3", "--max-eval-batches", "1", "--calib-batches", "1", "--no-tensorboard",
          "--workers", "0", "--seed", "0", "--device", "cpu", "--bits", "4"]
#: run name -> its flags ({teacher}, {store} are filled in); bit search: frozen after 2 of the 3 steps
RUNS: dict[str, list[str]] = {
    "fp": ["--method", "fp", "--checkpoint", "{teacher}"],
    "baseline": ["--method", "baseline", "--teacher", "{teacher}"],
    "irm": ["--method", "irm", "--teacher", "{teacher}"],
    "dgd": ["--method", "dgd", "--teacher", "{teacher}"],
    "qvit": ["--method", "qvit", "--teacher", "{teacher}"],
    "mp": ["--method", "mp", "--teacher", "{teacher}", "--search-ratio", "0.5", "--bit-lr", "0.6"],
    "qvit-mp": ["--method", "qvit-mp", "--teacher", "{teacher}", "--search-ratio", "0.5", "--bit-lr", "0.6",
                "--bits", "3"],
    "vvtq": ["--method", "vvtq", "--teacher", "{teacher}"],
    "vvtq-multicrop": ["--method", "vvtq", "--teacher", "{teacher}", "--multicrop-kd", "{store}",
                       "--weight-scale", "module"],
    "qvit-obr": ["--method", "qvit", "--teacher", "{teacher}", "--obr", "--module-scales", "--irm-init", "std",
                 "--dgd-on", "q"],
}
#: run name -> exported formats (target ort, no parity images: the graph alone is compared)
EXPORTS: dict[str, tuple[str, ...]] = {"qvit": ("qdq", "lowbit"), "mp": ("qdq",), "vvtq": ("lowbit",)}


def platform_key() -> str:
    """``torch <version> | <ATen CPU capability> | <machine> | <ISA flags>``: where exact hashes hold."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = ",".join(f for f in ISA_FLAGS if f in flags) or platform.processor() or "?"
    return f"torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | {platform.machine()} | {isa}"


# ----------------------------------------------------------------------------- fingerprints

def tensor_sha(t: Any) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    import numpy as np
    import torch

    a = t.detach().cpu().contiguous().numpy() if torch.is_tensor(t) else np.ascontiguousarray(t)
    h = hashlib.sha256(f"{a.dtype}{list(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:SHA_CHARS]


def tensor_sums(t: Any) -> list[float]:
    """[float64 sum, float64 sum of |x|]: the platform-robust fingerprint of a tensor."""
    import numpy as np
    import torch

    a = (t.detach().cpu().double().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float64))
    return [float(f"{a.sum():.7g}"), float(f"{np.abs(a).sum():.7g}")]


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor of a nested dict/list (the objective's resume state), by dotted path."""
    import torch

    if torch.is_tensor(obj):
        return {prefix: obj}
    out: dict[str, Any] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def onnx_fingerprint(path: str) -> tuple[dict, dict, str]:
    """(exact: op types, coarse: initializer sums, sha256 of nodes + functions + initializers)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    h = hashlib.sha256()
    ops: list[str] = []
    graphs = [("", m.graph.node)] + [(f.name, f.node) for f in m.functions]
    for where, nodes in graphs:
        for n in nodes:
            ops.append(f"{where}:{n.domain}:{n.op_type}" if where else f"{n.domain}:{n.op_type}")
            node = onnx.NodeProto()
            node.CopyFrom(n)
            node.ClearField("doc_string")
            h.update(node.SerializeToString(deterministic=True))
    inits = {}
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        h.update(init.name.encode())
        h.update(tensor_sha(a).encode())
        inits[init.name] = tensor_sums(a)
    for v in list(m.graph.input) + list(m.graph.output):
        h.update(v.SerializeToString(deterministic=True))
    return {"ops": ops}, inits, h.hexdigest()


# ----------------------------------------------------------------------------- the runs

def make_teacher(folder: str) -> str:
    """A seeded, randomly initialised FP vit_fmnist checkpoint (the teacher and student start)."""
    import torch

    from train.checkpoint import save_checkpoint
    from train.models import create_model, model_spec

    spec = model_spec("vit_fmnist")
    torch.manual_seed(1234)
    m = create_model("vit_fmnist", num_classes=10).eval()
    meta = {"model": "vit_fmnist", "num_classes": 10, "input_size": list(spec.input_size), "mean": list(spec.mean),
            "std": list(spec.std), "method": "fp", "quant": None}
    return save_checkpoint(os.path.join(folder, "teacher"), m, meta)


def make_store(folder: str, teacher: str) -> str:
    """A tiny soft-label store of the golden data (2 crops, top-3) for multi-crop KD."""
    from train.softlabels import main as softlabels_main

    store = os.path.join(folder, "store")
    if softlabels_main(["--teacher", teacher, "--data", "synthetic", "--out", store, "--crops", "2", "--topk", "3",
                        "--seed", "0", "--quiet", "--chunk-size", "1024"]) != 0:
        raise RuntimeError("the soft-label store could not be written")
    return store


def _train(name: str, folder: str, teacher: str, store: str | None) -> str:
    from train.cli import parse_args
    from train.trainer import run

    out = os.path.join(folder, name)
    flags = [f.replace("{teacher}", teacher).replace("{store}", store or "") for f in RUNS[name]]
    run(parse_args(COMMON + flags + ["--out", out]))
    return out


def _export(ckpt: str, fmt: str, folder: str) -> str:
    from export.cli import main as export_main

    out = os.path.join(folder, fmt)
    # the non-finite guard (issue 22) is an intended graph change after the recording: compare the graph without it
    argv = ["--checkpoint", ckpt, "--format", fmt, "--target", "ort", "--parity-n", "0", "--no-nonfinite-guard"]
    if export_main(argv + ["--out", out]) != 0:
        raise RuntimeError(f"export {fmt} of {ckpt} failed")
    graphs = sorted(f for f in os.listdir(out) if f.endswith(".onnx"))
    if len(graphs) != 1:
        raise RuntimeError(f"export {fmt} wrote {graphs}, expected one graph")
    return os.path.join(out, graphs[0])


#: checkpoint metadata that must stay exactly as it is (what export and --resume read)
META_KEYS = ("method", "bits", "quant", "distill", "vvtq", "num_classes", "input_size")


def fingerprint_run(name: str, folder: str, teacher: str, store: str | None) -> dict[str, Any]:
    """{"exact", "coarse", "sha"} of one golden run and its exports."""
    import torch
    from safetensors.torch import load_file

    out = _train(name, folder, teacher, store)
    with open(os.path.join(out, "last.json")) as f:
        meta = json.load(f)
    exact: dict[str, Any] = {"meta": {k: meta.get(k) for k in META_KEYS}}
    if (exact["meta"].get("vvtq") or {}).get("store_digest"):  # float soft labels: platform-exact only
        exact["meta"]["vvtq"] = dict(exact["meta"]["vvtq"], store_digest="<digest>",
                                     multicrop_kd="<store>")
    tensors = {f"ckpt/{k}": v for k, v in load_file(os.path.join(out, "last.safetensors")).items()}
    state = torch.load(os.path.join(out, "last.state.pt"), weights_only=True)
    tensors.update({f"objective/{k}": v for k, v in flat_tensors(state.get("objective") or {}).items()})
    coarse = {k: tensor_sums(v) for k, v in sorted(tensors.items())}
    sha = {k: tensor_sha(v) for k, v in sorted(tensors.items())}
    sha["objective-keys"] = hashlib.sha256(json.dumps(sorted(tensors)).encode()).hexdigest()
    for fmt in EXPORTS.get(name, ()):
        ex, inits, digest = onnx_fingerprint(_export(os.path.join(out, "last.safetensors"), fmt, out))
        exact[f"onnx/{fmt}"] = ex
        coarse.update({f"onnx/{fmt}/{k}": v for k, v in inits.items()})
        sha[f"onnx/{fmt}"] = digest
    return {"exact": exact, "coarse": coarse, "sha": sha}


def golden_runs(names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Fingerprints of the golden runs ``names`` (all by default), on one thread, in a scratch folder."""
    import torch

    names = list(RUNS) if names is None else names
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="golden-") as folder:
            teacher = make_teacher(folder)
            store = make_store(folder, teacher) if any("{store}" in " ".join(RUNS[n]) for n in names) else None
            return {n: fingerprint_run(n, folder, teacher, store) for n in names}
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the record

def load_record(path: str = RECORD) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def record(path: str = RECORD, force: bool = False, source: str = "") -> str:
    """Write the current code's fingerprints; the exact/coarse parts must match an existing record (they
    are platform-free), and an existing platform entry is replaced only with ``force``."""
    key = platform_key()
    rec = load_record(path) if os.path.isfile(path) else {"runs": {}, "platforms": {}}
    if key in rec["platforms"] and not force:
        raise UserError(f"{path} already holds the hashes of {key!r}; pass --force to replace them")
    runs = golden_runs()
    for name, r in runs.items():
        old = rec["runs"].get(name)
        if old is not None and not force:
            problems = compare_free(old, r)
            if problems:
                raise UserError(f"golden run {name} differs from the record ({problems[0]}); the numbers moved: "
                                "fix the code, or pass --force to re-record every platform-free part")
        rec["runs"][name] = {"exact": r["exact"], "coarse": r["coarse"]}
    rec["platforms"][key] = {"source": source, "sha": {n: r["sha"] for n, r in runs.items()}}
    from qformat.io import atomic_write

    text = json.dumps(rec, indent=1, sort_keys=True)  # one line per tensor: short lists collapsed
    atomic_write(path, (re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
                        + "\n").encode())
    return key


#: config fields added after the recording, with the value that reproduces the recorded behaviour (a run
#: that records exactly this value computes what it did before; any other value is a difference)
ADDED_FIELDS = {("quant", "mixed", "penalty"): "relative"}  # issue 24's --bit-penalty, default the old form


def _without_added(meta: dict[str, Any]) -> dict[str, Any]:
    meta = json.loads(json.dumps(meta))
    for path, default in ADDED_FIELDS.items():
        *parents, leaf = path
        node = meta
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == default:
            del node[leaf]
    return meta


def compare_free(want: dict[str, Any], got: dict[str, Any], rtol: float = RTOL) -> list[str]:
    """Differences in the platform-free parts: exact configs and op lists, and the tensor sums."""
    want, got = ({**r, "exact": {**r["exact"], "meta": _without_added(r["exact"]["meta"])}} for r in (want, got))
    problems = [f"{k}: {got['exact'].get(k)!r} != recorded {v!r}" for k, v in want["exact"].items()
                if got["exact"].get(k) != v]
    problems += [f"{k} is new (not in the record)" for k in got["exact"] if k not in want["exact"]]
    wc, gc = want["coarse"], got["coarse"]
    problems += [f"tensors {sorted(set(wc) ^ set(gc))[:4]} differ in name" for _ in [0] if set(wc) != set(gc)]
    for k in sorted(set(wc) & set(gc)):
        (ws, wa), (gs, ga) = wc[k], gc[k]
        if abs(gs - ws) > rtol * wa + 1e-12 or abs(ga - wa) > rtol * wa + 1e-12:
            problems.append(f"{k}: sum/abs-sum {gs:.9g}/{ga:.9g}, recorded {ws:.9g}/{wa:.9g}")
    return problems


def compare_exact(want: dict[str, str], got: dict[str, str]) -> list[str]:
    """Differences of the platform's sha256 record."""
    return [f"{k}: sha256 differs" for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help="record this code's fingerprints into " + RECORD)
    p.add_argument("--force", action="store_true", help="replace this platform's entry / a changed platform-free part")
    p.add_argument("--source", default="", help="what the record was made from (e.g. the commit)")
    args = p.parse_args(argv)
    if not args.record:
        p.error("nothing to do: pass --record (the check itself is tests/test_golden_runs.py)")
    print(f"recorded {RECORD} for {record(force=args.force, source=args.source)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
