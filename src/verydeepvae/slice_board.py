"""Many slice panels drawn as one picture: the panels are tiled into one mosaic image shown in one
matplotlib axes, and the labels are text placed around it.

Why hand-written instead of one matplotlib axes per panel under ``layout="constrained"``: each axes
costs about 25 ms to create, and constrained layout measures every tick label of every axes twice
per save.  An evaluation report draws about 120 panels, so its figures took about 20 s at any
resolution; the mosaic draws the same pixels at the same scale in a fraction of that (see
docs/performance.md, "Slice figures").  The layout is computed here in inches instead, from the
panel sizes and the number of text lines around them.

Coordinates: panels are 2-D arrays shown upright (row 0 at the top), so the board's data
coordinates are voxel indices of the mosaic, x to the right and y downwards.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

LINE_INCHES = {5: 0.085, 6: 0.1, 7: 0.115, 8: 0.13, 9: 0.145}  # one text line at that font size (pt)
LETTER_STYLE = dict(color="yellow", fontsize=5, fontweight="bold")


@dataclass(frozen=True)
class Mosaic:
    """Panels tiled on a grid, blank (NaN) between and around them.

    ``image``: (height, width) float32; ``left[j]``/``width[j]``: column j's first voxel and width;
    ``top[i]``/``height[i]``: row i's.  A panel smaller than its cell is centred in it."""

    image: np.ndarray
    left: list[int]
    width: list[int]
    top: list[int]
    height: list[int]

    def centre(self, row: int, col: int) -> tuple[float, float]:
        """(x, y) of the cell's centre in the board's data coordinates."""
        return self.left[col] + self.width[col] / 2 - 0.5, self.top[row] + self.height[row] / 2 - 0.5


def compose(panels: Sequence[Sequence[np.ndarray | None]], gap: int | None = None,
            wide_gap_after: Sequence[int] = ()) -> Mosaic:
    """Tile ``panels[row][col]`` (2-D arrays, or None for an empty cell) into one image.

    Every column is as wide as its widest panel and every row as tall as its tallest.  ``gap``
    (voxels) separates cells: by default 6 % of the largest cell, at least one voxel; after the
    columns in ``wide_gap_after`` the gap is three times wider (to separate groups of columns)."""
    ncols = max((len(row) for row in panels), default=0)
    if not panels or ncols == 0:
        raise ValueError("a slice board needs at least one panel")
    shapes = [[np.shape(p) if p is not None else (0, 0) for p in row] + [(0, 0)] * (ncols - len(row))
              for row in panels]
    height = [max(s[0] for s in row) for row in shapes]
    width = [max(shapes[i][j][1] for i in range(len(panels))) for j in range(ncols)]
    if gap is None:
        gap = max(1, round(0.06 * max(height + width)))
    left, x = [], gap
    for j, w in enumerate(width):
        left.append(x)
        x += w + (3 * gap if j in wide_gap_after else gap)
    top, y = [], gap
    for h in height:
        top.append(y)
        y += h + gap
    image = np.full((y, x), np.nan, dtype=np.float32)
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            h, w = np.shape(panel)
            r, c = top[i] + (height[i] - h) // 2, left[j] + (width[j] - w) // 2
            image[r:r + h, c:c + w] = panel
    return Mosaic(image, left, width, top, height)


def _lines(texts: Sequence[str | None] | None) -> int:
    return max((len(t.split("\n")) for t in texts or () if t), default=0)


def draw(panels: Sequence[Sequence[np.ndarray | None]], *, panel_inches: float,
         letters: Sequence[Sequence[Sequence[str] | None]] | None = None,
         col_titles: Sequence[str | None] | None = None, row_labels: Sequence[str | None] | None = None,
         suptitle: str | None = None, colorbar: str | None = None, vmin: float | None = 0.0,
         vmax: float | None = 1.0, wide_gap_after: Sequence[int] = ()):
    """A figure of the panels (grey scale, ``vmin``..``vmax``, shared; None: all panels' range), with
    column titles above (font 7), row labels rotated on the left (font 6), the four orientation
    letters ``letters[row][col]`` (left, right, top, bottom; None: none) on a panel's edges, an
    optional suptitle (font 9) and one colour bar labelled ``colorbar`` on the right.  Returns
    the figure, unsaved: a bare :class:`Figure`, outside pyplot's figure manager, that ``savefig``
    renders with Agg whatever the backend."""
    mosaic = compose(panels, wide_gap_after=wide_gap_after)
    rows, cols = mosaic.image.shape
    inches = panel_inches / max(mosaic.height + mosaic.width)  # per voxel
    board_w, board_h = cols * inches, rows * inches
    left = 0.06 + LINE_INCHES[6] * _lines(row_labels)
    top = 0.04 + LINE_INCHES[7] * _lines(col_titles) + (LINE_INCHES[9] + 0.08 if suptitle else 0.0)
    bar_label = ""
    if colorbar:  # wrapped to the bar's height: about 18 characters per inch at 7 pt
        bar_label = "\n".join(textwrap.wrap(colorbar, max(12, int(0.8 * board_h * 18))))
    right = 0.06 + (0.55 + LINE_INCHES[7] * _lines([bar_label]) if colorbar else 0.0)
    bottom = 0.04
    fig_w, fig_h = left + board_w + right, top + board_h + bottom
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, bottom / fig_h, board_w / fig_w, board_h / fig_h))
    cmap = matplotlib.colormaps["gray"].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    shown = ax.imshow(np.ma.masked_invalid(mosaic.image), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    pad = 0.04 / inches  # 0.04 inch in voxels
    for j, title in enumerate(col_titles or ()):
        if title and j < len(mosaic.left):
            ax.text(mosaic.centre(0, j)[0], mosaic.top[0] - 0.5 - pad, title, ha="center", va="bottom", fontsize=7)
    for i, label in enumerate(row_labels or ()):
        if label and i < len(mosaic.top):
            ax.text(mosaic.left[0] - 0.5 - pad, mosaic.centre(i, 0)[1], label, rotation=90, ha="right",
                    va="center", fontsize=6)
    for i, row in enumerate(letters or ()):
        for j, names in enumerate(row):
            if names is not None and panels[i][j] is not None:
                _letters(ax, mosaic, i, j, np.shape(panels[i][j]), names)
    if suptitle:
        fig.text(0.5, 1 - 0.04 / fig_h, suptitle, ha="center", va="top", fontsize=9)
    if colorbar:
        cax = fig.add_axes(((left + board_w + 0.1) / fig_w, (bottom + 0.2 * board_h) / fig_h,
                            0.08 / fig_w, 0.6 * board_h / fig_h))
        bar = fig.colorbar(shown, cax=cax)
        bar.set_label(bar_label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def _letters(ax, mosaic: Mosaic, row: int, col: int, shape: tuple[int, int], names: Sequence[str]) -> None:
    """The four orientation letters (left, right, top, bottom) just inside the panel's edges."""
    x, y = mosaic.centre(row, col)
    half_w, half_h = shape[1] / 2, shape[0] / 2
    inset = 0.02 * max(shape)
    left, right, top, bottom = names
    ax.text(x - half_w + inset, y, left, ha="left", va="center", **LETTER_STYLE)
    ax.text(x + half_w - inset, y, right, ha="right", va="center", **LETTER_STYLE)
    ax.text(x, y - half_h + inset, top, ha="center", va="top", **LETTER_STYLE)
    ax.text(x, y + half_h - inset, bottom, ha="center", va="bottom", **LETTER_STYLE)
