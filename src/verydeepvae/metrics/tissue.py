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

:func:`flair_partial_volumes` is the estimator of the evaluation report: a partial-volume model
for volumes preprocessed as for training at 32³-64³, where the classes above break down because
nearly every voxel is a mixture (the brain boundary at a relative mid-intensity level, a smooth
local white-matter reference, contrast adaptation, and tissue-fraction response curves fitted to
the phantom's exact partial-volume fractions). It also estimates the ventricles. Method and
validation: its docstring and ``docs/morphometry.md``.
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


# ------------------------------------------------------------------ partial-volume model (morphometry)
#
# Response curves of the partial-volume model of :func:`flair_partial_volumes` (used by the
# evaluation report): the expected fraction of each tissue in an interior brain voxel as a
# function of its normalised intensity u' (piecewise linear between the knots u' = 0, 0.1, ...,
# 2.0; u' is the intensity over the local white-matter reference, contrast-adapted, see the
# function). Fitted by least squares to the exact partial-volume fractions of phantom subjects
# (population seed 1, 40 subjects at 32³ and 40 at 64³, the fraction maps carried through the same
# preprocessing as the images) and validated on population seed 2 (docs/morphometry.md). Rows sum
# to 1. Read across: dark voxels are CSF mixed mostly with grey matter (sulci) and some white
# matter (ventricle walls); the white-matter peak (u' ~ 0.9) is nearly pure WM; brighter voxels
# grade into GM, and beyond the grey-matter level into lesion (lesions replace WM, so their rims
# are lesion/WM mixtures).
PV_KNOTS = tuple(round(0.1 * i, 1) for i in range(21))
PV_INTERIOR = {
    "csf": (1.00, 0.98, 0.91, 0.81, 0.71, 0.61, 0.51, 0.44, 0.19, 0.01, 0.03, 0.02, 0.01, 0.01, 0.02, 0.01,
            0.01, 0.00, 0.00, 0.00, 0.00),
    "gm": (0.00, 0.01, 0.07, 0.15, 0.22, 0.30, 0.37, 0.47, 0.35, 0.07, 0.40, 0.76, 0.91, 0.90, 0.24, 0.10,
           0.07, 0.03, 0.04, 0.00, 0.00),
    "wm": (0.00, 0.00, 0.01, 0.04, 0.07, 0.08, 0.12, 0.08, 0.46, 0.92, 0.57, 0.22, 0.08, 0.07, 0.24, 0.17,
           0.07, 0.04, 0.03, 0.00, 0.00),
    "lesion": (0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.01, 0.50,
               0.72, 0.86, 0.93, 0.93, 1.00, 1.00),
}
PV_EXTERIOR_LEVEL = 0.35  # background: darker than this x the brain median and reachable from outside
PV_CHANNEL_MM = 6.0  # ... through channels at least about this wide (narrower sulci stay brain)
PV_EDGE_VOXELS = 1.5  # voxels this close to the exterior mix with background: the edge layer
PV_HALO_VOXELS = 3  # edge voxels lie within this many voxels of the interior (blur halo)
PV_EDGE_WM_SHARE = 0.06  # white-matter share of the tissue in edge voxels (phantom fit)
PV_WM_LEVEL = 0.9  # white matter in units of the local reference (phantom fit)
PV_REFERENCE_DEPTH_MM = 20.0  # white-matter reference region: deeper than this, mid intensities
PV_REFERENCE_SIGMA_MM = 20.0  # smoothing of the local reference (absorbs smooth bias fields)
PV_GM_QUANTILE = 85.0  # percentile of interior tissue intensities that tracks the grey-matter level
PV_GM_LEVEL = 1.167  # its mean on the fitting population (reference units); u' moves it towards this
PV_GM_ADAPTATION = 0.6  # exponent of the contrast stretch (1 would put g exactly on PV_GM_LEVEL)
PV_LESION_MIN_DEPTH_MM = 16.0  # lesions (WMH) only this deep: bright cortex under a bias field is not lesion
PV_VENTRICLE_DEPTH = 0.5  # ventricle region: deeper than this fraction of the brain's largest depth
# Calibration: one scale factor each, the ratio of recorded to estimated means on phantom
# population seed 1 (mean of the 32³ and 64³ ratios), validated on seed 2 (docs/morphometry.md).
# Scales change no correlation, only the ml. CSF at the brain surface is invisible after
# preprocessing (dark CSF is clamped to the background value and the outer voxels mix with
# background), so total CSF is the CSF seen in the interior times PV_CSF_SCALE (2.5 at 32³ and
# 2.1 at 64³ on their own); the ventricle region also holds the third ventricle, cisterns and deep
# sulci; lesion rims are partly counted as white matter and lesions closer than
# PV_LESION_MIN_DEPTH_MM to the brain boundary are not counted.
PV_CSF_SCALE = 2.33
PV_VENTRICLE_SCALE = 0.632
PV_LESION_SCALE = 2.2


def _pv_curve(u: np.ndarray, table: Sequence[float]) -> np.ndarray:
    return np.interp(u, np.asarray(PV_KNOTS[: len(table)]), np.asarray(table, dtype=np.float64))


def _local_reference(v: np.ndarray, region: np.ndarray, sigma_vox: float, fallback: float) -> np.ndarray:
    """Normalised convolution: Gaussian-weighted mean of ``v`` over ``region`` around every voxel.

    Computed on a grid of about ``sigma/3`` voxels (block means, then linear upsampling), so the
    cost does not grow with the kernel at high resolutions.
    """
    factor = max(1, int(sigma_vox // 3))
    num, den = v * region, region.astype(np.float64)
    if factor > 1:
        pad = [(0, (-n) % factor) for n in v.shape]
        num, den = np.pad(num, pad), np.pad(den, pad)
        shape = tuple(n // factor for n in num.shape)

        def blocks(a: np.ndarray) -> np.ndarray:
            return a.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))

        num, den = blocks(num), blocks(den)
    num = ndi.gaussian_filter(num, sigma_vox / factor, mode="constant", truncate=3.0)
    den = ndi.gaussian_filter(den, sigma_vox / factor, mode="constant", truncate=3.0)
    ok = den > 1e-3 * max(float(den.max()), 1e-12)
    ref = np.where(ok, num / np.where(ok, den, 1.0), fallback)
    if factor > 1:
        ref = ndi.zoom(ref, factor, order=1, mode="nearest", grid_mode=True)[: v.shape[0], : v.shape[1], : v.shape[2]]
    return ref


def _exterior(dark: np.ndarray, radius: int) -> np.ndarray:
    """Dark voxels connected to the array border through channels about ``2 radius + 1`` voxels wide."""
    opened = ndi.binary_dilation(ndi.binary_erosion(dark, iterations=radius, border_value=1),
                                 iterations=radius, border_value=1)
    labels, _ = ndi.label(opened)
    faces = np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.isin(labels, faces[faces > 0])
    return ndi.binary_dilation(outside, iterations=radius + 1, mask=dark)  # back into its own channels


def pv_normalised_intensities(volume: np.ndarray, voxel_size_mm: float, brain_threshold: float = 0.02,
                              gm_level: float | None = None) -> dict | None:
    """Steps 1-3 of :func:`flair_partial_volumes`: brain regions and normalised intensities.

    1. *exterior* = voxels darker than :data:`PV_EXTERIOR_LEVEL` x the median brain intensity (of
       voxels above a tenth of the 99th percentile, so a faint background does not lower it) that
       are connected to the array border through channels of about :data:`PV_CHANNEL_MM` or more
       (a morphological opening), so the outside of the brain but not the ventricles or narrow
       sulci; *interior* = voxels more than :data:`PV_EDGE_VOXELS` from the exterior; *edge* = the
       other voxels above ``brain_threshold`` within :data:`PV_HALO_VOXELS` of the interior (the
       boundary layer and any blur halo, mixed with background);
    2. local white-matter reference: Gaussian-weighted (:data:`PV_REFERENCE_SIGMA_MM`) mean
       intensity of interior voxels deeper than :data:`PV_REFERENCE_DEPTH_MM` with intensities
       within 0.75-1.25 x the interior median (mostly white matter); u = v / reference removes
       smooth bias fields and any global scale;
    3. contrast adaptation: the :data:`PV_GM_QUANTILE` th percentile g of interior tissue
       intensities (0.7 < u < 1.5) tracks the grey-matter level; intensities above the
       white-matter level w = :data:`PV_WM_LEVEL` are stretched towards putting g on
       :data:`PV_GM_LEVEL`: u' = w + (u - w) ((G - w) / (g - w)) ** :data:`PV_GM_ADAPTATION` (the
       exponent below 1 because g also drops when there is less grey matter);

    Returns ``None`` for volumes without a usable brain, else a dict with the boolean masks
    ``interior`` and ``edge``, ``depth`` (voxels from the exterior), ``u_interior`` (the
    contrast-adapted u' of the interior voxels, in ``volume[interior]`` order), ``u_edge`` (u of
    the edge voxels), ``reference`` (median white-matter reference) and ``gm_level`` (g).
    ``gm_level`` overrides :data:`PV_GM_LEVEL` (used when fitting the curves).
    """
    v = np.asarray(volume, dtype=np.float64)
    vox = float(voxel_size_mm)
    rough = v > brain_threshold
    if np.count_nonzero(rough) < 27:
        return None
    # brain intensity level, robust to a faint non-zero background: median of the voxels above a
    # tenth of the brightest tissue
    level = float(np.median(v[v > 0.1 * float(np.percentile(v[rough], 99))]))
    exterior = _exterior(v <= PV_EXTERIOR_LEVEL * level, max(1, round(PV_CHANNEL_MM / vox)))
    depth = ndi.distance_transform_edt(~exterior)
    interior = depth > PV_EDGE_VOXELS
    if np.count_nonzero(interior) < 10 or np.ptp(v[interior]) == 0:
        return None
    # the edge: boundary layer plus any blur halo, but not stray background specks far outside
    edge = rough & ~interior & ndi.binary_dilation(interior, iterations=PV_HALO_VOXELS)
    median = float(np.median(v[interior]))
    mid = interior & (v > 0.75 * median) & (v < 1.25 * median)
    region = mid & (depth * vox > PV_REFERENCE_DEPTH_MM)
    if np.count_nonzero(region) < 20:  # small or very coarse brains: every mid-intensity interior voxel
        region = mid
    if not region.any():
        region = interior
    ref = _local_reference(v, region, PV_REFERENCE_SIGMA_MM / vox, float(np.median(v[region])))
    ui = v[interior] / np.maximum(ref[interior], 1e-6)
    ue = v[edge] / np.maximum(ref[edge], 1e-6)
    w, target = PV_WM_LEVEL, PV_GM_LEVEL if gm_level is None else gm_level
    tissue = ui[(ui > 0.7) & (ui < 1.5)]
    g = float(np.percentile(tissue, PV_GM_QUANTILE)) if tissue.size else target
    stretch = ((target - w) / max(g - w, 0.05)) ** PV_GM_ADAPTATION
    ui = np.where(ui > w, w + (ui - w) * stretch, ui)
    return {"interior": interior, "edge": edge, "depth": depth, "u_interior": ui, "u_edge": ue,
            "reference": float(np.median(ref[region])), "gm_level": g}


def flair_partial_volumes(
    volume: ArrayLike,
    voxel_size_mm: float,
    brain_threshold: float = 0.02,
    ventricle_min_depth_mm: float = 0.0,
    return_maps: bool = False,
) -> dict:
    """Tissue volumes (ml) of one preprocessed FLAIR-like volume by a partial-volume model.

    Made for the evaluation report (:mod:`verydeepvae.evaluate.morphometry`): volumes as the model
    sees them (skull-stripped, resampled, intensities in [0, 1], background 0), where at 32³-64³
    almost every brain voxel mixes tissues. Every threshold is relative to the volume's own
    intensities, so a global rescale does not change the result, and the brain boundary is found
    at a mid-intensity level, so mild blurring moves it little.

    Steps 1-3 (brain regions, a local white-matter reference, contrast adaptation) are
    :func:`pv_normalised_intensities`; steps 4-5 (tissue fractions and volumes) are
    :func:`_pv_volumes`; each docstring states its steps.

    Returns ``csf_ml``, ``gm_ml``, ``wm_ml``, ``lesion_ml``, ``brain_ml``, ``ventricle_ml`` and
    diagnostics: ``reference`` (median white-matter reference intensity), ``gm_level`` (g) and
    ``csf_interior_ml``; with ``return_maps`` also ``maps``, per-voxel fractions ``csf``, ``gm``,
    ``wm``, ``lesion`` (edge voxels: ``gm`` holds the tissue share not given to WM).
    """
    vb, single = as_volume_batch(volume, "volume", dtype=np.float64)
    if not single and vb.shape[0] != 1:
        raise ValueError("flair_partial_volumes takes one volume (D, H, W)")
    if not voxel_size_mm > 0:
        raise ValueError(f"voxel_size_mm must be positive, got {voxel_size_mm}")
    v = vb[0]
    vox = float(voxel_size_mm)
    ml = vox**3 / 1000.0
    out = {k: 0.0 for k in ("csf_ml", "gm_ml", "wm_ml", "lesion_ml", "brain_ml", "ventricle_ml")}
    out.update(reference=float("nan"), gm_level=float("nan"), csf_interior_ml=0.0)
    if return_maps:
        maps = out["maps"] = {k: np.zeros(v.shape) for k in ("csf", "gm", "wm", "lesion")}
    n = pv_normalised_intensities(v, vox, brain_threshold)
    if n is None:  # no brain with contrast to analyse: count what is there
        out["brain_ml"] = float(np.count_nonzero(v > brain_threshold) * ml)
        return out
    volumes, f, share = _pv_volumes(n, vox, ventricle_min_depth_mm)
    out.update(volumes)
    if return_maps:
        interior, edge = n["interior"], n["edge"]
        for k in maps:
            maps[k][interior] = f[k]
        maps["wm"][edge] = PV_EDGE_WM_SHARE * share
        maps["gm"][edge] = (1.0 - PV_EDGE_WM_SHARE) * share
    return out


def _pv_volumes(n: dict, vox: float, ventricle_min_depth_mm: float) -> tuple[dict, dict, np.ndarray]:
    """Steps 4-5 of :func:`flair_partial_volumes`, from :func:`pv_normalised_intensities`' ``n``:

    4. interior voxels: tissue fractions from the response curves :data:`PV_INTERIOR`; edge
       voxels: tissue share min(u / w, 1) (the rest is background), of which
       :data:`PV_EDGE_WM_SHARE` is white matter;
    5. volumes: brain = interior voxels + tissue share of the edge; CSF = interior CSF x
       :data:`PV_CSF_SCALE` (surface CSF is invisible, see the calibration notes); WM = its
       fractions; lesions = lesion fractions deeper than :data:`PV_LESION_MIN_DEPTH_MM` (white
       matter hyperintensities are deep or periventricular; closer to the boundary bright voxels
       are taken as grey matter) x :data:`PV_LESION_SCALE`; GM = brain - CSF - WM -
       lesions (so the four add up to the brain); ventricles = interior CSF deeper than
       :data:`PV_VENTRICLE_DEPTH` x the brain's largest depth (and than ``ventricle_min_depth_mm``),
       x :data:`PV_VENTRICLE_SCALE`.


    Returns (the volumes and diagnostics, the interior voxels' tissue fractions, the edge voxels'
    tissue share)."""
    interior, depth, ui = n["interior"], n["depth"], n["u_interior"]
    ml = vox**3 / 1000.0
    w = PV_WM_LEVEL
    f = {k: _pv_curve(ui, PV_INTERIOR[k]) for k in ("csf", "gm", "wm", "lesion")}
    share = np.clip(n["u_edge"] / w, 0.0, 1.0)
    brain = (ui.size + share.sum()) * ml
    csf_interior = float(f["csf"].sum() * ml)
    csf = PV_CSF_SCALE * csf_interior
    wm = float((f["wm"].sum() + PV_EDGE_WM_SHARE * share.sum()) * ml)
    shallow = depth[interior] * vox <= PV_LESION_MIN_DEPTH_MM  # bright voxels there are grey matter
    f["gm"][shallow] += f["lesion"][shallow]
    f["lesion"][shallow] = 0.0
    lesion = PV_LESION_SCALE * float(f["lesion"].sum() * ml)
    deep = depth[interior] > max(PV_VENTRICLE_DEPTH * float(depth[interior].max()), ventricle_min_depth_mm / vox)
    volumes = dict(
        csf_ml=csf,
        gm_ml=float(brain - csf - wm - lesion),
        wm_ml=wm,
        lesion_ml=lesion,
        brain_ml=float(brain),
        ventricle_ml=PV_VENTRICLE_SCALE * float(f["csf"][deep].sum() * ml),
        reference=n["reference"],
        gm_level=n["gm_level"],
        csf_interior_ml=csf_interior,
    )
    return volumes, f, share


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
