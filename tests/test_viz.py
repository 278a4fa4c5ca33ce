"""Figures read without the code: orientation letters, slice positions, a colour bar saying what the
grey levels mean; training reconstructions in all three planes; single-point curves visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verydeepvae import viz


@pytest.fixture
def figures(monkeypatch):
    """Every figure viz would save, kept open for inspection (the PNG is still written)."""
    kept = []
    save = viz.save_figure

    def keep(fig, path):
        kept.append(fig)
        fig.canvas.draw()  # lay out as when saving
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        labels = [ax.get_ylabel() for ax in fig.axes] + [ax.get_title() for ax in fig.axes]
        fig._seen = {"texts": texts, "labels": labels}
        save(fig, path)

    monkeypatch.setattr(viz, "save_figure", keep)
    return kept


def _volume(size: int = 16) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(0, 1, size)] * 3, indexing="ij")
    return (0.2 + 0.6 * x * y * z).astype(np.float32)


def _colour_bars(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def test_a_montage_names_its_planes_slices_orientation_and_intensities(tmp_path, figures):
    viz.save_montage([_volume(), _volume()], tmp_path / "m.png", titles=["a", "b"])
    assert (tmp_path / "m.png").stat().st_size > 0
    seen = figures[0]._seen
    for letter in "LRAPSI":
        assert letter in seen["texts"]
    assert {"sagittal x=8/16", "coronal y=8/16", "axial z=8/16"} <= set(seen["labels"])
    assert _colour_bars(figures[0]) == [viz.MODEL_INTENSITY]


def test_the_orientation_letters_match_the_array_axes():
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    volume[7, :, :] = 1.0  # the subject's right edge (RAS: axis 0 runs left -> right)
    volume[:, 7, :] += 2.0  # anterior
    volume[:, :, 7] += 4.0  # superior
    sagittal, coronal, axial = viz.mid_slices(volume)
    assert viz.ORIENTATION["coronal"][1] == "R" and np.all(coronal[:, -1] % 2 == 1)  # right edge shown right
    assert viz.ORIENTATION["coronal"][2] == "S" and np.all(coronal[0, :] >= 4)  # superior up
    assert viz.ORIENTATION["axial"][2] == "A" and np.all(axial[0, :] % 4 >= 2)  # anterior up
    assert viz.ORIENTATION["sagittal"][1] == "A" and np.all(sagittal[:, -1] % 4 >= 2)  # anterior right


def test_training_reconstructions_show_all_three_planes(tmp_path, figures):
    from verydeepvae.train.reporting import Reporter

    reporter = Reporter(tmp_path, enabled=False)
    reporter.figures = tmp_path
    x = torch.from_numpy(np.stack([_volume(), _volume()]))[:, None]
    reporter.reconstruction_figure(3, x, [("reconstruction", x), ("prior above 4³", x)])
    labels = " ".join(figures[0]._seen["labels"])
    for plane in ("sagittal", "coronal", "axial"):
        assert labels.count(plane) == 2, plane  # one line per plane and subject
    assert len([ax for ax in figures[0].axes if ax.images]) == 2 * 3 * 3


def test_curves_mark_every_point_so_a_single_one_is_visible(tmp_path, figures):
    viz.save_curves({"validation": ([5], [2.1]), "train": ([1, 2, 3], [3.0, 2.5, 2.2])}, tmp_path / "c.png")
    lines = figures[0].axes[0].get_lines()
    assert [line.get_marker() for line in lines] == ["o", "o"]


def test_interpolation_strip_and_side_by_side_are_labelled(tmp_path, figures):
    viz.save_strip([_volume()] * 3, tmp_path / "s.png", ["A", "t=0.5", "B"])
    viz.save_side_by_side([_volume()], [_volume()], tmp_path / "p.png", "real", "samples")
    for fig in figures:
        assert "S" in fig._seen["texts"] and _colour_bars(fig) == [viz.MODEL_INTENSITY]
        assert any("axial z=8/16" in label for label in fig._seen["labels"])
