"""Age and sex of the phantom subjects (:mod:`verydeepvae.data.phantom`), and why they are drawn
the way they are.

The population existed before it had an age or a sex, and quality figures have been measured on it.
To keep every existing factor's distribution *and* every seed's image exactly as they were, age and
sex are drawn **given** the factors that carry their effects, from two numbers of a *side stream*:
a copy of the subject's generator jumped 2^127 draws ahead (``bit_generator.jumped()``), taken right
after the scalar factors are drawn.  The subject's own stream is not touched, so the same seed
still gives bitwise the same volume and the same factors (checked against the previous version when
this was added), participants.tsv only gains the ``age`` and ``sex`` columns, and a subject has the
same age and sex at every resolution.  The joint distribution is what matters for conditioning, and
it is the one a forward description gives: atrophy and lesion load rise with age, brains are larger
in men, each with noise.

* ``age`` (years): ``45 + 45 * Phi(0.90 u_a + 0.25 u_l + 0.36 e)`` with ``u_a = Phi^-1(F_Beta(2,3)(atrophy))``,
  ``u_l = Phi^-1(F_Beta(1,3)(lesion_load))`` (the factors' own quantiles, as standard normals) and
  ``e ~ N(0, 1)`` (0.36 = sqrt(1 - 0.90^2 - 0.25^2), so the argument is N(0, 1)): age is uniform on
  [45, 90]; given age, atrophy and lesion load are higher the older the subject (a Gaussian copula
  with correlations 0.90 and 0.25).
* ``sex``: ``M`` with probability ``sigmoid(2 (brain_scale - 0.92) / 0.04)``, else ``F``: about half
  each, and male brains are larger (brain_scale 0.04 higher on average, brain volume about one
  population sd).  Preprocessing fits every brain into the model's cube, so on the model grid sex
  shows mainly through composition, hardly through size.

Measured over 400 subjects at 32³ (population seed 0; ``docs/conditional.md``): Spearman correlation
of age with atrophy 0.90, with lesion load 0.21, with the recorded ventricle volume 0.72 (0.30 ml per
year), with the CSF fraction of the brain 0.82, with lesion volume 0.16; P(M) 0.56, male brains
220 ml larger (the population sd of brain volume is 189 ml).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

AGE_RANGE = (45.0, 90.0)
AGE_ATROPHY = 0.90  # copula correlation of age with atrophy
AGE_LESION = 0.25  # ... and with lesion load
SEX_SLOPE = 2.0  # log-odds of M per population sd of brain_scale
BRAIN_SCALE_MEAN, BRAIN_SCALE_SD = 0.92, 0.04  # brain_scale's distribution (phantom.sample_factors)


def side_stream(rng: np.random.Generator) -> np.random.Generator:
    """A generator 2^127 draws ahead of ``rng``'s current state; ``rng`` itself does not move."""
    return np.random.Generator(rng.bit_generator.jumped())


def draw_demographics(rng: np.random.Generator, atrophy: float, lesion_load: float,
                      brain_scale: float) -> dict[str, float | str]:
    """``{"age": years, "sex": "F" or "M"}`` from the side stream of ``rng`` (which does not move)."""
    side = side_stream(rng)
    noise = float(side.standard_normal())
    uniform = float(side.random())
    return {"age": age_from(atrophy, lesion_load, noise), "sex": sex_from(brain_scale, uniform)}


def age_noise(rng: np.random.Generator) -> float:
    """The subject's own ``e`` of :func:`age_from`: the number :func:`draw_demographics` will draw from ``rng``."""
    return float(side_stream(rng).standard_normal())


def age_from(atrophy: float, lesion_load: float, noise: float) -> float:
    u_a = _normal_quantile(stats.beta.cdf(atrophy, 2.0, 3.0))
    u_l = _normal_quantile(stats.beta.cdf(lesion_load, 1.0, 3.0))
    rest = math.sqrt(1.0 - AGE_ATROPHY ** 2 - AGE_LESION ** 2)
    latent = AGE_ATROPHY * u_a + AGE_LESION * u_l + rest * noise
    low, high = AGE_RANGE
    return float(low + (high - low) * stats.norm.cdf(latent))


def atrophy_for_age(age: float, lesion_load: float, noise: float) -> float:
    """The atrophy at which :func:`age_from` gives ``age`` (years, within :data:`AGE_RANGE`) for this lesion
    load and noise: the inverse that makes a subject's counterfactual at another age.  The ends of the
    range map to the ends of the atrophy scale (0 and 1)."""
    low, high = AGE_RANGE
    if not low <= age <= high:
        raise ValueError(f"age {age} years is outside the phantom's range {low:g}-{high:g}")
    latent = _normal_quantile((age - low) / (high - low))
    rest = math.sqrt(1.0 - AGE_ATROPHY ** 2 - AGE_LESION ** 2)
    u_l = _normal_quantile(stats.beta.cdf(lesion_load, 1.0, 3.0))
    u_a = (latent - AGE_LESION * u_l - rest * noise) / AGE_ATROPHY
    return float(stats.beta.ppf(stats.norm.cdf(u_a), 2.0, 3.0))


def sex_from(brain_scale: float, uniform: float) -> str:
    z = (brain_scale - BRAIN_SCALE_MEAN) / BRAIN_SCALE_SD
    return "M" if uniform < 1.0 / (1.0 + math.exp(-SEX_SLOPE * z)) else "F"


def _normal_quantile(p: float) -> float:
    return float(stats.norm.ppf(np.clip(p, 1e-9, 1.0 - 1e-9)))
