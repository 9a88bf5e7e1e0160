"""One exception type for bad user input, so every entry point prints one line, not a traceback."""


class UserError(Exception):
    """Bad input the user can fix; the message names the fix. Entry points print it and exit 2."""


class OutputError(UserError, OSError):
    """An output file or folder could not be written (read-only, full, name too long, ...).

    Also an ``OSError``, so callers that handle I/O errors keep working; :func:`main_guard`
    prints it as one ``error:`` line like any other :class:`UserError`.
    """


def describe_oserror(e):
    """``Read-only file system`` / ``File name too long``: the reason of an ``OSError``, one line."""
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(reason).splitlines()[0]


def main_guard(fn):
    """Decorator for CLI ``main`` functions: ``UserError`` -> ``error: ...`` on stderr, exit 2.

    An ``OSError`` that escaped the stage's own handling (a disk that filled up, a file removed
    under it) is reported the same way: one line naming the file, never a traceback.
    """
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            sys.stderr.write("error: {}\n".format(str(e).replace("\n", " ")))
            raise SystemExit(2) from None
        except OSError as e:
            where = " ({})".format(e.filename) if getattr(e, "filename", None) else ""
            sys.stderr.write("error: {}{}\n".format(describe_oserror(e), where))
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise SystemExit(130) from None
    return wrapper
