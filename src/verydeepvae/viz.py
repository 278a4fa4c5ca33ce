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

from . import slice_board  # noqa: E402
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


def _draw(panels, planes, *, panel_inches: float, vmin, vmax, colorbar, **labels):
    """The figure of ``panels[row][col]``, with the orientation letters of ``planes[row][col]``
    (None: no letters) and the titles in ``labels`` (see :func:`slice_board.draw`)."""
    letters = [[None if plane is None else ORIENTATION[plane] for plane in row] for row in planes]
    return slice_board.draw(panels, panel_inches=panel_inches, letters=letters, vmin=vmin, vmax=vmax,
                            colorbar=colorbar, **labels)


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
    if len(volumes) == 0:
        raise ValueError("save_montage needs at least one volume")
    shape = np.shape(volumes[0])
    fig = _draw([mid_slices(v) for v in volumes], [list(PLANES)] * len(volumes), panel_inches=1.9,
                vmin=vmin, vmax=vmax, colorbar=colorbar, suptitle=suptitle,
                col_titles=[slice_label(plane, shape) for plane in PLANES], row_labels=titles)
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
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
) -> None:
    """Two populations (or two readouts of the same volumes) in one picture: row i shows left[i] and
    right[i] side by side, each as its three mid-slices, so both are judged at the same scale and
    contrast."""
    n = min(len(left), len(right))
    if n == 0:
        raise ValueError("save_side_by_side needs at least one volume on each side")
    titles = []
    for side, volume in ((left_title, left[0]), (right_title, right[0])):
        titles += [f"{side if col == 1 else ''}\n{slice_label(plane, np.shape(volume))}"
                   for col, plane in enumerate(PLANES)]
    fig = _draw([mid_slices(left[i]) + mid_slices(right[i]) for i in range(n)], [list(PLANES) * 2] * n,
                panel_inches=1.6, vmin=vmin, vmax=vmax, colorbar=colorbar, col_titles=titles,
                wide_gap_after=[len(PLANES) - 1], row_labels=None if row_labels is None else list(row_labels)[:n],
                suptitle=suptitle)
    save_figure(fig, path)


def save_samples_figure(volumes: Sequence[np.ndarray], means: Sequence[np.ndarray], path: str | os.PathLike,
                        names: Sequence[str], title: str) -> None:
    """Prior samples' mid-slices, one row each (``names``).  With ``means`` (samples whose voxels are
    drawn) each sample is shown beside the mean of p(x | z) of the same latents, so the anatomy the
    model places (ventricles, grey/white contrast) is seen at a glance next to the voxel-level
    uncertainty the draw adds."""
    if not means:
        save_montage(volumes, path, titles=names, suptitle=title)
        return
    save_side_by_side(means, volumes, path, "mean of p(x | z)", "voxels drawn", row_labels=names,
                      suptitle=f"{title}, voxels drawn")


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
    panels, letters, labels = [], [], []
    for i, row in enumerate(rows):
        slices = [mid_slices(volume) for volume in row]
        for p, index in enumerate(indices):
            panels.append([s[index] for s in slices])
            letters.append([PLANES[index]])  # on the first column only
            name = f"{row_titles[i]}\n" if row_titles is not None and p == 0 else ""
            labels.append(name + slice_label(PLANES[index], np.shape(row[0])))
    fig = _draw(panels, letters, panel_inches=1.4, vmin=vmin, vmax=vmax, colorbar=colorbar,
                col_titles=col_titles, row_labels=labels)
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
    slices = [mid_slices(volume) for volume in volumes]
    shape = np.shape(volumes[0])
    fig = _draw([[s[i] for s in slices] for i in range(len(PLANES))], [[plane] for plane in PLANES],
                panel_inches=1.2, vmin=0.0, vmax=1.0, colorbar=colorbar, suptitle=suptitle or None,
                col_titles=titles, row_labels=[slice_label(plane, shape) for plane in PLANES])
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
