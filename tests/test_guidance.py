"""Covariate guidance scales (guidance.py): what ``--guidance`` accepts, the checks, and the per-dimension
weights the model takes (a covariate's one-hot dimensions share its scale)."""

from __future__ import annotations

import numpy as np
import pytest

from verydeepvae.data.covariates import Covariate, CovariateSchema
from verydeepvae.errors import UserError
from verydeepvae.guidance import Guidance, as_guidance, check_guidance, parse_guidance


@pytest.fixture
def schema():
    return CovariateSchema((Covariate("age", "numeric", mean=60.0, sd=10.0, minimum=40.0, maximum=80.0),
                            Covariate("sex", "categorical", levels=("F", "M")),
                            Covariate("lesion_load", "numeric", mean=1.0, sd=0.5, minimum=0.0, maximum=3.0)))


@pytest.mark.parametrize("text, default, named", [("3", 3.0, {}), (" 2.5 ", 2.5, {}),
                                                  ("age=2,lesion_load=5", 1.0, {"age": 2.0, "lesion_load": 5.0}),
                                                  ("2, lesion_load = 5", 2.0, {"lesion_load": 5.0})])
def test_parse(text, default, named):
    assert parse_guidance(text) == Guidance(default, named)


@pytest.mark.parametrize("text", ["", "x", "age=", "=2", "age=two", "2,3", "age=1,2"])
def test_parse_refuses_what_it_cannot_read(text):
    with pytest.raises(UserError, match="--guidance"):
        parse_guidance(text)


def test_weights_are_one_float_when_uniform_else_one_per_dimension(schema):
    assert check_guidance(3, schema).weights(schema) == 3.0
    assert check_guidance("2,age=2", schema).weights(schema) == 2.0
    weights = check_guidance({"sex": 4, "lesion_load": 5}, schema).weights(schema)
    np.testing.assert_array_equal(weights, [1.0, 4.0, 4.0, 5.0])  # age, sex F/M, lesion_load
    assert weights.dtype == np.float32


def test_checks(schema):
    with pytest.raises(UserError, match="not conditioned on 'weight'; its covariates are age, sex, lesion_load"):
        check_guidance("weight=2", schema)
    with pytest.raises(UserError, match="scales must be numbers >= 0"):
        check_guidance({"age": float("inf")}, schema)
    with pytest.raises(UserError, match="scales must be numbers >= 0"):
        check_guidance({"age": "lots"}, schema)
    with pytest.raises(UserError, match="for conditional models"):
        check_guidance("age=2", None)
    assert check_guidance("1", None).is_identity and check_guidance({"age": 1}, schema).is_identity


def test_json_round_trip_and_description():
    uniform, named = as_guidance(3), as_guidance("2,age=4")
    assert uniform.to_json() == 3.0 and Guidance.from_json(3.0) == uniform
    assert named.to_json() == {"default": 2.0, "per_covariate": {"age": 4.0}}
    assert Guidance.from_json(named.to_json()) == named
    assert str(uniform) == "3" and str(named) == "age 4 (others 2)"
