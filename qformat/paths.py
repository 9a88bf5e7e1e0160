"""Output locations, checked before any work starts.

A run that trains for an hour and then cannot write its checkpoint has lost the hour, so
every CLI checks its output folder or file first: it must be creatable (no existing *file*
in its way, every new name within the filesystem's byte limit) and writable (a real probe
file, which also catches read-only mounts where ``os.access`` says yes to root).  Nothing
is created here except that probe, which is removed at once.  Python 3.6-compatible.
"""

import errno
import os
import tempfile

from .errors import UserError, describe_oserror
from .io import TEMP_STEM_BYTES, TEMP_SUFFIX

DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096
#: bytes a temp sibling adds around a name of at most TEMP_STEM_BYTES: "." + "." + pid (7) + "-" + 8 + ".tmp"
_TEMP_EXTRA = 1 + 1 + 7 + 1 + 8 + len(TEMP_SUFFIX)


def written_bytes(path):
    """Bytes of the longest path written for ``path``: itself or its temporary sibling (qformat.io)."""
    path = os.path.abspath(os.fspath(path))
    name = len(os.fsencode(os.path.basename(path)))
    return len(os.fsencode(os.path.dirname(path))) + 1 + max(name, min(name, TEMP_STEM_BYTES) + _TEMP_EXTRA)


def _limit(directory, name, default):
    try:
        return int(os.pathconf(directory, name))
    except (OSError, ValueError, AttributeError):
        return default


def _nearest_existing(path):
    """(deepest existing ancestor of ``path`` -- maybe ``path`` itself --, the missing names below it)."""
    p = os.path.abspath(path)
    missing = []
    while not os.path.lexists(p):  # lexists is False for ENAMETOOLONG too: then the name is checked below
        parent = os.path.dirname(p)
        if parent == p:
            break
        missing.append(os.path.basename(p))
        p = parent
    return p, missing[::-1]


def _probe_writable(directory):
    """Create and remove a probe file in ``directory``; the ``OSError`` when that fails, else None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".qvit-probe.{}-".format(os.getpid()), suffix=TEMP_SUFFIX,
                                     dir=directory)
    except OSError as e:
        return e
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return None


def _check_names(flag, path, base, names):
    name_max = _limit(base, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    for name in names:
        n = len(os.fsencode(name))
        if n > name_max:
            short = name if len(name) <= 24 else name[:20] + "..."
            raise UserError("{} {}: the name {!r} is {} bytes, over this filesystem's limit of {} bytes per "
                            "name; use a shorter name".format(flag, path, short, n, name_max))
    path_max = _limit(base, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise UserError("{} {}: the path is longer than this system's limit of {} bytes; use a shorter "
                        "one".format(flag, path, path_max))
    return path_max


def _check_files(flag, path, path_max, files):
    """Every file the command will write under the folder ``path`` (and its temp sibling) must fit PATH_MAX."""
    for rel in files:
        n = written_bytes(os.path.join(path, rel))
        if n >= path_max:
            raise UserError("{} {}: the file {} it will hold (or its temporary name) would be a {}-byte path, over "
                            "this system's limit of {} bytes; use a shorter {}".format(flag, path, rel, n, path_max,
                                                                                      flag))


def _require_writable(flag, path, base):
    err = _probe_writable(base)
    if err is None:
        return
    where = "" if os.path.abspath(path) == base else " (in {})".format(base)
    if getattr(err, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise UserError("{} {} is not writable{}: {}; pick another location".format(
            flag, path, where, describe_oserror(err)))
    raise UserError("{} {}: cannot write there{} ({}); pick another location".format(
        flag, path, where, describe_oserror(err)))


def check_out_dir(path, flag="--out", files=()):
    """Refuse (one-line :class:`UserError`) an output folder that cannot be created or written, or whose
    ``files`` (relative paths the command will write there) would not fit the file system's path limit.

    Creates nothing: the folder itself is made when the first file is written.
    """
    path = os.fspath(path) if path is not None else ""
    if not path:
        raise UserError("{} is empty: give a folder".format(flag))
    base, missing = _nearest_existing(path)
    if not os.path.isdir(base):
        if not missing:
            raise UserError("{} {} is an existing file, not a folder: give a folder path".format(flag, path))
        raise UserError("{} {}: {} is a file, not a folder".format(flag, path, base))
    path_max = _check_names(flag, path, base, missing)
    _check_files(flag, path, path_max, files)
    _require_writable(flag, path, base)


def check_out_file(path, flag):
    """Refuse an output file that cannot be written (a folder in its place, a file in the way of its
    folder, a name over the limit, a read-only place).  A legal name always has a legal temp sibling
    (:func:`qformat.io.temp_prefix`), so the name itself is all that is checked."""
    path = os.fspath(path) if path is not None else ""
    if not path:
        raise UserError("{} is empty: give a file name".format(flag))
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UserError("{} {} is a folder: give a file name".format(flag, path))
    base, missing = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(base):
        raise UserError("{} {}: {} is a file, not a folder".format(flag, path, base))
    path_max = _check_names(flag, path, base, missing + [os.path.basename(path)])
    _check_files(flag, os.path.dirname(os.path.abspath(path)), path_max, [os.path.basename(path)])
    _require_writable(flag, path, base)
