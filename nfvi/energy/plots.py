"""Outputs of one ``nfvi energy`` run: ``density.npz`` (the gridded log-densities) and ``density.png``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from nfvi.runs import atomic_write_bytes

__all__ = ["save_density", "plot_density"]


def save_density(path: Path, grid: dict, box: float, target: str, flow: str, length: int) -> None:
    """``density.npz``: ``centres`` (G,), ``log_q``/``log_p`` (G, G) with row = z2, column = z1, and labels."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, **grid, box=np.float64(box), target=np.str_(target), flow=np.str_(flow), flow_length=np.int64(length)
    )
    atomic_write_bytes(path, buffer.getvalue())


def plot_density(path: Path, grid: dict, box: float, title: str) -> None:
    """``density.png``: exp(-U)/Z_box beside q_K's density on the box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6), constrained_layout=True)
    extent = (-box, box, -box, box)
    for ax, key, name in zip(axes, ("log_p", "log_q"), ("exp(-U) / Z_box", "q_K"), strict=True):
        ax.imshow(np.exp(grid[key]), origin="lower", extent=extent, cmap="viridis", interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
