"""Going back from the model grid to an input scan's own space (data/native_space.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from verydeepvae.data.native_space import checked_geometry, native_geometry, scan_geometry, to_scan_space
from verydeepvae.data.nifti_load import PreprocessSettings, preprocess_file
from verydeepvae.errors import UserError

SHAPE = (40, 48, 30)


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


AFFINES = {
    "RAS, isotropic": np.diag([1.5, 1.5, 1.5, 1.0]),
    "axes permuted and flipped, anisotropic": np.array([[0, -1.2, 0, 30], [-1.0, 0, 0, 20], [0, 0, 2.0, -10],
                                                        [0, 0, 0, 1.0]]),
    "oblique": np.vstack([np.hstack([_rotation(0.3) @ np.diag([1.1, 0.9, 2.2]), [[5], [-3], [7]]]), [0, 0, 0, 1]]),
}


def _scan(tmp_path, affine: np.ndarray, name: str = "scan.nii.gz", sform_code: int = 1):
    """An off-centre ellipsoid with an intensity gradient, so a flip or shift would show."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    inside = (x / 0.6) ** 2 + ((y - 0.1) / 0.7) ** 2 + (z / 0.8) ** 2 < 1
    volume = (inside * (300 + 200 * x + 100 * z)).astype(np.float32)
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=1)
    path = tmp_path / name
    nib.save(image, str(path))
    return path, volume


@pytest.mark.parametrize("kind", list(AFFINES))
def test_preprocessing_then_back_lands_on_the_scan(tmp_path, kind):
    path, volume = _scan(tmp_path, AFFINES[kind])
    geometry = scan_geometry(path)
    assert np.allclose(geometry["canonical_affine"], nib.as_closest_canonical(nib.load(str(path))).affine)
    for resolution, least in ((16, 0.93), (32, 0.97)):
        grid, meta = preprocess_file(path, PreprocessSettings(resolution=resolution))
        back = to_scan_space(grid, native_geometry(meta, path, resolution))
        assert back.shape == SHAPE and back.dtype == np.float32
        expected = np.clip((volume - meta["clamp_low"]) / (meta["clamp_high"] - meta["clamp_low"]), 0, 1)
        r = np.corrcoef(back.ravel(), expected.ravel())[0, 1]
        assert r > least, (kind, resolution, r)
        flipped = np.corrcoef(back[::-1].ravel(), expected.ravel())[0, 1]
        assert flipped < r - 0.05  # the test can tell a wrong geometry


def test_the_scans_own_space_code_is_kept(tmp_path):
    path, _ = _scan(tmp_path, AFFINES["oblique"], sform_code=4)  # MNI152 space
    assert scan_geometry(path)["xform_code"] == 4


@pytest.mark.parametrize("broken", [
    {"shape": [10, 10], "affine": np.eye(4).tolist(), "grid_to_world": np.eye(4).tolist()},
    {"shape": [10, 10, 0], "affine": np.eye(4).tolist(), "grid_to_world": np.eye(4).tolist()},
    {"shape": [4096, 4096, 4096], "affine": np.eye(4).tolist(), "grid_to_world": np.eye(4).tolist()},
    {"shape": [10, 10, 10], "affine": np.zeros((4, 4)).tolist(), "grid_to_world": np.eye(4).tolist()},
    {"shape": [10, 10, 10], "affine": np.eye(4).tolist(), "grid_to_world": [[float("nan")] * 4] * 4},
    {"shape": "x"}, None, [],
])
def test_a_recorded_geometry_is_checked_before_use(broken):
    with pytest.raises(UserError, match="latents.safetensors, volume 1: the recorded scan geometry is not valid"):
        checked_geometry(broken, "latents.safetensors, volume 1")
