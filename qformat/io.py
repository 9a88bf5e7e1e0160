"""Atomic artifact writes and the sidecar JSON that travels with every model file.

Every stage writes through :func:`atomic_write` (temp file in the same directory, fsync,
rename), so an interrupted run never leaves a half-written checkpoint, ONNX or engine.
Temp names are bounded (:func:`temp_prefix`), so a legal 250-byte file name still has a
legal temporary sibling, and they carry the writer's pid, so :func:`remove_stale_temps`
can clean what a killed run left behind without touching a live writer's file.
Any ``OSError`` of a write becomes one :class:`~qformat.errors.OutputError` naming the file.
Python 3.6-compatible: the runtime reads sidecars on the Jetson.
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

from .errors import OutputError, UserError, describe_oserror

TEMP_SUFFIX = ".tmp"
#: bytes of the target's name kept in its temp name: "." + 64 + "." + pid + "-" + 8 random + ".tmp" < 100
TEMP_STEM_BYTES = 64

#: Test hooks: each is called as ``hook(event, path)`` with event ``"written"`` (the temp file is
#: complete and synced, not yet renamed) or ``"committed"`` (renamed into place). Tests use them
#: to interrupt a save at every point (SIGKILL-style); nothing else should.
WRITE_HOOKS = []


def temp_prefix(path):
    """The temp-file prefix for ``path``: ``.<name, cut to 64 bytes>.<pid>-`` (mkstemp adds the rest)."""
    base = os.fsencode(os.path.basename(os.fspath(path)))[:TEMP_STEM_BYTES]
    return "." + os.fsdecode(base) + ".{}-".format(os.getpid())


def _pid_of_temp(name):
    """The writer's pid encoded in one of our temp names, or None for any other file."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    tail = name[:-len(TEMP_SUFFIX)].rsplit(".", 1)
    if len(tail) != 2 or "-" not in tail[1]:
        return None
    pid = tail[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(directory):
    """Delete temp files a killed writer left in ``directory`` (its pid is gone); return their names."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        pid = _pid_of_temp(name)
        if pid is None or _alive(pid):
            continue
        p = os.path.join(directory, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):  # a temp folder (the demo's video grows in one)
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(name)
        except OSError:
            pass
    return removed


def _fire(event, path):
    for hook in list(WRITE_HOOKS):
        hook(event, path)


def output_error(path, e):
    """The one-line :class:`OutputError` for an ``OSError`` ``e`` raised while writing ``path``."""
    where = getattr(e, "filename", None)
    extra = ""
    if where and os.fspath(where) != os.fspath(path) and TEMP_SUFFIX not in os.path.basename(os.fspath(where)):
        extra = " ({})".format(os.fspath(where))
    err = OutputError("cannot write {}: {}{}".format(path, describe_oserror(e), extra))
    err.errno = getattr(e, "errno", None)
    return err


def kept_error(path, e, what="file"):
    """:func:`output_error`, saying that the previous ``path`` (when there is one) was left as it was."""
    err = output_error(path, e)
    if os.path.lexists(path):
        err = OutputError("{}; the previous {} is unchanged".format(err, what))
        err.errno = getattr(e, "errno", None)
    return err


def atomic_write(path, data):
    """Write ``bytes`` to ``path`` atomically (same-directory temp file + ``os.replace``).

    Raises :class:`OutputError` (a ``UserError`` and an ``OSError``) when it cannot.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=d)
    except FileExistsError as e:  # makedirs met a file where a folder should be
        raise OutputError("cannot write {}: {} is a file, not a folder".format(path, e.filename or d)) from None
    except OSError as e:
        raise output_error(path, e) from None
    try:
        try:
            try:
                _write_all(fd, data)
                if os.fstat(fd).st_size != len(data):  # verify before the old file is replaced
                    raise OSError(errno.EIO, "wrote {} of {} bytes".format(os.fstat(fd).st_size, len(data)))
                os.fsync(fd)
            finally:
                os.close(fd)
            _fire("written", path)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are shared (containers, other users)
            os.replace(tmp, path)
        except OSError as e:
            raise kept_error(path, e) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fire("committed", path)


def _write_all(fd, data):
    """``os.write`` until every byte is out (a short write is retried, ENOSPC/EIO raise)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned {}".format(n))
        view = view[n:]


def fsync_path(path):
    """fsync a file written by someone else (OpenCV's video writer) before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_path(tmp, path, what="file"):
    """Rename a finished temporary file or folder ``tmp`` onto ``path`` in one step.

    A folder replaces the folder at ``path`` (moved aside first, removed after the swap), so a reader
    sees the old folder or the new one, never a mix. On failure the old ``path`` is left as it was,
    ``tmp`` is removed and one :class:`OutputError` says so.
    """
    tmp, path = os.fspath(tmp), os.fspath(path)
    aside = None
    try:
        if os.path.isdir(tmp) and os.path.isdir(path) and os.listdir(path):
            aside = tempfile.mkdtemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX,
                                     dir=os.path.dirname(os.path.abspath(path)))
            os.rename(path, os.path.join(aside, "old"))
        try:
            os.replace(tmp, path)  # a folder onto a missing or empty folder: one rename as well
        except OSError:
            if aside is not None:  # put the old folder back
                os.rename(os.path.join(aside, "old"), path)
            raise
    except OSError as e:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _unlink_quiet(tmp)
        raise kept_error(path, e, what) from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _fire("committed", path)


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


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
    except OSError as e:
        raise UserError("cannot read {} {}: {}".format(what, path, describe_oserror(e))) from None


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


def sha256_bytes(data):
    """Hex SHA-256 of ``bytes`` (what a sidecar records of the artifact written beside it)."""
    return hashlib.sha256(data).hexdigest()
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
