"""The built-in phantom population: skull-stripped, FLAIR-like brain volumes with known factors.

Each subject is the MNI ICBM152 2009 tissue atlas (:mod:`verydeepvae.data.atlas`: grey matter,
white matter, CSF, lateral ventricles) put through random anatomy, pathology and scanner effects.
The field of view is a 192 mm cube centred on the origin, so a volume of resolution R has
isotropic voxels of 192/R mm (32 -> 6 mm, 64 -> 3 mm, 128 -> 1.5 mm) and the brain fills it.

Per-subject factors, every one written to ``participants.tsv``. Atrophy, lesion load and the
remaining (size, shape, contrast, scanner) factors are drawn independently of each other, so
their effects can be told apart; ventricle enlargement and cortical thinning follow atrophy, and
lesion count and size follow lesion load:

=============================  ==============================================================
factor                         distribution
=============================  ==============================================================
brain_scale                    N(0.92, 0.04) clipped to [0.82, 1.0] (1 = template size; the
                               MNI152 template is larger than most brains)
scale_x/y/z                    brain_scale * exp(N(0, 0.02)) per axis (head shape)
deformation_mm                 U(1, 3): s.d. of a smooth random displacement field (6^3
                               Gaussian control points over the FOV, spacing ~38 mm)
atrophy                        Beta(2, 3), 0 = none, 1 = severe
ventricle_enlargement_mm       6 * clip(atrophy + N(0, 0.1), 0, 1): tissue is pulled towards
                               the lateral ventricles by up to this many mm (they widen)
cortical_thinning_mm           1.5 * clip(atrophy + N(0, 0.1), 0, 1): grey matter closer than
                               this to sulcal CSF or the brain surface becomes CSF (1 mm ramp),
                               so sulci widen and the cortex thins
lesion_load                    Beta(1, 3)
lesion_count                   Poisson(40 * lesion_load) white-matter hyperintensities, each
                               periventricular with p = 0.6 (white matter 2-8 mm from the
                               ventricles; ellipsoid radius LogNormal(ln(2.5 + 3 *
                               lesion_load) mm, 0.35) clipped to [1.5, 10] mm, so heavy loads
                               are confluent, one axis elongated by U(1.2, 2.5)) or deep
                               (white matter > 12 mm from ventricles, > 4 mm from grey matter;
                               radius LogNormal(ln 2 mm, 0.35) clipped to [1, 5] mm), random
                               orientation; lesions only replace white matter
wm_intensity                   0.42 * exp(N(0, 0.05))
gm_intensity                   wm * 1.35 * exp(N(0, 0.04)), ratio clipped to [1.2, 1.55]
csf_intensity                  wm * 0.20 * exp(N(0, 0.2)), ratio clipped to [0.08, 0.4]
lesion_intensity               gm * 1.40 * exp(N(0, 0.06)), ratio clipped to [1.2, 1.7]
bias_field_strength            U(0, 0.15): s.d. of the log of a smooth multiplicative field
                               (4^3 Gaussian control points)
noise_level                    U(0.01, 0.05): Rician noise sigma as a fraction of wm_intensity
rotation_x/y/z_deg             N(0, 2) clipped to [-6, 6] (residual misregistration)
translation_x/y/z_mm           N(0, 2) clipped to [-6, 6]
age                            years, uniform on [45, 90]; drawn *given* atrophy and lesion load
                               (a Gaussian copula, correlations 0.90 and 0.25), so atrophy and
                               lesion load rise with age
sex                            F or M; M with probability sigmoid(2 (brain_scale - 0.92) / 0.04),
                               so male brains are larger
=============================  ==============================================================

Age and sex (:mod:`verydeepvae.data.phantom_demographics`) were added after the other factors. They
are drawn given the factors that carry their effects, from a side stream that leaves the subject's
own random stream untouched, so every other factor keeps its distribution and every seed still gives
bitwise the same volume as before they existed; only participants.tsv gained two columns. Any column of
participants.tsv except the identity columns (:data:`CONDITIONABLE`) can condition a model trained on
the phantom (``verydeepvae train --condition-on age,lesion_load`` without ``--data``).

So the FLAIR ordering CSF < WM < GM < lesion always holds for the tissue means.

Rendering: each output voxel is mapped to the atlas through misregistration, the nonlinear
field, brain size and the ventricle pull (one composed map, trilinear interpolation). The
template's population-averaged tissue fractions are sharpened (``f**2``, renormalised) so
boundaries are about as crisp as in one brain, then cortical thinning and lesions are applied.
The image is the partial-volume mixture of tissue intensities, times the bias field, with Rician noise
(``|I + sigma (n1 + i n2)|``), then zeroed outside the brain mask (skull-stripped), clipped to
[0, 1] and stored as float32: values are in [0, 1], background exactly 0, white matter ~0.4.
The brain mask (labels > 0) is where the tissue fractions sum to at least 0.5. The largest
brains (about 5 %) touch the edge of the field of view by a voxel.

Also recorded (measured on the rendered subject, in ml): brain_volume_ml (everything inside the
mask), gm/wm/csf/ventricle/lesion_volume_ml (partial-volume sums; csf includes the ventricles,
wm excludes lesions) and the number of periventricular and deep lesions.

The same seed gives bitwise the same volume, and the same anatomy at every resolution (random
fields live on fixed control grids and lesions in mm; only the noise is drawn per voxel).
``generate_volume(seed, R, return_labels=True)`` also returns the tissue label map
(:data:`LABELS`), e.g. to re-create the labels of subject ``seed`` from ``participants.tsv``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, TypedDict

import numpy as np

from ..atomic import write_text
from ..console import bar
from ..errors import ConfigError, DataError
from ..volume_io import grid_affine, save_nifti
from . import phantom_render as pr
from .phantom_demographics import age_noise, atrophy_for_age, draw_demographics

LABELS = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter", 4: "lesion", 5: "ventricle"}
FOV_MM = pr.FOV_MM


# participants.tsv columns that identify a subject or the population; every other column is a
# generating factor or a measured volume, and can condition a model (CONDITIONABLE)
IDENTITY_COLUMNS = ("participant_id", "seed", "population_seed", "resolution", "voxel_size_mm")
CONDITIONABLE = (
    "age", "sex", "brain_scale", "scale_x", "scale_y", "scale_z", "deformation_mm", "atrophy",
    "ventricle_enlargement_mm", "cortical_thinning_mm", "lesion_load", "lesion_count", "csf_intensity",
    "wm_intensity", "gm_intensity", "lesion_intensity", "bias_field_strength", "noise_level",
    "rotation_x_deg", "rotation_y_deg", "rotation_z_deg", "translation_x_mm", "translation_y_mm",
    "translation_z_mm", "lesion_count_periventricular", "lesion_count_deep", "gm_volume_ml", "wm_volume_ml",
    "csf_volume_ml", "ventricle_volume_ml", "lesion_volume_ml", "brain_volume_ml",
)


def voxel_size_mm(resolution: int) -> float:
    return FOV_MM / resolution


def subject_seed(population_seed: int, index: int) -> int:
    """Seed of subject ``index`` in a population: independent of the population size."""
    return int(np.random.SeedSequence([int(population_seed), int(index)]).generate_state(1)[0])


SubjectFactors = TypedDict("SubjectFactors", {
    # drawn (sample_factors, then draw_demographics): size, pose, anatomy, lesions, intensities
    "brain_scale": float, "scale_x": float, "scale_y": float, "scale_z": float, "deformation_mm": float,
    "atrophy": float, "ventricle_enlargement_mm": float, "cortical_thinning_mm": float, "lesion_load": float,
    "lesion_count": int, "csf_intensity": float, "wm_intensity": float, "gm_intensity": float,
    "lesion_intensity": float, "bias_field_strength": float, "noise_level": float,
    "rotation_x_deg": float, "rotation_y_deg": float, "rotation_z_deg": float,
    "translation_x_mm": float, "translation_y_mm": float, "translation_z_mm": float, "age": float, "sex": str,
    # recorded once the subject is drawn (_record_volumes): lesion counts and tissue volumes in ml
    "lesion_count_periventricular": int, "lesion_count_deep": int, "gm_volume_ml": float, "wm_volume_ml": float,
    "csf_volume_ml": float, "ventricle_volume_ml": float, "lesion_volume_ml": float, "brain_volume_ml": float,
}, total=False)
SubjectFactors.__doc__ = """One phantom subject's generating factors and recorded truth: its row of participants.tsv."""


def _clip_normal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float, size=None):
    return np.clip(rng.normal(mean, sd, size), lo, hi)


def sample_factors(rng: np.random.Generator, age: float | None = None) -> SubjectFactors:
    """Draw the scalar generating factors of one subject (see the module docstring).

    ``age`` (years): the same subject's factors had it been that old (every draw kept, so every
    other factor is unchanged): the atrophy that its own age noise and lesion load give at that age
    (:func:`~verydeepvae.data.phantom_demographics.atrophy_for_age`), and with it the ventricle
    enlargement and cortical thinning, each with its own noise as drawn.
    """
    f: SubjectFactors = {}
    f["brain_scale"] = float(_clip_normal(rng, 0.92, 0.04, 0.82, 1.0))
    for axis, v in zip("xyz", np.exp(rng.normal(0.0, 0.02, 3))):
        f[f"scale_{axis}"] = f["brain_scale"] * float(v)
    f["deformation_mm"] = float(rng.uniform(1.0, 3.0))
    f["atrophy"] = float(rng.beta(2.0, 3.0))
    widen, thin = float(rng.normal(0, 0.1)), float(rng.normal(0, 0.1))
    f["ventricle_enlargement_mm"] = f["cortical_thinning_mm"] = 0.0  # set below: keeps the column order
    f["lesion_load"] = float(rng.beta(1.0, 3.0))
    f["lesion_count"] = int(rng.poisson(40.0 * f["lesion_load"]))
    wm = 0.42 * float(np.exp(rng.normal(0, 0.05)))
    gm = wm * float(np.clip(1.35 * np.exp(rng.normal(0, 0.04)), 1.2, 1.55))
    csf = wm * float(np.clip(0.20 * np.exp(rng.normal(0, 0.2)), 0.08, 0.4))
    lesion = gm * float(np.clip(1.40 * np.exp(rng.normal(0, 0.06)), 1.2, 1.7))
    f.update(csf_intensity=csf, wm_intensity=wm, gm_intensity=gm, lesion_intensity=lesion)
    f["bias_field_strength"] = float(rng.uniform(0.0, 0.15))
    f["noise_level"] = float(rng.uniform(0.01, 0.05))
    for axis, v in zip("xyz", _clip_normal(rng, 0.0, 2.0, -6.0, 6.0, 3)):
        f[f"rotation_{axis}_deg"] = float(v)
    for axis, v in zip("xyz", _clip_normal(rng, 0.0, 2.0, -6.0, 6.0, 3)):
        f[f"translation_{axis}_mm"] = float(v)
    if age is not None:
        f["atrophy"] = atrophy_for_age(float(age), f["lesion_load"], age_noise(rng))
    f["ventricle_enlargement_mm"] = 6.0 * float(np.clip(f["atrophy"] + widen, 0, 1))
    f["cortical_thinning_mm"] = 1.5 * float(np.clip(f["atrophy"] + thin, 0, 1))
    return f


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _draw_lesions(rng: np.random.Generator, anat: pr.Anatomy, count: int, load: float):
    sites, radii, rotations, periventricular = [], [], [], []
    for _ in range(count):
        pv = bool(rng.random() < 0.6)
        pool = anat.periventricular_sites if pv else anat.deep_sites
        sites.append(pool[rng.integers(len(pool))] + rng.uniform(-0.5, 0.5, 3))
        if pv:
            r0 = float(np.clip(rng.lognormal(np.log(2.5 + 3.0 * load), 0.35), 1.5, 10.0))
            shape = np.array([r0, r0, r0 * rng.uniform(1.2, 2.5)])
        else:
            r0 = float(np.clip(rng.lognormal(np.log(2.0), 0.35), 1.0, 5.0))
            shape = np.full(3, r0)
        radii.append(shape)
        rotations.append(_random_rotation(rng))
        periventricular.append(pv)
    return (
        np.reshape(sites, (-1, 3)),
        np.reshape(radii, (-1, 3)),
        np.reshape(rotations, (-1, 3, 3)),
        np.asarray(periventricular, bool),
    )


def generate_volume(
    rng_or_seed: int | np.random.Generator, resolution: int, *, return_labels: bool = False,
    age: float | None = None,
):
    """One phantom subject in memory.

    Returns ``(volume, factors)``, or ``(volume, factors, labels)`` with ``return_labels``:
    volume float32 (R, R, R) in [0, 1], RAS order (use ``grid_affine((R,)*3, voxel_size_mm(R))``);
    labels uint8 with the codes in :data:`LABELS` (largest partial-volume fraction per voxel).
    ``age`` (years, 45-90) renders the same subject as if it were that old, everything else as drawn
    (:func:`sample_factors`): the ground truth that counterfactual ageing of this subject should reach.
    """
    resolution = _check_resolution(resolution)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    anat = pr.anatomy()
    f = sample_factors(rng, age)
    # from a side stream (rng itself does not move): every draw below, hence the image, is unchanged
    f.update(draw_demographics(rng, f["atrophy"], f["lesion_load"], f["brain_scale"]))
    deformation = rng.standard_normal((3,) + (pr.DEFORMATION_GRID,) * 3) * f["deformation_mm"]
    bias = rng.standard_normal((pr.BIAS_GRID,) * 3) * f["bias_field_strength"]
    sites, radii, rotations, periventricular = _draw_lesions(rng, anat, f["lesion_count"], f["lesion_load"])

    pose = pr.make_pose(
        anat,
        [f["scale_x"], f["scale_y"], f["scale_z"]],
        [f["rotation_x_deg"], f["rotation_y_deg"], f["rotation_z_deg"]],
        [f["translation_x_mm"], f["translation_y_mm"], f["translation_z_mm"]],
        deformation,
        f["ventricle_enlargement_mm"],
    )
    index, channels = pr.sample_tissues(anat, pose, resolution)
    gm, wm, csf, ventricle, pial_distance = pr.sharpen(channels)
    thinned = gm * np.clip(f["cortical_thinning_mm"] - pial_distance, 0.0, 1.0)
    gm -= thinned
    csf += thinned
    if len(sites):
        centres = pr.output_mm_of(anat, pose, sites)
        lesion = pr.render_lesions(resolution, centres, radii, rotations).ravel()[index] * wm
        wm -= lesion
    else:
        lesion = np.zeros_like(wm)
    inside = (gm + wm + csf + lesion) >= 0.5
    index = index[inside]
    gm, wm, csf, ventricle, lesion = (a[inside] for a in (gm, wm, csf, ventricle, lesion))

    image = _image(rng, f, bias, index, resolution, csf=csf, gm=gm, wm=wm, lesion=lesion)

    _record_volumes(f, periventricular, index.size, resolution,
                    {"gm": gm, "wm": wm, "csf": csf, "ventricle": ventricle, "lesion": lesion})
    if not return_labels:
        return image, f
    fractions = np.stack([csf - ventricle, gm, wm, lesion, ventricle])
    labels = np.zeros(resolution**3, dtype=np.uint8)
    labels[index] = np.argmax(fractions, axis=0) + 1
    return image, f, labels.reshape((resolution,) * 3)


def _image(rng: np.random.Generator, f: SubjectFactors, bias: np.ndarray, index: np.ndarray, resolution: int,
           csf: np.ndarray, gm: np.ndarray, wm: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """The FLAIR-like image (R, R, R) in [0, 1] from the brain voxels' (``index``) tissue fractions:
    each tissue's intensity, the bias field, then Rician noise (the last draws from ``rng``)."""
    values = (
        f["csf_intensity"] * csf + f["gm_intensity"] * gm + f["wm_intensity"] * wm + f["lesion_intensity"] * lesion
    )
    values *= np.exp(pr.smooth_field(bias[None], resolution)[0]).ravel()[index]
    sigma = np.float32(f["noise_level"] * f["wm_intensity"])
    noise = rng.standard_normal((2, values.size), dtype=np.float32) * sigma
    values = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)
    image = np.zeros(resolution**3, dtype=np.float32)
    image[index] = np.clip(values, 0.0, 1.0)
    return image.reshape((resolution,) * 3)


def _record_volumes(f: SubjectFactors, periventricular: np.ndarray, brain_voxels: int, resolution: int,
                    fractions: dict[str, np.ndarray]) -> None:
    """The truth recorded with a subject (participants.tsv): lesion counts, and each tissue's
    volume in ml (its partial-volume fractions summed over the brain's voxels)."""
    ml = voxel_size_mm(resolution) ** 3 / 1000.0
    f["lesion_count_periventricular"] = int(periventricular.sum())
    f["lesion_count_deep"] = int((~periventricular).sum())
    for name, fraction in fractions.items():
        f[f"{name}_volume_ml"] = float(fraction.sum(dtype=np.float64) * ml)
    f["brain_volume_ml"] = float(brain_voxels * ml)


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or int(resolution) != resolution or not 8 <= int(resolution) <= 512:
        raise ConfigError(f"phantom resolution must be an integer between 8 and 512, got {resolution!r}")
    return int(resolution)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def generate_population(
    num: int,
    resolution: int,
    output_dir: str | os.PathLike,
    seed: int = 0,
    *,
    montage: bool = True,
    progress: bool | None = None,
) -> list[Path]:
    """Write ``num`` subjects ``sub-0001.nii.gz``... plus ``participants.tsv`` to ``output_dir``.

    Subject i uses ``subject_seed(seed, i)`` (recorded in the ``seed`` column), so the first k
    subjects do not depend on ``num``. With ``montage`` also writes ``phantom_montage.png`` (the
    first four subjects). ``progress=False`` hides the progress bar (console.show_bar decides otherwise).
    """
    if isinstance(num, bool) or int(num) != num or int(num) < 1:
        raise ConfigError(f"phantom: number of subjects must be a positive integer, got {num!r}")
    resolution = _check_resolution(resolution)
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the phantom output folder {out}: {exc}") from exc
    vox = voxel_size_mm(resolution)
    affine = grid_affine((resolution,) * 3, vox)
    paths, rows = [], []
    for index in bar(range(int(num)), desc=f"phantom {resolution}^3", unit="vol", show=progress):
        s = subject_seed(seed, index)
        pid = f"sub-{index + 1:04d}"
        volume, factors = generate_volume(s, resolution)
        path = out / f"{pid}.nii.gz"
        save_nifti(volume, path, affine, description=f"verydeepvae phantom seed={s}")
        paths.append(path)
        demographics = {"age": factors.pop("age"), "sex": factors.pop("sex")}
        rows.append({"participant_id": pid, "seed": s, "population_seed": int(seed),
                     "resolution": resolution, "voxel_size_mm": vox, **demographics, **factors})
    _write_participants(out / "participants.tsv", rows)
    if montage:
        write_phantom_montage(paths[:4], out / "phantom_montage.png")
    return paths


def _write_participants(path: Path, rows: list[dict[str, object]]) -> None:
    header = list(rows[0])
    lines = ["\t".join(header)] + ["\t".join(_format(row[key]) for key in header) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def complete_participants(folder: str | os.PathLike) -> bool:
    """Give the participants.tsv of a population written before age and sex existed those columns,
    drawn from each subject's recorded seed exactly as :func:`generate_volume` draws them (the
    volumes are the same, so they are not touched).  Returns whether the file was rewritten."""
    path = Path(folder) / "participants.tsv"
    rows = read_participants(path)
    if not rows or all(c in rows[0] for c in ("age", "sex")):
        return False
    new_rows = []
    for row in rows:
        rng = np.random.default_rng(int(row["seed"]))
        f = sample_factors(rng)
        demographics = draw_demographics(rng, f["atrophy"], f["lesion_load"], f["brain_scale"])
        identity = {k: row[k] for k in IDENTITY_COLUMNS}
        rest = {k: v for k, v in row.items() if k not in IDENTITY_COLUMNS}
        new_rows.append({**identity, **demographics, **rest})
    _write_participants(path, new_rows)
    return True


def read_participants(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``participants.tsv`` as dicts of strings."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def write_phantom_montage(
    paths_or_volumes: Sequence[str | os.PathLike | np.ndarray],
    png_path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    max_subjects: int = 4,
) -> None:
    """Sagittal/coronal/axial mid-slices of a few subjects (files or arrays) in one PNG."""
    import nibabel as nib

    from ..viz import save_montage

    items = list(paths_or_volumes)[:max_subjects]
    volumes, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            volumes.append(item)
            names.append(f"subject {i + 1}")
        else:
            try:
                volumes.append(np.asarray(nib.load(str(item)).get_fdata(dtype=np.float32)))
            except Exception as exc:
                raise DataError(f"cannot read phantom volume {item}: {exc}") from exc
            names.append(Path(item).name.split(".")[0])
    save_montage(volumes, png_path, titles=list(titles)[:max_subjects] if titles else names,
                 vmin=0.0, vmax=1.0, suptitle="Phantom FLAIR-like brains", colorbar="phantom intensity (as written)")
