"""Figures of conditional generation: a scan beside its counterfactuals, and a measurement against
the requested covariate.  Headless, written atomically (as ``viz``)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .viz import mid_slices, plt, save_figure  # (viz selects the headless backend)

ROWS = (("axial", 2), ("coronal", 1))


def save_counterfactual_strip(volumes: Sequence[np.ndarray], titles: Sequence[str], reference: np.ndarray,
                              path: str | os.PathLike, first_compared: int = 2, suptitle: str | None = None) -> None:
    """Columns: ``volumes`` (e.g. input, reconstruction, counterfactuals...); rows: axial and coronal
    mid-slices (grey, [0, 1]), then the axial difference from ``reference`` (the reconstruction at the
    scan's own covariates) for the columns from ``first_compared`` on (red brighter, blue darker;
    the colour range is symmetric about 0 and shared by the row)."""
    n = len(volumes)
    diffs = [np.asarray(v, np.float32) - np.asarray(reference, np.float32) for v in volumes[first_compared:]]
    limit = max([float(np.abs(d).max()) for d in diffs] + [1e-3])
    fig, axes = plt.subplots(len(ROWS) + 1, n, figsize=(1.5 * n, 1.6 * (len(ROWS) + 1) + (0.3 if suptitle else 0)),
                             squeeze=False)
    for col, volume in enumerate(volumes):
        for row, (plane, index) in enumerate(ROWS):
            ax = axes[row][col]
            ax.imshow(mid_slices(volume)[index], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if row == 0:
                ax.set_title(titles[col], fontsize=7)
            if col == 0:
                ax.set_ylabel(plane, fontsize=7)
        ax = axes[len(ROWS)][col]
        if col >= first_compared:
            image = ax.imshow(mid_slices(diffs[col - first_compared])[2], cmap="RdBu_r", vmin=-limit, vmax=limit,
                              interpolation="nearest")
        else:
            ax.axis("off")
        if col == first_compared:
            ax.set_ylabel("minus recon.", fontsize=7)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    if n > first_compared:
        fig.colorbar(image, ax=list(axes[len(ROWS)][first_compared:]), fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    save_figure(fig, path)


def save_trend(requested: Sequence[float], measured: Sequence[float], path: str | os.PathLike, xlabel: str,
               ylabel: str, real: tuple[Sequence[float], Sequence[float]] | None = None, title: str = "") -> None:
    """Measured value of each sample against its requested covariate (with the real volumes' own
    values when given), and least-squares lines."""
    fig, ax = plt.subplots(figsize=(3.6, 3.0))
    series = [("samples", requested, measured, "tab:orange")]
    if real is not None:
        series.insert(0, ("held-out real", real[0], real[1], "tab:blue"))
    for label, xs, ys, colour in series:
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ax.scatter(xs, ys, s=8, alpha=0.6, color=colour, label=label)
        if len(xs) >= 2 and np.ptp(xs) > 0:
            slope, intercept = np.polyfit(xs, ys, 1)
            grid = np.linspace(xs.min(), xs.max(), 2)
            ax.plot(grid, slope * grid + intercept, color=colour, lw=1)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def save_calibration_figure(results: Sequence, path: str | os.PathLike, tolerance: float) -> None:
    """One panel per calibrated covariate (``evaluate/calibration.py``): the samples' slope ratio to
    the training scans' at each guidance scale (left axis; 1 = the real response; faint lines: each
    sample stream alone; purple: the counterfactuals' change ratio and their scale), their Fréchet
    distance relative to scale 1 (right axis, dashed; realistic up to ``tolerance``, dotted), and
    the chosen scale."""
    numeric = [r for r in results if r.readings]
    fig, axes = plt.subplots(1, max(1, len(numeric)), figsize=(3.6 * max(1, len(numeric)), 3.0), squeeze=False)
    for ax, r in zip(axes[0], numeric):
        scales = [x.scale for x in r.readings]
        ratios = [np.nan if x.slope_ratio is None else x.slope_ratio for x in r.readings]
        for k in range(len(r.readings[0].stream_ratios) if len(r.readings[0].stream_ratios) > 1 else 0):
            ax.plot(scales, [np.nan if len(x.stream_ratios) <= k or x.stream_ratios[k] is None else x.stream_ratios[k]
                             for x in r.readings], "-", color="tab:orange", lw=0.6, alpha=0.35,
                    label="one stream" if k == 0 else None)
        ax.plot(scales, ratios, "o-", color="tab:orange", label="slope ratio")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(r.scale, color="tab:green", lw=1, ls=":", label=f"chosen {r.scale:.2g}")
        cf = r.counterfactual
        if cf is not None and cf.readings:
            ax.plot([x.scale for x in cf.readings], [np.nan if x.change_ratio is None else x.change_ratio
                                                     for x in cf.readings], "x-", color="tab:purple", ms=4, lw=0.8,
                    label="counterfactual change ratio")
            ax.axvline(cf.scale, color="tab:purple", lw=1, ls=":", label=f"counterfactuals {cf.scale:.2g}")
        twin = ax.twinx()
        twin.plot(scales, [x.frechet_ratio for x in r.readings], "s--", color="tab:blue", ms=3, lw=0.8)
        twin.axhline(tolerance, color="tab:blue", lw=0.8, ls=":")
        twin.set_ylabel("Fréchet / scale 1 (dashed)", fontsize=7, color="tab:blue")
        twin.tick_params(labelsize=7)
        ax.set_xlabel("guidance scale", fontsize=8)
        ax.set_ylabel(f"{r.measure} slope / training scans'", fontsize=8)
        ax.set_title(f"{r.name}{'' if r.reached else ' (not reached)'}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
        ax.grid(alpha=0.3)
    if not numeric:
        axes[0][0].text(0.5, 0.5, "no numeric covariate", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    save_figure(fig, path)
