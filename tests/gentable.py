"""Shared tail of the table generators (gen_trt_api_names.py, gen_trt_onnx_ops.py): write, or --check."""

from __future__ import annotations

import os


def write_or_check(path: str, text: str, check: bool, unit: str) -> int:
    """Write ``text`` to ``path`` (exit status 0), or with ``check`` compare it (1 when the file is stale)."""
    name = os.path.basename(path)
    if check:
        with open(path) as f:
            same = f.read() == text
        print(f"{name} is " + ("up to date" if same else "STALE: regenerate"))
        return 0 if same else 1
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path} ({text.count(chr(10)) - 3} {unit})")
    return 0
