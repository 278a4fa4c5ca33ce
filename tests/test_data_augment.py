"""Training augmentation: each transform alone, ranges, and where the randomness comes from."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from verydeepvae.data.augment import Augmenter, AugmentSettings, sample_generator

R = 16
NAMES = Augmenter.ORDER


def _ball() -> torch.Tensor:
    axis = torch.linspace(-1, 1, R)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    r = (x**2 + y**2 + z**2).sqrt()
    return (((r < 0.7).float() * (0.6 + 0.4 * (x + 1) / 2)).clamp(0, 1))[None]


def _only(name: str) -> Augmenter:
    return Augmenter(AugmentSettings(**{n: (1.0 if n == name else 0.0) for n in NAMES}), R)


@pytest.mark.parametrize("name", NAMES)
def test_each_transform_alone_keeps_shape_range_and_dtype(name):
    x = _ball() * 0.9 + 0.1  # a grey rim, so the haircut shows
    out, applied = _only(name).apply(x, np.random.default_rng(0))
    assert applied == [name]
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    assert torch.equal(x, _ball() * 0.9 + 0.1)  # the input is never modified in place


def test_probability_zero_is_the_identity_and_one_fires_everything():
    x = _ball()
    none = Augmenter(AugmentSettings(0, 0, 0, 0, 0, 0), R)
    out, applied = none.apply(x, np.random.default_rng(1))
    assert applied == [] and torch.equal(out, x)
    every = Augmenter(AugmentSettings(1, 1, 1, 1, 1, 1), R)
    out, applied = every.apply(x, np.random.default_rng(1))
    assert applied == list(NAMES) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_default_probabilities_are_mild():
    aug = Augmenter(AugmentSettings(), R)
    rng = np.random.default_rng(0)
    fired = [len(aug.apply(_ball(), rng)[1]) for _ in range(200)]
    untouched = fired.count(0) / len(fired)
    assert 0.4 < untouched < 0.65  # 0.8 * 0.9**4 = 0.52 of volumes see no augmentation at all


def test_haircut_zeroes_edge_slices_on_one_axis():
    x = torch.ones(1, R, R, R)
    out = _only("haircut")(x, np.random.default_rng(3))
    zero_axes = [a for a in range(3) if float(out.narrow(a + 1, 0, 1).abs().sum()) == 0
                 and float(out.narrow(a + 1, R - 1, 1).abs().sum()) == 0]
    assert len(zero_axes) == 1
    assert float(out.sum()) in (R**3 - 2 * R * R, R**3 - 4 * R * R)


def test_same_generator_same_result_and_streams_differ_by_seed_index_and_call():
    aug = Augmenter(AugmentSettings(1, 0, 1, 1, 1, 1), R)
    x = _ball()
    a = aug(x, np.random.default_rng([5, 1]))
    b = pickle.loads(pickle.dumps(aug))(x, np.random.default_rng([5, 1]))  # picklable for workers
    assert torch.equal(a, b)
    torch.manual_seed(7)
    draws = [sample_generator(0).random() for _ in range(2)] + [sample_generator(1).random()]
    assert len(set(draws)) == 3  # the call counter and the index both matter
    torch.manual_seed(7)
    first = sample_generator(0).random()
    torch.manual_seed(8)  # another rank (the trainer seeds torch with seed + rank)
    other = sample_generator(0).random()
    assert first != other


def test_worker_processes_get_their_own_streams(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    class Draws(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor(sample_generator(i).random())

    torch.manual_seed(0)
    one = torch.cat(list(DataLoader(Draws(), batch_size=2, num_workers=2)))
    torch.manual_seed(0)
    two = torch.cat(list(DataLoader(Draws(), batch_size=2, num_workers=2)))
    torch.manual_seed(1)
    three = torch.cat(list(DataLoader(Draws(), batch_size=2, num_workers=2)))
    assert torch.equal(one, two) and not torch.equal(one, three)
    assert len(set(one.tolist())) == 4
