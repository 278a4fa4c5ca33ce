"""Figures read without the code: orientation letters, slice positions, a colour bar saying what the
grey levels mean; training reconstructions in all three planes; single-point curves visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scipy import ndimage

from verydeepvae import slice_board, viz


@pytest.fixture
def figures(monkeypatch):
    """Every figure viz would save, kept open for inspection (the PNG is still written)."""
    kept = []
    save = viz.save_figure

    def keep(fig, path):
        kept.append(fig)
        fig.canvas.draw()  # lay out as when saving
        fig._seen = {"texts": [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]}
        save(fig, path)

    monkeypatch.setattr(viz, "save_figure", keep)
    return kept


def _volume(size: int = 16) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(0, 1, size)] * 3, indexing="ij")
    return (0.2 + 0.6 * x * y * z).astype(np.float32)


def _colour_bars(fig) -> list[str]:
    """The colour bars' labels (wrapped to the bar's height: read as one line)."""
    return [ax.get_ylabel().replace("\n", " ") for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def test_a_montage_names_its_planes_slices_orientation_and_intensities(tmp_path, figures):
    viz.save_montage([_volume(), _volume()], tmp_path / "m.png", titles=["a", "b"])
    assert (tmp_path / "m.png").stat().st_size > 0
    seen = figures[0]._seen
    for letter in "LRAPSI":
        assert letter in seen["texts"]
    assert {"sagittal x=8/16", "coronal y=8/16", "axial z=8/16"} <= set(seen["texts"])
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
    labels = " ".join(figures[0]._seen["texts"])
    for plane in ("sagittal", "coronal", "axial"):
        assert labels.count(plane) == 2, plane  # one line per plane and subject
    board = figures[0].axes[0].images[0].get_array()
    assert ndimage.label(~np.ma.getmaskarray(board))[1] == 2 * 3 * 3  # separate panels


def test_curves_mark_every_point_so_a_single_one_is_visible(tmp_path, figures):
    viz.save_curves({"validation": ([5], [2.1]), "train": ([1, 2, 3], [3.0, 2.5, 2.2])}, tmp_path / "c.png")
    lines = figures[0].axes[0].get_lines()
    assert [line.get_marker() for line in lines] == ["o", "o"]


def test_interpolation_strip_and_side_by_side_are_labelled(tmp_path, figures):
    viz.save_strip([_volume()] * 3, tmp_path / "s.png", ["A", "t=0.5", "B"])
    viz.save_side_by_side([_volume()], [_volume()], tmp_path / "p.png", "real", "samples")
    for fig in figures:
        assert "S" in fig._seen["texts"] and _colour_bars(fig) == [viz.MODEL_INTENSITY]
        assert any("axial z=8/16" in label for label in fig._seen["texts"])


def test_a_board_puts_every_panel_in_its_cell_and_leaves_the_rest_blank():
    tall, wide = np.full((6, 2), 1.0), np.full((2, 4), 2.0)
    mosaic = slice_board.compose([[tall, None], [wide, tall]], gap=1, wide_gap_after=[0])
    assert mosaic.width == [4, 2] and mosaic.height == [6, 6]
    assert mosaic.left == [1, 1 + 4 + 3] and mosaic.top == [1, 1 + 6 + 1]
    image = mosaic.image
    assert np.isnan(image).sum() == image.size - (12 + 8 + 12)  # nothing but the panels drawn
    assert np.all(image[1:7, 2:4] == 1.0)  # the tall panel centred in its 4-voxel-wide cell
    assert np.all(image[10:12, 1:5] == 2.0)  # the wide one centred in its 6-voxel-tall cell
    assert np.all(np.isnan(image[1:7, 8:10]))  # the empty cell
    assert np.all(image[8:14, 8:10] == 1.0)
    with pytest.raises(ValueError):
        slice_board.compose([])
