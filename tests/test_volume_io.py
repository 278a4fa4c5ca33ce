"""NIfTI outputs open in a viewer with a sensible window (cal_min/cal_max, volume_io.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from verydeepvae.volume_io import display_window, grid_affine, save_nifti


def test_nifti_outputs_carry_a_display_window(tmp_path):
    rng = np.random.default_rng(0)
    model_range = rng.uniform(0, 0.8, (8, 8, 8)).astype(np.float32)
    save_nifti(model_range, tmp_path / "m.nii.gz", grid_affine((8, 8, 8), 2.0))
    header = nib.load(str(tmp_path / "m.nii.gz")).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 1.0)  # the same window for every volume

    data = np.zeros((20, 20, 20), dtype=np.float32)  # mostly background, a brain of ~300, one hot voxel
    data[5:15, 5:15, 5:15] = rng.normal(300, 20, (10, 10, 10))
    data[0, 0, 0] = 1e6
    save_nifti(data, tmp_path / "d.nii.gz", np.eye(4))
    header = nib.load(str(tmp_path / "d.nii.gz")).header
    assert float(header["cal_min"]) == 0.0 and 300 < float(header["cal_max"]) < 500

    assert display_window(np.full((2, 2, 2), np.nan)) == (0.0, 0.0)
    assert display_window(np.array([-5.0, 0.0, 10.0]))[0] == -5.0
