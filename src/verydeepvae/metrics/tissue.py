"""Tissue volumes of FLAIR-like brains, and per-feature Wasserstein distances between populations.

A morphometric sanity check that needs no segmentation network: do generated brains have the
same distribution of CSF, grey-matter, white-matter and lesion volumes as real ones?

Assumed contrast (FLAIR-like, skull-stripped, intensities in [0, 1], background 0):
CSF darkest < white matter < grey matter < lesions (hyperintense). This is how the phantom
population is built and roughly how UK Biobank FLAIR looks; it is *not* valid for T1 (where
WM > GM) without changing the class order.

Method (:func:`tissue_volumes`), deliberately simple and fully deterministic:

1. brain = voxels above ``brain_threshold`` (default 0.02: skull-stripped inputs have an exact-zero
   background, while FLAIR CSF can be as dark as ~0.03 with white matter at ~0.4, as in the
   phantom population; generated volumes with a faint non-zero background may need a higher value);
2. a 3-class multi-Otsu threshold (``skimage.filters.threshold_multiotsu``) on brain intensities
   splits them into CSF (< t1), WM (t1..t2) and GM (>= t2);
3. partial-volume correction: in FLAIR a voxel half CSF, half GM has a WM-like intensity, so the
   CSF/GM border (sulci, brain surface) would be counted as WM. WM-class voxels whose 3x3x3
   neighbourhood contains both a CSF-class (or background) voxel and a GM-class voxel are split
   between CSF and GM by linear unmixing, ``f_GM = (v - median(CSF)) / (median(GM) - median(CSF))``
   clipped to [0, 1]. On blurred nested-shell phantoms this cuts the WM error from ~30 % to ~5 %;
4. lesions = brain voxels brighter than ``median(GM) + lesion_k * sigma(GM)``, where sigma(GM) is
   the robust spread 1.4826 * MAD of the GM-class intensities, but at least one WM-GM contrast
   step (median(GM) - median(WM)) above the GM median; they are removed from the GM count.

Other partial-volume voxels are assigned wholly to one class (e.g. the rim of a lesion in WM
looks like GM), so absolute volumes carry a resolution-dependent bias of a few percent; compare
populations at the same resolution (generated vs real), which is what
:func:`wasserstein_by_feature` is for. Lesions are assumed to be a small fraction of the brain;
with a very large lesion load Otsu may split GM from lesions instead of WM from GM.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import wasserstein_distance
from skimage.filters import threshold_multiotsu

from ._arrays import ArrayLike, as_volume_batch, to_numpy

TISSUE_CLASSES = ("csf", "gm", "wm", "lesion")


def tissue_volumes(
    volume: ArrayLike,
    voxel_volume_ml: float,
    brain_threshold: float = 0.02,
    lesion_k: float = 4.0,
) -> dict:
    """Estimated tissue volumes of one FLAIR-like volume (D, H, W), in millilitres.

    ``voxel_volume_ml`` is the volume of one voxel in ml (product of the voxel spacings in mm,
    divided by 1000; e.g. 0.001 for 1 mm isotropic). Returns ``csf_ml``, ``gm_ml``, ``wm_ml``,
    ``lesion_ml``, ``brain_ml`` (their sum) and the intensity thresholds used
    (``threshold_csf_wm``, ``threshold_wm_gm``, ``threshold_lesion``), see the module docstring.
    """
    vb, single = as_volume_batch(volume, "volume", dtype=np.float64)
    if not single and vb.shape[0] != 1:
        raise ValueError("tissue_volumes takes one volume (D, H, W); use tissue_volume_table for a batch")
    if voxel_volume_ml <= 0:
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}")
    v = vb[0]
    brain = v[v > brain_threshold]
    out = {f"{c}_ml": 0.0 for c in TISSUE_CLASSES}
    out.update(brain_ml=0.0, threshold_csf_wm=float("nan"), threshold_wm_gm=float("nan"),
               threshold_lesion=float("nan"))
    if brain.size < 3 or np.ptp(brain) == 0:
        out["brain_ml"] = brain.size * voxel_volume_ml
        return out
    t1, t2 = threshold_multiotsu(brain, classes=3)
    inside = v > brain_threshold
    lab = np.zeros(v.shape, dtype=np.int8)  # 0 background, 1 CSF, 2 GM, 3 WM
    lab[inside] = np.where(brain < t1, 1, np.where(brain < t2, 3, 2))
    gm = v[lab == 2]
    wm = v[lab == 3]
    med_gm = float(np.median(gm))
    sigma_gm = 1.4826 * float(np.median(np.abs(gm - med_gm)))
    step = med_gm - float(np.median(wm)) if wm.size else 0.0
    t_les = med_gm + max(lesion_k * sigma_gm, step)
    n_csf, n_gm, n_wm = float(np.sum(lab == 1)), float(gm.size), float(wm.size)
    # partial-volume correction of the CSF/GM border (step 3 of the module docstring)
    near_csf = ndi.maximum_filter((lab == 1) | ~inside, size=3)
    near_gm = ndi.maximum_filter(lab == 2, size=3)
    border = (lab == 3) & near_csf & near_gm
    if border.any() and np.any(lab == 1):
        med_csf = float(np.median(v[lab == 1]))
        f_gm = np.clip((v[border] - med_csf) / max(med_gm - med_csf, 1e-6), 0.0, 1.0)
        n_wm -= border.sum()
        n_gm += f_gm.sum()
        n_csf += (1.0 - f_gm).sum()
    n_les = float(np.sum(brain > t_les))
    n_gm -= n_les
    out.update(
        csf_ml=n_csf * voxel_volume_ml,
        gm_ml=n_gm * voxel_volume_ml,
        wm_ml=n_wm * voxel_volume_ml,
        lesion_ml=n_les * voxel_volume_ml,
        brain_ml=brain.size * voxel_volume_ml,
        threshold_csf_wm=float(t1),
        threshold_wm_gm=float(t2),
        threshold_lesion=float(t_les),
    )
    return out


def tissue_volume_table(volumes: ArrayLike, voxel_volume_ml: float, **kwargs) -> dict[str, np.ndarray]:
    """:func:`tissue_volumes` for every volume of an (N, D, H, W) batch, as ``{"csf_ml": (N,), ...}``.

    Only the ``*_ml`` keys are kept, ready for :func:`wasserstein_by_feature`.
    """
    vb, _ = as_volume_batch(volumes, "volumes", dtype=np.float32)
    rows = [tissue_volumes(v, voxel_volume_ml, **kwargs) for v in vb]
    keys = [k for k in rows[0] if k.endswith("_ml")]
    return {k: np.array([r[k] for r in rows]) for k in keys}


def wasserstein_by_feature(
    dict_a: Mapping[str, Sequence[float] | ArrayLike],
    dict_b: Mapping[str, Sequence[float] | ArrayLike],
    normalise: bool = False,
) -> dict[str, float]:
    """1-Wasserstein (earth mover's) distance between two populations, feature by feature.

    ``dict_a`` and ``dict_b`` map the same feature names (e.g. ``"gm_ml"``) to 1D arrays of
    per-volume values (e.g. generated and real). Each distance is
    ``scipy.stats.wasserstein_distance`` between the two empirical distributions, in the
    feature's own units (ml for tissue volumes): how far, on average, values must move to turn
    one population into the other. With ``normalise`` each distance is divided by the std of
    ``dict_b``'s values (the reference population), making features comparable; a constant
    reference feature is then left unnormalised.
    """
    if set(dict_a) != set(dict_b):
        raise ValueError(f"feature names differ: {sorted(set(dict_a) ^ set(dict_b))}")
    out = {}
    for k in dict_a:
        a = to_numpy(dict_a[k]).ravel()
        b = to_numpy(dict_b[k]).ravel()
        if a.size == 0 or b.size == 0:
            raise ValueError(f"feature {k!r}: empty population")
        d = float(wasserstein_distance(a, b))
        if normalise:
            sd = float(b.std())
            d = d / sd if sd > 0 else d
        out[k] = d
    return out
