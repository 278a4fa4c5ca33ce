"""Command-line pieces of conditional models (argument parsing only; the work is in
``conditional.py`` and ``counterfactual.py``): ``train --covariates/--condition-on``,
``sample --condition/--conditions``, the scan covariates of ``reconstruct``/``evaluate``, and the
``counterfactual`` command.  Kept apart from ``cli.py`` so each command there needs one hook line.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

from .errors import UserError
from .json_types import JSONObject

if TYPE_CHECKING:
    from .conditional import SampleConditions
    from .guidance import Guidance


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--covariates", metavar="FILE",
                   help="TSV/CSV with one row per scan (matched by a path, filename or BIDS participant_id column) "
                        "holding the --condition-on covariates")
    p.add_argument("--condition-on", metavar="NAMES",
                   help="condition the model on these covariates, comma separated (e.g. age,sex; name:categorical "
                        "or name:numeric to say how a column is read); without --data, the phantom's own factors "
                        "(age, sex, lesion_load, atrophy...)")


def train_overrides(args: argparse.Namespace) -> JSONObject:
    out: JSONObject = {}
    if args.condition_on is not None:
        out["condition_on"] = [n.strip() for n in args.condition_on.split(",") if n.strip()]
    if args.covariates is not None:
        out["covariates_file"] = args.covariates
    return out


def add_sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="a conditional model's covariate for every volume (repeatable, e.g. --condition age=75 "
                        "--condition sex=F); those not given are drawn from the training scans' given these")
    p.add_argument("--conditions", metavar="FILE",
                   help="TSV/CSV with one row per volume to generate and covariates as columns (empty cells are "
                        "drawn); the number of volumes is the number of rows")
    add_guidance_option(p, "the --condition/--conditions covariates' effect W times (drawn ones are not scaled)")


def add_guidance_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--guidance", default="auto", metavar="W|NAME=W,...|calibrated|auto",
                   help=f"a conditional model: scale {what}, as classifier-free guidance does (1: the model as "
                        "trained); one scale per covariate with NAME=W pairs, e.g. age=2,lesion_load=5 "
                        "(others 1, or a leading bare W for the rest); calibrated: the scales calibrate-guidance "
                        "measured for this checkpoint; auto (default): calibrated if measured, else 1; "
                        "docs/conditional.md")


def checked_guidance(args: argparse.Namespace, checkpoint: Any, use: str = "samples") -> Guidance:
    """``--guidance`` resolved for a checkpoint's samples or counterfactuals (``guidance.resolve_guidance``),
    with a notice when the run's calibrated scales are used."""
    from .guidance import resolve_guidance
    from .inference import covariate_schema, run_folder

    guidance, notice = resolve_guidance(args.guidance, covariate_schema(checkpoint), run_folder(checkpoint.path),
                                        checkpoint.step, "--guidance", use)
    if notice and not getattr(args, "quiet", False):
        _notice(notice)
    return guidance


class SamplesConditioning(TypedDict, total=False):
    """What samples.json records about a conditional model's samples (nothing for an unconditional one)."""

    conditions: list[SampleConditions]
    guidance: float | JSONObject  # Guidance.to_json
    covariates: list[JSONObject]  # the schema's covariates (CovariateSchema.to_json)


class SampleRequest(NamedTuple):
    """What ``sample`` generates: how many volumes, their encoded covariates (num, dim) and guidance
    references (None for an unconditional model), the guidance weights the model takes
    (``Guidance.weights``) and what samples.json records about the conditioning."""

    num: int
    covariates: Any
    references: Any
    guidance: Any
    record: SamplesConditioning


def sample_conditions(args: argparse.Namespace, checkpoint: Any) -> SampleRequest:
    """The volumes ``sample`` is asked for (``--num``, ``--condition``, ``--conditions``, ``--guidance``)."""
    from . import conditional
    from .data.covariates import parse_assignments
    from .inference import covariate_schema

    schema = covariate_schema(checkpoint)
    guidance = checked_guidance(args, checkpoint)
    if schema is None:
        if args.condition or args.conditions:
            raise UserError(f"checkpoint {checkpoint.path} is an unconditional model; --condition/--conditions need "
                            "a model trained with --condition-on")
        return SampleRequest(args.num, None, None, 1.0, {})
    fixed = conditional.parse_request(schema, parse_assignments(args.condition), "--condition")
    num = args.num
    if args.conditions:
        requests = [{**row, **fixed} for row in conditional.read_conditions_file(args.conditions, schema)]
        if num != len(requests):
            _notice(f"--conditions {args.conditions} has {len(requests)} rows: generating {len(requests)} volumes")
        num = len(requests)
    else:
        requests = [dict(fixed) for _ in range(num)]
    resolved = conditional.resolve(schema, requests, args.seed)
    for note in resolved.notices:
        _notice(note)
    names = [f"sample_{i:04d}.nii.gz" for i in range(num)]
    return SampleRequest(num, resolved.vectors, resolved.references, guidance.weights(schema),
                         {"conditions": resolved.record(names), "guidance": guidance.to_json(),
                          "covariates": schema.to_json()["covariates"]})


def add_scan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--observed", action="append", default=[], metavar="NAME=VALUE",
                   help="a conditional model: the scans' own covariate (repeatable); otherwise found in --covariates, "
                        "the run's covariates.json or a participants.tsv next to the scans")
    p.add_argument("--covariates", metavar="FILE", help="a conditional model: TSV/CSV of the scans' own covariates")


def scan_vectors(args: argparse.Namespace, trained: Any, files) -> Any:
    """The encoded covariates of the scans for a conditional model, else None."""
    from . import conditional
    from .data.covariates import parse_assignments

    schema = trained.covariates
    if schema is None:
        if args.observed or args.covariates:
            raise UserError("--observed/--covariates are for conditional models; this one is unconditional")
        return None
    rows, _ = conditional.scan_covariates(trained, files, parse_assignments(args.observed, "--observed"),
                                          args.covariates)
    return schema.encode(rows)


def refuse(trained: Any, command: str) -> None:
    if trained.covariates is not None:
        raise UserError(f"{command} does not support conditional models yet (this one is conditioned on "
                        f"{', '.join(trained.covariates.names)}); use reconstruct or counterfactual, or the Python API")


def add_counterfactual_command(sub) -> None:
    from .cli_options import command, data_option, model_options, output_option

    p = command(sub, "counterfactual", "a scan with other covariates (e.g. older): encode it, decode it with "
                                        "changed covariates; NIfTI volumes, difference maps and a PNG strip")
    model_options(p)
    data_option(p, "a NIfTI file, a folder of them or a text/CSV list of paths", required=True, dest="input")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only)")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="the changed covariate (repeatable); the others keep the scan's own values")
    p.add_argument("--sweep", metavar="NAME=START:STOP:STEP",
                   help="one volume per value, e.g. age=50:90:5 (stop included) or sex=F,M, and a PNG strip")
    add_scan_options(p)
    p.add_argument("--mode", choices=["noise", "latents"], default="noise",
                   help="noise: keep each layer's standardised residual under the prior, so the latents follow "
                        "the new covariates; latents: keep the posterior means themselves")
    add_guidance_option(p, "the change W times (at the scan's own values it is still its reconstruction)")
    output_option(p, "folder for the counterfactual volumes, difference maps, PNG strips and counterfactuals.json")
    p.set_defaults(handler=_counterfactual)


def _counterfactual(args: argparse.Namespace) -> int:
    from . import commands
    from .conditional import require_schema, scan_covariates, sweep_values
    from .counterfactual import write_counterfactuals
    from .data.covariates import parse_assignments
    from .scan_files import input_files

    change = parse_assignments(args.condition)
    observed = parse_assignments(args.observed, "--observed")
    files = input_files(args.input, args.pattern)
    trained = commands.open_model(args)
    schema = require_schema(trained, "counterfactual")
    guidance = checked_guidance(args, trained.checkpoint, "counterfactuals")
    sweep = sweep_values(schema, args.sweep) if args.sweep else None
    if not change and sweep is None:
        raise UserError("counterfactual needs --condition NAME=VALUE and/or --sweep NAME=START:STOP:STEP")
    own = scan_covariates(trained, files, observed, args.covariates)  # before the output folder is claimed
    notices: list[str] = []
    commands.claim_output(args, "counterfactual")
    record = write_counterfactuals(trained, files, args.output_dir, change, sweep, observed, args.covariates,
                                   args.mode, args.batch_size, commands.progress_setting(args), notices, own=own,
                                   guidance=guidance)
    for note in notices:
        _notice(note)
    for scan in record["scans"]:
        print(f"{scan['input']}: own {scan['observed']} ({scan['observed_from']}); reconstruction PSNR "
              f"{scan['psnr_reconstruction_db']:.2f} dB; {len(scan['outputs'])} counterfactual(s)")
    print(f"wrote counterfactuals of {len(record['scans'])} scan(s), figures and counterfactuals.json to "
          f"{args.output_dir}")
    return 0


def add_calibrate_command(sub) -> None:
    from .cli_options import command, data_option, model_options, seed_option
    from .guidance import REALISM_TOLERANCE, SCALES

    p = command(sub, "calibrate-guidance", "measure, per covariate of a conditional model, the guidance scale at "
                                           "which samples respond to it as the training scans do")
    model_options(p)
    data_option(p, "scans with their covariates to measure the real response on (default: the run's training "
                   "scans, split.json)")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only)")
    p.add_argument("--covariates", metavar="FILE", help="TSV/CSV of the --data scans' covariates (else the run's "
                                                        "covariates.json or a participants.tsv next to them)")
    p.add_argument("--max-scans", type=int, default=400, help="at most this many scans (a seeded random subset)")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES),
                   help="guidance scales tried, in ascending order; the search stops at the first that reaches "
                        f"the real response or whose samples' Fréchet distance exceeds {REALISM_TOLERANCE:g}x scale 1's")
    p.add_argument("--measure", action="append", default=[], metavar="NAME=MEASURE",
                   help="the tissue measure a covariate's response is read on (repeatable), e.g. "
                        "lesion_load=lesion_ml; default: the one that tracks it most closely in the scans "
                        "(one of gm_ml, wm_ml, csf_ml, ventricle_ml, lesion_ml, brain_ml, csf_fraction)")
    p.add_argument("--points", type=int, default=9, help="covariate values per sweep")
    p.add_argument("--per-point", type=int, default=8, help="samples per value, scale and stream")
    p.add_argument("--streams", type=int, default=3,
                   help="independent sample streams (seeds --seed, --seed + 1, ...) pooled per scale; their "
                        "spread is reported (one stream can move a steep response's scale by a quarter)")
    p.add_argument("--counterfactual-scans", type=int, default=16,
                   help="training scans whose counterfactual sweeps set the counterfactuals' own scale (at most the "
                        "samples'; the largest that keeps their change monotonic); 0: the samples' scale")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    seed_option(p, "seed of the samples (the same at every scale)")
    p.add_argument("--output", "--output-dir", dest="output_dir", metavar="DIR",
                   help="folder for guidance_calibration.json and .png (default: the run folder, where "
                        "--guidance calibrated finds them)")
    p.set_defaults(handler=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from . import commands
    from .conditional import require_schema
    from .evaluate.calibration import CalibrationOptions, calibrate_run, check_measures, describe, select_scans
    from .data.covariates import parse_assignments

    if args.points < 3 or args.per_point < 1 or args.max_scans < 3 or args.streams < 1 or args.counterfactual_scans < 0:
        raise UserError(f"--points and --max-scans must be >= 3, --per-point and --streams >= 1 and "
                        f"--counterfactual-scans >= 0, got {args.points}, {args.max_scans}, {args.per_point}, "
                        f"{args.streams} and {args.counterfactual_scans}")
    options = CalibrationOptions(scales=_scales(args.scales), points=args.points, per_point=args.per_point,
                                 streams=args.streams, counterfactual_scans=args.counterfactual_scans,
                                 temperature=args.temperature, seed=commands.check_seed(args.seed),
                                 batch_size=args.batch_size, show_progress=commands.progress_setting(args))
    trained = commands.open_model(args)
    schema = require_schema(trained, "calibrate-guidance")
    options.measures = check_measures(parse_assignments(args.measure, "--measure"), schema)
    files, rows, source = select_scans(trained, args.data, args.pattern, args.covariates, args.max_scans, args.seed)
    if args.output_dir:  # only now: every check above runs before anything is written
        commands.claim_output(args, "calibrate-guidance")
    record = calibrate_run(trained, files, rows, args.output_dir or trained.run_dir, options, source)
    for line in describe(record):
        print(line)
    return 0


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--scales expects comma-separated numbers such as 1,2,3, got {text!r}") from None
    if not scales or any(not (0 < s < float("inf")) for s in scales) or list(scales) != sorted(scales):
        raise UserError(f"--scales must be positive numbers in ascending order, got {text!r}")
    return scales


def show_schema(checkpoint: Any) -> list[str]:
    """Lines of ``config show --checkpoint`` about a conditional model's covariates."""
    from .guidance import read_calibrated
    from .inference import covariate_schema, run_folder

    schema = covariate_schema(checkpoint)
    if schema is None:
        return ["unconditional model (no covariates)"]
    run = run_folder(checkpoint.path)
    calibrated, why = read_calibrated(run, checkpoint.step)
    if calibrated is None:
        return [*schema.summary_lines(), f"guidance not calibrated: {why}"]
    moved, _ = read_calibrated(run, checkpoint.step, "counterfactuals")
    return [*schema.summary_lines(), f"guidance calibrated for this checkpoint: {calibrated}",
            f"counterfactual guidance calibrated for this checkpoint: {moved}"]


def _notice(text: str) -> None:
    print(f"verydeepvae: notice: {text}", file=sys.stderr)
