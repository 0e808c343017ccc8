"""Figures written as PNG files, headless (matplotlib imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path


def new_figure(*args, **kwargs):
    """`pyplot.subplots(*args, **kwargs)` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_png(figure, path: Path) -> None:
    """Lay the figure out, write it to `path` as PNG and release it."""
    from matplotlib import pyplot as plt

    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)
