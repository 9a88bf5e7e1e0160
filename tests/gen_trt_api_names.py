"""Generate ``tests/trt_api_names.txt``: which TensorRT Python names each release has.

The names come from NVIDIA's own pybind11 binding sources (``python/src/**/*.cpp`` and the
package ``__init__.py``) on each ``release/X.Y`` branch of the NVIDIA/TensorRT repository, so
the fakes in the tests expose exactly what the real module of that release exposes, without
installing TensorRT (its wheels come from pypi.nvidia.com, and need a GPU driver to import).

    python3 tests/gen_trt_api_names.py --repo /path/to/TensorRT.git [--check]

Only the classes and enums the runtime can touch are kept (:data:`KEEP`), so the table stays
small and reviewable; nothing of NVIDIA's sources is committed, only the names.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import defaultdict

from gentable import write_or_check

RELEASES = ("8.2", "8.5", "8.6", "10.3", "10.13", "11.1")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trt_api_names.txt")
#: Python-side classes and enums whose members the table lists (plus every module-level name).
KEEP = ("Builder", "IBuilderConfig", "INetworkDefinition", "ILayer", "ITensor", "IOptimizationProfile",
        "OnnxParser", "ParserError", "IPluginRegistry", "Runtime", "ICudaEngine", "IExecutionContext",
        "ITimingCache", "ILogger", "Logger", "BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType",
        "DeviceType", "TensorIOMode", "DataType", "PreviewFeature", "HardwareCompatibilityLevel")
_MEMBER = re.compile(r"\.(def|def_static|def_property|def_property_readonly|def_readwrite|def_readonly|value)"
                     r"\s*\(\s*\"(\w+)\"")
_ENUM = re.compile(r"py::enum_\s*<\s*([\w:]+)\s*>\s*\(\s*(\w+)\s*,\s*\"(\w+)\"")
_MODULE = re.compile(r"\bm\s*\.\s*(def|attr)\s*\(\s*\"(\w+)\"")
_VAR_USE = re.compile(r"\b(\w+)\s*\.\s*def\s*\(")


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo] + list(args), check=True, capture_output=True, text=True).stdout


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"(?m)//.*$", "", text)


def _template_args(text: str, start: int) -> tuple[list[str], int]:
    """Split ``<A, B<C, D>, E>`` starting at ``text[start] == '<'`` into top-level args; return (args, end)."""
    depth, arg, args, i = 0, "", [], start
    while i < len(text):
        ch = text[i]
        if ch == "<":
            depth += 1
            if depth > 1:
                arg += ch
        elif ch == ">":
            depth -= 1
            if depth == 0:
                args.append(arg.strip())
                return args, i + 1
            arg += ch
        elif ch == "," and depth == 1:
            args.append(arg.strip())
            arg = ""
        else:
            arg += ch
        i += 1
    return args, i


class Parsed:
    def __init__(self) -> None:
        self.members: dict[str, set[str]] = defaultdict(set)  # Python class -> member names
        self.cpp: dict[str, str] = {}  # C++ type -> Python class
        self.bases: dict[str, list[str]] = {}  # Python class -> C++ template args after the first
        self.scope: dict[str, str] = {}  # Python enum -> Python class it is nested in (or "")
        self.module: set[str] = set()

    def feed(self, text: str) -> None:
        text = _strip_comments(text)
        events = []
        for m in re.finditer(r"py::class_\s*<", text):
            args, end = _template_args(text, m.end() - 1)
            d = re.match(r"\s*(\w*)\s*[({]\s*(\w+)\s*,\s*\"(\w+)\"", text[end:])
            if d:
                events.append((m.start(), "class", (args, d.group(1), d.group(2), d.group(3))))
        events += [(m.start(), "enum", m.groups()) for m in _ENUM.finditer(text)]
        events += [(m.start(), "member", m.group(2)) for m in _MEMBER.finditer(text)
                   if not re.search(r"\bm\s*$", text[max(0, m.start() - 8):m.start()])]  # m.def: module level
        events += [(m.start(), "module", m.group(2)) for m in _MODULE.finditer(text)]
        events += [(m.start(), "var", m.group(1)) for m in _VAR_USE.finditer(text)]
        events += [(m.start(), "export", None) for m in re.finditer(r"\.export_values\s*\(", text)]
        variables: dict[str, str] = {}
        current = None
        for _pos, kind, data in sorted(events, key=lambda e: e[0]):
            if kind == "class":
                args, var, scope, name = data
                self.cpp[args[0]] = name
                self.bases[name] = args[1:]
                if var:
                    variables[var] = name
                if scope == "m":
                    self.module.add(name)
                current = name
            elif kind == "enum":
                cpp, scope, name = data
                self.cpp[cpp] = name
                self.scope[name] = "" if scope == "m" else variables.get(scope, scope)
                if scope == "m":
                    self.module.add(name)
                current = name
            elif kind == "member" and current is not None:
                self.members[current].add(data)
            elif kind == "module":
                self.module.add(data)
            elif kind == "var" and data in variables:
                current = variables[data]
            elif kind == "export" and current is not None and self.scope.get(current):
                self.members[self.scope[current]] |= self.members[current]

    def feed_init(self, text: str) -> None:
        """Top-level ``def``s and assignments of the package ``__init__.py`` (``nptype``, ``__version__``)."""
        self.module |= set(re.findall(r"(?m)^def (\w+)", text))
        self.module |= set(re.findall(r"(?m)^(\w+)\s*=", text))

    def resolve(self, name: str, seen: frozenset = frozenset()) -> set[str]:
        out = set(self.members.get(name, ()))
        for base in self.bases.get(name, ()):
            py = self.cpp.get(base)
            if py and py not in seen and py != name:
                out |= self.resolve(py, seen | {name})
        return out

    def names(self) -> set[str]:
        out = set(self.module)
        for cls in KEEP:
            if cls in self.members or cls in self.bases:
                out.add(cls)
                out |= {f"{cls}.{m}" for m in self.resolve(cls)}
        return out


def release_names(repo: str, release: str) -> set[str]:
    ref = f"release/{release}"
    files = _git(repo, "ls-tree", "-r", "--name-only", ref, "python/").split()
    p = Parsed()
    for f in sorted(f for f in files if f.startswith("python/src/") and f.endswith(".cpp")):
        p.feed(_git(repo, "show", f"{ref}:{f}"))
    inits = [f for f in files if f.endswith("tensorrt/__init__.py") and "frontend_sdist" not in f
             and "/plugin/" not in f]
    for f in inits:
        p.feed_init(_git(repo, "show", f"{ref}:{f}"))
    return p.names()


def render(table: dict[str, set[str]]) -> str:
    every = sorted(set().union(*table.values()))
    lines = ["# TensorRT Python names per release, generated by tests/gen_trt_api_names.py from NVIDIA/TensorRT's",
             "# python/ binding sources (release/X.Y branches). Do not edit; regenerate.",
             "# releases: " + " ".join(RELEASES)]
    for name in every:
        lines.append(f"{name}: {' '.join(r for r in RELEASES if name in table[r])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default="/work/.mirror/NVIDIA+TensorRT/repo", help="a clone of NVIDIA/TensorRT")
    p.add_argument("--check", action="store_true", help="fail if the committed table differs")
    args = p.parse_args(argv)
    return write_or_check(OUT, render({r: release_names(args.repo, r) for r in RELEASES}), args.check, "names")


if __name__ == "__main__":
    sys.exit(main())
