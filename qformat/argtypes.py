"""Command-line number checks shared by every CLI, as argparse ``type=`` functions.

A flag like ``--warmup -5`` or ``--duration 0`` must be refused where it is parsed, with the
flag's name and the accepted range, instead of being quietly clamped, ignored or turned into
a traceback minutes later.  :class:`ArgumentParser` makes every argparse error one
``error: ...`` line (exit code 2 through :func:`qformat.errors.main_guard`), like every other
bad input.  Python 3.6-compatible (the runtime CLIs use it on the Jetson).
"""

import argparse
import math

from . import MAX_BITS, MIN_BITS
from .errors import UserError

#: numpy / torch seeds are unsigned 32-bit
SEED_MAX = 2 ** 32 - 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise :class:`UserError` (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UserError("{} (see {} --help)".format(message, self.prog))

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = argparse.ArgumentParser.parse_known_args(self, args, namespace)
        for a in self._actions:  # argparse turns "--flag=--" into [] (it drops the "--"): a value was expected
            value = getattr(ns, a.dest, None)
            if type(a).__name__ != "_StoreAction" or value != [] or value is a.default:
                continue
            if a.nargs is None or a.nargs == "+":
                self.error("argument {}: expected {} value".format(
                    "/".join(a.option_strings), "one" if a.nargs is None else "at least one"))
        return ns, rest


def _number(text, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError("expected {}, got {!r}".format(
            "an integer" if kind is int else "a number", text)) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError("expected a finite number, got {!r}".format(text))
    return value


def int_range(lo=None, hi=None, what=None):
    """``type=`` for an integer in ``[lo, hi]`` (either bound may be None)."""
    def parse(text):
        v = _number(text, int)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(_range_msg(v, lo, hi, what))
        return v
    parse.__name__ = "integer"
    return parse


def float_range(lo=None, hi=None, lo_open=False, hi_open=False, what=None):
    """``type=`` for a finite number in ``[lo, hi]``; ``lo_open``/``hi_open`` exclude the bound."""
    def parse(text):
        v = _number(text, float)
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or \
              (hi is not None and (v > hi or (hi_open and v == hi)))
        if bad:
            raise argparse.ArgumentTypeError(_range_msg(v, lo, hi, what, lo_open, hi_open))
        return v
    parse.__name__ = "number"
    return parse


def _range_msg(v, lo, hi, what, lo_open=False, hi_open=False):
    def g(x):
        return "{:g}".format(x) if isinstance(x, float) else str(x)

    if lo is not None and hi is not None:
        rng = "in {}{}, {}{}".format("(" if lo_open else "[", g(lo), g(hi), ")" if hi_open else "]")
    elif lo is not None:
        rng = "{} {}".format(">" if lo_open else ">=", g(lo))
    else:
        rng = "{} {}".format("<" if hi_open else "<=", g(hi))
    return "must be {}{}, got {}".format(rng, " ({})".format(what) if what else "", g(v))


positive_int = int_range(1)
nonneg_int = int_range(0)
seed_int = int_range(0, SEED_MAX)
positive_float = float_range(0.0, lo_open=True)
nonneg_float = float_range(0.0)
fraction = float_range(0.0, 1.0)
bits_int = int_range(MIN_BITS, MAX_BITS, what="bits")


def int_list(text, lo=1, what="--batch"):
    """``"1,4,8"`` -> sorted unique ints >= ``lo``; UserError otherwise (comma lists are not argparse types)."""
    try:
        out = sorted(set(int(v) for v in str(text).split(",") if v.strip()))
    except ValueError:
        raise UserError("{} takes a comma list of integers like 1,4,8, got {!r}".format(what, text)) from None
    if not out or out[0] < lo:
        raise UserError("{} values must be >= {}, got {!r}".format(what, lo, text))
    return out


def check_le(small, large, small_flag, large_flag):
    """Refuse ``small > large`` between two flags (e.g. --batch above --max-batch)."""
    if small is not None and large is not None and small > large:
        raise UserError("{} {} is above {} {}: raise {} or lower {}".format(
            small_flag, small, large_flag, large, large_flag, small_flag))
