"""The one way this package writes a matplotlib figure: headless (Agg), PNG, atomically."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str) -> None:
    """Lay out, render and close ``fig``; write it to ``path`` atomically (a reader never sees half a PNG)."""
    from qformat.io import atomic_write

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    atomic_write(path, buf.getvalue())
