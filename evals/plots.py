"""Figures of the evals: matplotlib without pyplot (no display, no global state), written through
the storage seam so a plot can go next to its JSON in a local folder or an ``s3://`` run."""

from __future__ import annotations

import io

from data_pipeline import storage


def new_figure(width: float = 6.0, height: float = 4.0):
    """A figure on the Agg canvas and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig, url: str) -> bytes:
    """Lay out, render to PNG, write to ``url``; returns the bytes."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    storage.write_bytes(url, data)
    return data
