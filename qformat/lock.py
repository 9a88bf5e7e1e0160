"""One writer per output folder: an ``flock`` held for the writer's lifetime.

A training run, an export, a demo writing PNGs or a video: each takes an exclusive, non-blocking
``fcntl.flock`` on a lock file before it writes, and keeps it until it ends (or the process dies:
the kernel drops the lock with the last descriptor, so a killed writer never leaves a stale lock;
the file itself stays and is reused). The lock file holds the holder's pid, host and command line,
so a second writer is refused in one line naming the holder. Python 3.6-compatible.
"""

import os
import socket
import sys

from .errors import OutputError, UserError, describe_oserror

LOCK_NAME = ".qvit.lock"

#: realpath of the lock file -> open descriptor, for the locks this process holds (re-entrant per process)
_HELD = {}


def lock_file_for(target, inside=True):
    """The lock file of ``target``: ``<folder>/.qvit.lock`` for a folder that persists (``inside``), else
    ``<parent>/.<name>.lock`` beside a file or a folder that is replaced as a whole."""
    target = os.path.abspath(os.fspath(target))
    if inside:
        return os.path.join(target, LOCK_NAME)
    name = os.fsencode(os.path.basename(target))[:64]
    return os.path.join(os.path.dirname(target), "." + os.fsdecode(name) + ".lock")


def _holder(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return " ".join(text.split()) or "another process"


def _owner_line():
    cmd = " ".join(sys.argv)[:300]
    return "pid {} on {}: {}\n".format(os.getpid(), socket.gethostname(), cmd)


def hold(target, flag="--out", inside=True):
    """Take (or re-take, in the same process) the lock of ``target`` for the rest of this process's life.

    Creates the folder that holds the lock file. Raises one-line :class:`UserError` when another
    process holds it, :class:`OutputError` when the lock file cannot be made. Returns the lock path.
    """
    import fcntl

    path = lock_file_for(target, inside)
    key = os.path.realpath(path)
    if key in _HELD:
        return path
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError("{} {}: cannot create its lock file {} ({})".format(
            flag, target, path, describe_oserror(e))) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError("{} {} is in use by {} (lock {}); wait for it to finish or pick another {}".format(
            flag, target, holder, path, flag)) from None
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, _owner_line().encode("utf-8"))
    except OSError:
        pass  # the lock is what counts; the holder's name is a courtesy
    _HELD[key] = fd
    return path


def release(target, inside=True):
    """Give back a lock taken by :func:`hold` (no-op when this process does not hold it)."""
    key = os.path.realpath(lock_file_for(target, inside))
    fd = _HELD.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock; the file stays for the next writer
