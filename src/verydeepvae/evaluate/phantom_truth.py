"""Ground-truth counterfactuals of held-out phantoms: what a model's counterfactual ageing should reach.

A phantom subject is fully determined by its seed, and :func:`verydeepvae.data.phantom.generate_volume`
can render it at another age with every other draw kept (its atrophy, hence ventricle enlargement
and cortical thinning, set from its own age noise and lesion load).  Measured with the same
estimator as the model's counterfactuals, these volumes show two things a model alone cannot:
how much of a counterfactual's non-monotonic step is the *measure's* (the estimator reads the true
ventricles of a subject growing older as falling now and then, docs/conditional.md), and how close
each counterfactual image is to the true one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.nifti_load import PreprocessSettings, preprocess_volume
from ..data.phantom import generate_volume, read_participants, voxel_size_mm
from ..data.phantom_demographics import AGE_RANGE
from .data import participant_id

# covariates whose counterfactual the phantom can render (another lesion load would redraw the lesions
# themselves: count and sizes come from it, so "the same brain with more lesions" is not defined yet)
SUPPORTED = ("age",)


def is_phantom_row(row: Mapping[str, object]) -> bool:
    """Whether a participants.tsv row names a phantom subject that can be re-rendered (its seed and grid)."""
    try:
        int(str(row["seed"])), int(str(row["resolution"]))
    except (KeyError, ValueError):
        return False
    return True


def phantom_rows(files: Sequence[str | Path], participants: Mapping[str, dict[str, str]] | None = None
                 ) -> list[dict[str, str]] | None:
    """The participants.tsv row of each file (``sub-0001.nii.gz`` -> participant ``sub-0001``), read from
    the files' folders unless ``participants`` (participant id -> row, e.g. the evaluation's, already
    read) is given; ``None`` when a file has no row (not a phantom population written by this tool)."""
    if participants is None:
        participants = {}
        for tsv in sorted({Path(f).parent / "participants.tsv" for f in files}):
            if tsv.is_file():
                participants.update({r.get("participant_id", ""): r for r in read_participants(tsv)})
    rows = [participants.get(participant_id(f)) for f in files]
    return None if any(r is None for r in rows) else rows


def true_counterfactuals(rows: Sequence[Mapping[str, object]], name: str, values: Sequence[float],
                         settings: PreprocessSettings) -> np.ndarray | None:
    """Each phantom of ``rows`` re-rendered at every value of covariate ``name``, preprocessed as for
    training: (N, V, R, R, R) float32 in [0, 1].  ``None`` when ``name`` is not in :data:`SUPPORTED`, a
    value is outside the phantom's range of it, or a row is not a phantom subject (:func:`is_phantom_row`):
    real scans have no ground truth."""
    low, high = AGE_RANGE
    if name not in SUPPORTED or not rows or not all(is_phantom_row(r) for r in rows):
        return None
    if not all(low <= float(v) <= high for v in values):
        return None
    R = settings.resolution
    out = np.empty((len(rows), len(values), R, R, R), dtype=np.float32)
    for i, row in enumerate(rows):
        seed, resolution = int(str(row["seed"])), int(str(row["resolution"]))
        zooms = np.full(3, voxel_size_mm(resolution))
        for j, value in enumerate(values):
            image, _ = generate_volume(seed, resolution, age=float(value))
            out[i, j], _ = preprocess_volume(image, zooms, settings, name=f"phantom {seed} at {name} {value:g}")
    return out


def monotonic_fraction(curves: np.ndarray) -> float:
    """Fraction of rows of ``curves`` (N, V) that rise strictly at every step."""
    return float(np.mean(np.all(np.diff(np.asarray(curves, float), axis=1) > 0, axis=1)))


def psnr_against_truth(truth: np.ndarray, counterfactuals: np.ndarray, recons: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) over scans and values of the counterfactuals (N, V, R, R, R) against the true volumes
    of the same shape, and of the unchanged reconstructions (N, R, R, R): what moving nothing would get."""
    from ..metrics import psnr

    moved = np.mean([psnr(t, c) for t, c in zip(truth, counterfactuals)])
    unchanged = np.mean([psnr(t, np.broadcast_to(r, t.shape)) for t, r in zip(truth, recons)])
    return float(moved), float(unchanged)
