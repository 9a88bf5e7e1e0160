"""Fakes that expose exactly the TensorRT Python names of one release (tests/trt_api_names.txt).

``trt_api_names.txt`` is generated from NVIDIA's binding sources (tests/gen_trt_api_names.py).
A fake class derives from :class:`Strict` and names the TensorRT class it stands for (``_trt``);
when code under ``runtime/`` reads or writes an attribute the release lacks, it gets the
AttributeError the real module would raise (so ``hasattr`` probes answer as on the device),
and every name it does use is recorded in :data:`USED` for the report.  The fakes' own code
and the tests are not checked: only the runtime's use of the API.
"""

from __future__ import annotations

import os
import sys
import types
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "trt_api_names.txt")
RUNTIME_DIR = os.path.join(os.path.dirname(HERE), "runtime") + os.sep


def _load() -> tuple[tuple[str, ...], dict[str, set[str]]]:
    releases: tuple[str, ...] = ()
    names: dict[str, set[str]] = defaultdict(set)
    with open(TABLE) as f:
        for line in f:
            if line.startswith("# releases:"):
                releases = tuple(line.split(":", 1)[1].split())
            elif line.strip() and not line.startswith("#"):
                name, rels = line.split(":", 1)
                for r in rels.split():
                    names[r].add(name)
    return releases, dict(names)


RELEASES, NAMES = _load()
#: release -> the TensorRT names runtime code used on it (filled while the tests run)
USED: dict[str, set[str]] = defaultdict(set)


def release_of(version: str) -> str:
    """``"10.3.0"`` -> ``"10.3"``; a version whose release has no table row is refused."""
    rel = ".".join(version.split(".")[:2])
    if rel not in NAMES:
        raise KeyError(f"no TensorRT name table for {version} (have {', '.join(RELEASES)})")
    return rel


def _runtime_caller() -> bool:
    f = sys._getframe(3)  # _runtime_caller <- _check <- __getattribute__ <- the code reading the name
    return f.f_code.co_filename.startswith(RUNTIME_DIR)


def _check(release: str | None, full: str, what: str = "") -> None:
    if release is None or not _runtime_caller():
        return
    if full not in NAMES[release]:
        raise AttributeError(f"TensorRT {release} has no {full}{what}")
    USED[release].add(full)


class StrictMeta(type):
    """Class-level reads (``trt.Logger.WARNING``) are checked too."""

    def __getattribute__(cls, name):
        if not name.startswith("_"):
            _check(type.__getattribute__(cls, "_release"), f"{type.__getattribute__(cls, '_trt')}.{name}")
        return type.__getattribute__(cls, name)


class Strict(metaclass=StrictMeta):
    _trt = "?"
    _release: str | None = None

    def __getattribute__(self, name):
        if not name.startswith("_"):
            _check(type(self)._release, f"{type(self)._trt}.{name}")
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            _check(type(self)._release, f"{type(self)._trt}.{name}", " (set)")
        object.__setattr__(self, name, value)


def strict_class(release: str, trt_name: str, cls: type) -> type:
    """``cls`` (a fake) as a Strict subclass standing for TensorRT's ``trt_name`` on ``release``."""
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    body.update({"_trt": trt_name, "_release": release})
    return StrictMeta(cls.__name__, (Strict,), body)


def strict_enum(release: str, trt_name: str, **values) -> Strict:
    """An enum namespace (``trt.BuilderFlag``) holding ``values`` as far as ``release`` has them."""
    cls = StrictMeta(trt_name, (Strict,), dict(values, _trt=trt_name, _release=release))
    return cls()


class StrictModule(types.ModuleType):
    """The fake ``tensorrt`` module: module-level names of one release only."""

    _release: str | None = None

    def __getattribute__(self, name):
        if not name.startswith("_") or name == "__version__":
            _check(types.ModuleType.__getattribute__(self, "_release"), name)
        return types.ModuleType.__getattribute__(self, name)
