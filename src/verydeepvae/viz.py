"""Pictures people look at instead of numbers: orthogonal mid-slice montages and curves.

Every slice panel is labelled so that it reads without this file: the plane and the slice's
position (``axial z=16/32``: voxel index of the mid-slice and the grid size), orientation letters on
its edges (L/R, A/P, S/I: volumes are RAS+ arrays, shown in neurological convention, the subject's
left on the viewer's left, as FSLeyes does by default), and one colour bar per figure saying what the
grey levels mean (model intensities: 0 = background, 1 = the input's upper clamp: its upper clamp
percentile, or twice its anchor percentile).
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
# (left, right, top, bottom) edge of each displayed plane (see mid_slices)
ORIENTATION = {"sagittal": ("P", "A", "S", "I"), "coronal": ("L", "R", "S", "I"), "axial": ("L", "R", "A", "P")}
AXIS_NAMES = {"sagittal": "x", "coronal": "y", "axial": "z"}
MODEL_INTENSITY = "model intensity (0 background, 1 upper clamp)"


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal slices through the centre of a RAS-ordered volume, displayed upright:
    sagittal (posterior left, superior up), coronal and axial (subject's left on the left; superior,
    respectively anterior, up)."""
    v = np.asarray(volume, dtype=np.float32)
    cx, cy, cz = (s // 2 for s in v.shape)
    return [np.rot90(v[cx, :, :]), np.rot90(v[:, cy, :]), np.rot90(v[:, :, cz])]


def slice_label(plane: str, shape: Sequence[int]) -> str:
    """Where :func:`mid_slices` cuts, e.g. ``axial z=16/32`` (voxel index of the slice / grid size)."""
    axis = PLANES.index(plane)
    return f"{plane} {AXIS_NAMES[plane]}={int(shape[axis]) // 2}/{int(shape[axis])}"


def orientation_letters(ax, plane: str) -> None:
    """L/R, A/P, S/I on the four edges of a slice panel."""
    left, right, top, bottom = ORIENTATION[plane]
    style = dict(color="yellow", fontsize=5, fontweight="bold", transform=ax.transAxes)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _panel(ax, image: np.ndarray, vmin: float | None, vmax: float | None, plane: str | None = None):
    shown = ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if plane is not None:
        orientation_letters(ax, plane)
    return shown


def _colour_bar(fig, axes, image, label: str | None) -> None:
    """One colour bar for the whole figure (every panel shares vmin/vmax)."""
    if label and image is not None:
        bar = fig.colorbar(image, ax=np.asarray(axes).ravel().tolist(), shrink=0.6, aspect=30, pad=0.01)
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=6)


def _figure(nrows: int, ncols: int, width: float, height: float):
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout="constrained")


def save_montage(
    volumes: Sequence[np.ndarray],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    suptitle: str | None = None,
    colorbar: str | None = MODEL_INTENSITY,
) -> None:
    """One row per volume, three columns (sagittal, coronal, axial mid-slices)."""
    n = len(volumes)
    if n == 0:
        raise ValueError("save_montage needs at least one volume")
    fig, axes = _figure(n, 3, 6.6, 2.0 * n + (0.4 if suptitle else 0.0))
    image = None
    for row, volume in enumerate(volumes):
        for col, slice_ in enumerate(mid_slices(volume)):
            ax = axes[row][col]
            image = _panel(ax, slice_, vmin, vmax, PLANES[col])
            if row == 0:
                ax.set_title(slice_label(PLANES[col], np.shape(volume)), fontsize=8)
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    _colour_bar(fig, axes, image, colorbar)
    save_figure(fig, path)


def save_side_by_side(
    left: Sequence[np.ndarray],
    right: Sequence[np.ndarray],
    path: str | os.PathLike,
    left_title: str,
    right_title: str,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    colorbar: str | None = MODEL_INTENSITY,
) -> None:
    """Two populations in one picture: row i shows left[i] and right[i] side by side, each as its
    three mid-slices, so real and generated brains are judged at the same scale and contrast."""
    n = min(len(left), len(right))
    if n == 0:
        raise ValueError("save_side_by_side needs at least one volume on each side")
    fig, axes = _figure(n, 6, 10.8, 1.7 * n + 0.5)
    image = None
    for row in range(n):
        for side, volume in enumerate((left[row], right[row])):
            for col, slice_ in enumerate(mid_slices(volume)):
                ax = axes[row][3 * side + col]
                image = _panel(ax, slice_, vmin, vmax, PLANES[col])
                if row == 0:
                    label = slice_label(PLANES[col], np.shape(volume))
                    ax.set_title(f"{(left_title, right_title)[side]}\n{label}" if col == 1 else f"\n{label}",
                                 fontsize=7)
    _colour_bar(fig, axes, image, colorbar)
    save_figure(fig, path)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    planes: Sequence[str] = PLANES,
    colorbar: str | None = MODEL_INTENSITY,
) -> None:
    """Volumes in a grid (e.g. inputs vs reconstructions): each row of volumes becomes one line of
    panels per plane in ``planes`` (all three by default), each column one volume of the row."""
    indices = [PLANES.index(plane) for plane in planes]
    nrows, ncols = len(rows) * len(indices), max(len(r) for r in rows)
    fig, axes = _figure(nrows, ncols, 1.5 * ncols + 0.8, 1.5 * nrows + 0.3)
    image = None
    for i, row in enumerate(rows):
        for p, index in enumerate(indices):
            line = i * len(indices) + p
            for j in range(ncols):
                ax = axes[line][j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(row):
                    image = _panel(ax, mid_slices(row[j])[index], vmin, vmax, PLANES[index] if j == 0 else None)
                else:
                    ax.axis("off")
                if line == 0 and col_titles is not None and j < len(col_titles):
                    ax.set_title(col_titles[j], fontsize=7)
            name = f"{row_titles[i]}\n" if row_titles is not None and p == 0 else ""
            axes[line][0].set_ylabel(name + slice_label(PLANES[index], np.shape(row[0])), fontsize=6)
    _colour_bar(fig, axes, image, colorbar)
    save_figure(fig, path)


def save_strip(
    volumes: Sequence[np.ndarray],
    path: str | os.PathLike,
    titles: Sequence[str],
    suptitle: str = "",
    colorbar: str | None = MODEL_INTENSITY,
) -> None:
    """Columns of volumes (e.g. an interpolation), rows sagittal / coronal / axial mid-slices
    (model range [0, 1])."""
    n = len(volumes)
    fig, axes = _figure(3, n, 1.3 * n + 0.8, 4.4)
    image = None
    for j, volume in enumerate(volumes):
        for i, slice_ in enumerate(mid_slices(volume)):
            ax = axes[i][j]
            image = _panel(ax, slice_, 0.0, 1.0, PLANES[i] if j == 0 else None)
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(slice_label(PLANES[i], np.shape(volume)), fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    _colour_bar(fig, axes, image, colorbar)
    save_figure(fig, path)


def save_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
) -> None:
    """Line plot of named (x, y) series, with a marker at every point (a series of one point, e.g.
    the first validation, is visible)."""
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o", markersize=3 if len(xs) < 50 else 1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG atomically and free it."""
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
