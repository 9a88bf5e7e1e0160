"""The one way ``train`` draws a figure: headless matplotlib, written as a PNG atomically."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str) -> None:
    """Write ``fig`` to ``path`` as a PNG in one step (no half-written file) and close it."""
    import io

    from qformat.io import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    atomic_write(path, buf.getvalue())
