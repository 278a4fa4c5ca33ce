"""The phantom's ground-truth counterfactuals (evaluate/phantom_truth.py): the subject itself at its
own age, older subjects with larger ventricles, and no truth for scans that are not phantoms."""

from __future__ import annotations

import numpy as np

from verydeepvae.data.nifti_load import PreprocessSettings, preprocess_file
from verydeepvae.data.phantom import generate_population
from verydeepvae.evaluate.phantom_truth import monotonic_fraction, phantom_rows, true_counterfactuals


def test_true_counterfactuals_are_the_subjects_themselves_at_their_own_age(tmp_path):
    files = generate_population(2, 16, tmp_path / "pop", seed=5, montage=False, progress=False)
    rows = phantom_rows(files)
    assert [r["participant_id"] for r in rows] == ["sub-0001", "sub-0002"]
    settings = PreprocessSettings(resolution=16)
    own = [float(r["age"]) for r in rows]
    truth = true_counterfactuals(rows[:1], "age", [own[0], 50.0, 85.0], settings)
    assert truth.shape == (1, 3, 16, 16, 16) and truth.dtype == np.float32
    assert np.allclose(truth[0, 0], preprocess_file(files[0], settings)[0], atol=1e-4)
    # older: more of the subject is dark CSF on the model grid (ventricles and sulci widen)
    assert np.mean(truth[0, 2] < 0.25) > np.mean(truth[0, 1] < 0.25)


def test_no_truth_without_a_phantom_row_or_outside_the_phantoms_range(tmp_path):
    files = generate_population(1, 16, tmp_path / "pop", seed=5, montage=False, progress=False)
    settings = PreprocessSettings(resolution=16)
    rows = phantom_rows(files)
    assert true_counterfactuals(rows, "age", [50.0, 95.0], settings) is None
    assert true_counterfactuals(rows, "lesion_load", [0.1], settings) is None
    assert true_counterfactuals([{"participant_id": "x", "age": "70"}], "age", [50.0], settings) is None
    other = tmp_path / "scans"
    other.mkdir()
    (other / "a.nii.gz").write_bytes(files[0].read_bytes())
    assert phantom_rows([other / "a.nii.gz"]) is None


def test_monotonic_fraction_counts_rows_rising_at_every_step():
    assert monotonic_fraction(np.array([[1, 2, 3], [1, 1, 2], [3, 2, 4], [0, 1, 5]])) == 0.5
