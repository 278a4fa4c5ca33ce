"""Pictures people look at instead of numbers: orthogonal mid-slice montages and curves.

Headless (Agg backend) so it works on clusters; every PNG is written atomically.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import write_with  # noqa: E402

PLANES = ("sagittal", "coronal", "axial")


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal slices through the centre of a RAS-ordered volume, displayed upright."""
    v = np.asarray(volume, dtype=np.float32)
    cx, cy, cz = (s // 2 for s in v.shape)
    return [np.rot90(v[cx, :, :]), np.rot90(v[:, cy, :]), np.rot90(v[:, :, cz])]


def save_montage(
    volumes: Sequence[np.ndarray],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    suptitle: str | None = None,
) -> None:
    """One row per volume, three columns (sagittal, coronal, axial mid-slices)."""
    n = len(volumes)
    if n == 0:
        raise ValueError("save_montage needs at least one volume")
    fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n + (0.4 if suptitle else 0.0)), squeeze=False)
    for row, volume in enumerate(volumes):
        for col, image in enumerate(mid_slices(volume)):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(PLANES[col], fontsize=8)
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_side_by_side(
    left: Sequence[np.ndarray],
    right: Sequence[np.ndarray],
    path: str | os.PathLike,
    left_title: str,
    right_title: str,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> None:
    """Two populations in one picture: row i shows left[i] and right[i] side by side, each as its
    three mid-slices, so real and generated brains are judged at the same scale and contrast."""
    n = min(len(left), len(right))
    if n == 0:
        raise ValueError("save_side_by_side needs at least one volume on each side")
    fig, axes = plt.subplots(n, 6, figsize=(10.0, 1.7 * n + 0.5), squeeze=False)
    for row in range(n):
        for side, volume in enumerate((left[row], right[row])):
            for col, image in enumerate(mid_slices(volume)):
                ax = axes[row][3 * side + col]
                ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{(left_title, right_title)[side]}: {PLANES[col]}" if col == 1 else PLANES[col],
                                 fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    plane: str = "axial",
) -> None:
    """A grid of one mid-slice per volume: rows x columns (e.g. inputs vs reconstructions)."""
    index = PLANES.index(plane)
    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(mid_slices(row[j])[index], cmap="gray", vmin=vmin, vmax=vmax)
            else:
                ax.axis("off")
            if i == 0 and col_titles is not None and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
        if row_titles is not None:
            axes[i][0].set_ylabel(row_titles[i], fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def save_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
) -> None:
    """Line plot of named (x, y) series."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | os.PathLike) -> None:
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
