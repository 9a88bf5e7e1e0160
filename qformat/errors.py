"""One exception type for bad user input, so every entry point prints one line, not a traceback."""


class UserError(Exception):
    """Bad input the user can fix; the message names the fix. Entry points print it and exit 2."""


def main_guard(fn):
    """Decorator for CLI ``main`` functions: ``UserError`` -> ``error: ...`` on stderr, exit 2."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            sys.stderr.write("error: {}\n".format(e))
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise SystemExit(130) from None
    return wrapper
