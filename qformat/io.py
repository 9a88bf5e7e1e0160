"""Atomic artifact writes and the sidecar JSON that travels with every model file.

Every stage writes through :func:`atomic_write` (temp file in the same directory, fsync,
rename), so an interrupted run never leaves a half-written checkpoint, ONNX or engine.
Python 3.6-compatible: the runtime reads sidecars on the Jetson.
"""

import hashlib
import json
import os
import subprocess
import tempfile

from .errors import UserError


def atomic_write(path, data):
    """Write ``bytes`` to ``path`` atomically (same-directory temp file + ``os.replace``)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are shared (containers, other users)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path, what="JSON file"):
    """Read JSON or raise a one-line :class:`UserError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError("{} not found: {}".format(what, path))
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError("{} {} is corrupt ({}); re-create it".format(what, path, e)) from None


def sidecar_path(artifact):
    """``model.onnx`` -> ``model.json``; ``model.engine`` -> ``model.engine.json``."""
    artifact = os.fspath(artifact)
    if artifact.endswith(".onnx"):
        return artifact[: -len(".onnx")] + ".json"
    return artifact + ".json"


def sha256_file(path, chunk=1 << 20):
    """Hex SHA-256 of a file (engine cache keys, sidecar provenance)."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


#: The checkout this package lives in (for :func:`code_revision`).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_revision(repo=REPO_ROOT):
    """Short git revision of the checkout at ``repo``, or "unknown" (e.g. an installed wheel)."""
    try:
        out = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=repo, stderr=subprocess.DEVNULL,
                                      timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.decode("ascii", "replace").strip()
    return rev or "unknown"
