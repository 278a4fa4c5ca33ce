"""Covariate guidance scales: how strongly a conditional model follows each requested covariate.

``--guidance 3`` scales every requested covariate's effect on the decoder 3 times (model/vae.py
``_film``); ``--guidance age=2,lesion_load=5`` gives each covariate its own scale (the others keep
1), and ``--guidance 2,lesion_load=5`` sets a default for the rest.  One scale for all cannot serve
covariates the model has learned to different degrees: a short run follows age at guidance 2 but
lesion load only at 5, which overdrives age (docs/conditional.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .data.covariates import CovariateSchema
from .errors import UserError

# written by ``verydeepvae calibrate-guidance`` into the run folder (evaluate/calibration.py)
CALIBRATION_FILE = "guidance_calibration.json"
CALIBRATION_FIGURE = "guidance_calibration.png"
CALIBRATED = "calibrated"
# the scales calibrate-guidance tries, and how much worse than scale 1's a scale's samples may be
# (Fréchet distance to the training scans) before the search stops; kept here, not in
# evaluate/calibration.py, so that building the command line does not import the evaluation
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0)
REALISM_TOLERANCE = 1.5


@dataclass(frozen=True)
class Guidance:
    """A scale for every covariate: ``per_covariate`` by name, ``default`` for the others."""

    default: float = 1.0
    per_covariate: Mapping[str, float] = field(default_factory=dict)

    def scale(self, name: str) -> float:
        return float(self.per_covariate.get(name, self.default))

    @property
    def is_identity(self) -> bool:
        """Whether every covariate keeps the model's own effect (all scales 1)."""
        return self.default == 1.0 and all(w == 1.0 for w in self.per_covariate.values())

    @property
    def is_uniform(self) -> bool:
        return all(w == self.default for w in self.per_covariate.values())

    def weights(self, schema: CovariateSchema) -> float | np.ndarray:
        """What the model takes: one float when every covariate has the same scale, else one
        weight per encoded dimension (dim,) float32 (every dimension of a covariate gets its scale)."""
        if self.is_uniform:
            return float(self.default)
        out = np.full(schema.dim, self.default, dtype=np.float32)
        for name, w in self.per_covariate.items():
            out[schema.slots(name)] = w
        return out

    def to_json(self) -> float | dict[str, Any]:
        """A number when uniform (as records before per-covariate scales), else the scales by name
        with the default."""
        if self.is_uniform:
            return float(self.default)
        return {"default": float(self.default), "per_covariate": {k: float(v) for k, v in self.per_covariate.items()}}

    @classmethod
    def from_json(cls, data: Any) -> "Guidance":
        if isinstance(data, Mapping):
            return cls(float(data.get("default", 1.0)), {str(k): float(v) for k, v in data["per_covariate"].items()})
        return cls(float(data))

    def __str__(self) -> str:
        if self.is_uniform:
            return f"{self.default:g}"
        named = ", ".join(f"{k} {v:g}" for k, v in self.per_covariate.items())
        return f"{named} (others {self.default:g})"


def parse_guidance(text: str, where: str = "--guidance") -> Guidance:
    """``3``, ``age=2,lesion_load=5`` or ``2,lesion_load=5`` -> a Guidance (scales not yet checked
    against a model: ``check_guidance``)."""
    default, named = 1.0, {}
    usage = f"{where} expects W or NAME=W[,NAME=W...] (e.g. 3 or age=2,lesion_load=5), got {text!r}"
    for index, item in enumerate(str(text).split(",")):
        name, sep, value = item.partition("=")
        name, value = (name.strip(), value) if sep else ("", name)
        try:
            number = float(value)
        except ValueError:
            raise UserError(usage) from None
        if sep and not name:
            raise UserError(usage)
        if sep:
            named[name] = number
        elif index == 0:
            default = number
        else:
            raise UserError(f"{where}: only the first item may be a bare scale (the default); {usage}")
    return Guidance(default, named)


def as_guidance(value: Any, name: str = "guidance") -> Guidance:
    """A Guidance from a number, ``"age=2,lesion_load=5"``, a mapping of scales by covariate name
    (others 1) or a Guidance; not checked (``check_guidance``)."""
    if isinstance(value, Guidance):
        return value
    if isinstance(value, str):
        return parse_guidance(value, name)
    if isinstance(value, Mapping):
        return Guidance(1.0, {str(k): _number(v, name) for k, v in value.items()})
    return Guidance(_number(value, name))


def check_guidance(value: Any, schema: CovariateSchema | None, name: str = "guidance") -> Guidance:
    """A guidance (as ``as_guidance`` takes it), checked: finite scales >= 0, known covariate names,
    and a conditional model unless every scale is 1 (``schema`` None: unconditional)."""
    guidance = as_guidance(value, name)
    for scale in (guidance.default, *guidance.per_covariate.values()):
        if not (0.0 <= scale < math.inf):
            raise UserError(f"{name} scales must be numbers >= 0, got {scale:g}")
    if schema is None:
        if not guidance.is_identity:
            raise UserError(f"{name} is for conditional models (trained with --condition-on); this one is "
                            "unconditional")
        return guidance
    for covariate in guidance.per_covariate:
        if covariate not in schema.names:
            raise UserError(f"{name}: the model is not conditioned on {covariate!r}; its covariates are "
                            f"{', '.join(schema.names)}")
    return guidance


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} scales must be numbers >= 0, got {value!r}") from None


USES = ("samples", "counterfactuals")


def read_calibrated(run_dir: str | Path, step: int | None = None, use: str = "samples") -> tuple[Guidance | None, str]:
    """The guidance ``calibrate-guidance`` chose for a run's samples or its ``counterfactuals`` (a
    scale of their own, evaluate/counterfactual_calibration.py; calibrations made before it gave the
    samples' to both), and why there is none (else "").

    None when the run has no calibration, or when it was made at another step than ``step`` (a
    calibration belongs to one checkpoint: training on changes how strongly the model follows its
    covariates)."""
    if use not in USES:
        raise ValueError(f"use must be one of {USES}, got {use!r}")
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None, f"the run has no {CALIBRATION_FILE} (verydeepvae calibrate-guidance makes it)"
    try:
        record = json.loads(path.read_text())
        own = use == "counterfactuals" and "counterfactual_guidance" in record
        key = "counterfactual_guidance" if own else "guidance"
        guidance, made_at = Guidance.from_json(record[key]), record.get("step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not a readable guidance calibration ({type(error).__name__}: {error})") from None
    if step is not None and made_at is not None and int(made_at) != int(step):
        return None, (f"{path} was made for step {made_at}, not this checkpoint's step {step}; run "
                      "verydeepvae calibrate-guidance again")
    return guidance, ""


def resolve_guidance(value: Any, schema: CovariateSchema | None, run_dir: str | Path, step: int | None = None,
                     name: str = "--guidance", use: str = "samples") -> tuple[Guidance, str]:
    """The guidance to use for ``use`` (samples or counterfactuals) and a notice ("" if none) for ``value``:

    * ``None`` or ``"auto"``: the run's calibrated guidance when it has one for this step, else 1;
    * ``"calibrated"``: the run's calibrated guidance (an error when there is none);
    * anything ``check_guidance`` takes: that."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in (None, "auto", CALIBRATED):
        return check_guidance(value, schema, name), ""
    if schema is None:
        if text == CALIBRATED:
            raise UserError(f"{name} calibrated is for conditional models; this one is unconditional")
        return Guidance(), ""
    guidance, why = read_calibrated(run_dir, step, use)
    if guidance is None:
        if text == CALIBRATED:
            raise UserError(f"{name} calibrated: {why}")
        return Guidance(), ""
    guidance = check_guidance(guidance, schema, f"{name} (from {CALIBRATION_FILE})")
    return guidance, f"guidance {guidance}, calibrated for this checkpoint's {use} ({CALIBRATION_FILE})"
