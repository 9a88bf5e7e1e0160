"""The layering the architecture promises, checked on the source and in a process without torch.

train -> (checkpoint + specs) -> export -> ONNX + sidecar -> runtime; qformat under all of them.
``export`` reaches ``train`` through train.deploy only and never imports ``runtime``; the
runtime's device core imports only qformat, numpy and its runtime libraries; no import cycles.
"""

import ast
import glob
import os
import subprocess
import sys

from conftest import make_toy_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("qformat", "train", "export", "runtime", "jetson", "qvit", "experiments")
#: what the runtime's device core may import besides the standard library, qformat and itself
DEVICE_LIBS = {"numpy", "onnxruntime", "tensorrt", "pycuda", "cuda", "cv2", "onnx", "matplotlib"}
#: the one door to the torch side: --backend torch loads it, inside a function
TORCH_DOOR = ("runtime.backends", "runtime.torchtools.backend")


def _modules():
    out = {}
    for pkg in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _imports(name):
    """Every module ``name`` imports, at any depth of its code (function-level imports included)."""
    path = MODULES[name]
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return found


def _internal(name):
    """The repository modules ``name`` imports (resolved to the nearest module that exists)."""
    out = set()
    for imp in _imports(name):
        while imp and imp not in MODULES:
            imp = imp.rpartition(".")[0]
        if imp and imp != name:
            out.add(imp)
    return out


def _device_core():
    return sorted(m for m in MODULES if m.startswith("runtime.") and m.count(".") == 1)


def test_export_reaches_train_through_one_function_and_never_runtime():
    for mod in (m for m in MODULES if m.startswith("export")):
        deps = _internal(mod)
        assert not [d for d in deps if d.startswith("runtime")], mod
        assert {d for d in deps if d.startswith("train")} <= {"train.deploy"}, (mod, deps)
    assert any("train.deploy" in _internal(m) for m in MODULES if m.startswith("export"))


def test_device_core_imports_only_qformat_numpy_and_runtime_libraries():
    stdlib = set(sys.stdlib_module_names)
    assert len(_device_core()) >= 15
    for mod in _device_core() + [m for m in MODULES if m.startswith(("qformat", "jetson", "qvit"))]:
        for imp in _imports(mod):
            top = imp.split(".")[0]
            if top in ("qformat", "runtime", "jetson") and not imp.startswith("runtime.torchtools"):
                continue
            if (mod, imp) == TORCH_DOOR:
                continue
            if mod.startswith("qvit") and top in PACKAGES:  # the dispatcher loads stages by name only
                continue
            assert top in stdlib or top in DEVICE_LIBS, f"{mod} imports {imp}"
    for mod in (m for m in MODULES if m.startswith("qformat")):
        assert {d.split(".")[0] for d in _internal(mod)} <= {"qformat"}, mod


def test_no_import_cycles():
    graph = {m: _internal(m) for m in MODULES}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []
    pkgs = {(a.split(".")[0], b.split(".")[0]) for a, deps in graph.items() for b in deps}
    assert not [(a, b) for a, b in pkgs if a != b and (b, a) in pkgs]


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "train", "torchvision"):
            raise ImportError("no module named " + name + " (blocked: a Jetson has no torch)")
        return None
sys.meta_path.insert(0, Block())
"""


def test_device_core_runs_an_ort_bench_where_torch_cannot_be_imported(tmp_path):
    onnx_path = make_toy_model(tmp_path, "toy_w4a4.qdq")
    core = _device_core() + ["jetson.bench_matrix", "jetson.l4t", "jetson.tegrastats", "qvit.cli"]
    code = BLOCKER + f"""
import importlib
for m in {core!r}:
    importlib.import_module(m)
try:
    import torch
except ImportError:
    print("torch blocked")
from qvit.cli import main
rc = main(["bench", "--onnx", {onnx_path!r}, "--iters", "3", "--warmup", "1", "--json", {str(tmp_path / "b.json")!r}])
print("rc", rc, "torch" in sys.modules, "train" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert "torch blocked" in out and out[-1] == "rc 0 False False", r.stdout[-2000:]
    assert any(line.startswith("bench: 1 run(s)") for line in out)


def test_torch_backend_without_torch_is_one_clear_line(tmp_path):
    code = BLOCKER + f"""
from runtime import bench
bench.main(["--checkpoint", {str(tmp_path / "x.safetensors")!r}, "--iters", "1"])
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the torch backend needs torch"), r.stderr
