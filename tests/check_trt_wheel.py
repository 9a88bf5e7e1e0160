"""Check ``tests/trt_api_names.txt`` against a real TensorRT Python binding wheel (no GPU, no import).

The bindings (``tensorrt-cu12-bindings`` / ``-cu13-bindings`` on PyPI) cannot be imported here: they
link ``libnvinfer``, whose wheel downloads from NVIDIA's own index at install time.  But every name
pybind11 binds is a string literal in ``tensorrt.so``; the linker may merge a literal into the tail
of a longer one, so a name is *present* when some string ends with it.  Absence is then certain:
a name of the table's newest release that no string ends with is not bound by this wheel.

    pip download --no-deps tensorrt-cu12-bindings==11.4.0.106 -d /tmp/trtw
    python3 tests/check_trt_wheel.py /tmp/trtw/tensorrt_cu12_bindings-11.4.0.106-*.whl [--release 11.1]

Prints the table names absent from the wheel (exit 1 if any) and, for information, the names the
table says were removed before ``--release`` that the wheel still carries as strings.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile

from trt_names import NAMES, RELEASES

_STRING = re.compile(rb"[\x20-\x7e]{2,}")


def wheel_strings(path: str) -> tuple[list[str], str]:
    """(the printable strings of ``tensorrt.so``, the package ``__init__.py``) of a bindings wheel."""
    with zipfile.ZipFile(path) as z:
        so = next(n for n in z.namelist() if n.endswith("/tensorrt.so"))
        init = next((n for n in z.namelist() if n.endswith("tensorrt_bindings/__init__.py")), None)
        blob = z.read(so)
        text = z.read(init).decode() if init else ""
    return sorted({m.group(0).decode() for m in _STRING.finditer(blob)}), text


def check(strings: list[str], init: str, release: str) -> tuple[list[str], list[str]]:
    """(names of ``release`` the wheel lacks, names removed by ``release`` that the wheel still has)."""
    def present(name: str) -> bool:
        last = name.split(".")[-1]
        return last in init or any(s.endswith(last) for s in strings)

    missing = sorted(n for n in NAMES[release] if not present(n))
    older = set().union(*(NAMES[r] for r in RELEASES if r != release)) - NAMES[release]
    return missing, sorted(n for n in older if present(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", help="a tensorrt-cuXX-bindings wheel (pip download --no-deps ...)")
    p.add_argument("--release", default=RELEASES[-1], choices=RELEASES, help="the table release it should match")
    args = p.parse_args(argv)
    strings, init = wheel_strings(args.wheel)
    missing, kept = check(strings, init, args.release)
    print(f"{len(NAMES[args.release]) - len(missing)}/{len(NAMES[args.release])} TensorRT {args.release} names "
          f"bound by {args.wheel.split('/')[-1]}")
    for n in missing:
        print(f"  not bound: {n}")
    if kept:
        print(f"  {len(kept)} names the table has only before {args.release} still appear as strings (maybe in "
              f"docstrings): {', '.join(kept[:12])}{' ...' if len(kept) > 12 else ''}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
