"""What each command of the command line does, once its arguments are parsed: check them, call one
library function, print the result line.  User errors are :class:`UserError` (``cli.main`` prints
them as one line and exits with status 2)."""

from __future__ import annotations

import argparse
import sys

from . import cli_conditional
from .errors import UserError
from .json_types import JSONObject

def verbosity_level(args: argparse.Namespace) -> int:
    from .console import NORMAL, QUIET, VERBOSE

    return QUIET if args.quiet else VERBOSE if getattr(args, "verbose", False) else NORMAL


def load_config(args: argparse.Namespace, extra: JSONObject | None = None, notices: list[str] | None = None):
    from .config import build_config, parse_override

    overrides: JSONObject = dict(parse_override(text) for text in args.set)
    overrides.update(extra or {})
    stored = None
    if args.config is not None:
        from .train.run_record import stored_config

        stored = stored_config(args.config)  # None: an ordinary configuration file
    return build_config(preset=args.preset, config_file=args.config, overrides=overrides, notices=notices,
                        file_values=stored)


def train_command(args: argparse.Namespace) -> int:
    extra: JSONObject = {}
    for flag, key in (("data", "data_path"), ("output_dir", "output_dir"), ("max_steps", "max_steps"),
                      ("device", "device"), ("precision", "precision"), ("seed", "seed"),
                      ("pattern", "nifti_filename_pattern"), ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            extra[key] = getattr(args, flag)
    if args.resume:
        extra["resume"] = True
    if args.overwrite:
        extra["overwrite"] = True
    if args.visualise_pipeline:
        extra["visualise_training_pipeline_before_starting"] = True
    if args.skip_bad_files:
        extra["skip_bad_files"] = True
    if args.deterministic:
        extra["deterministic"] = True
    extra.update(cli_conditional.train_overrides(args))
    notices: list[str] = []
    cfg = load_config(args, extra, notices)
    from .train.loop import train

    result = train(cfg, notices=notices, show_progress=progress_setting(args), verbosity=verbosity_level(args),
                   command=args.argv)
    if result.checkpoint is not None:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}; samples in {result.output_dir / 'samples'}")
        if cfg.condition_on and not getattr(args, "quiet", False):  # how strongly to follow each covariate is measured per model, not guessed
            print(f"next: verydeepvae calibrate-guidance --checkpoint {result.output_dir} (measures each covariate's "
                  "guidance scale; sample, counterfactual and evaluate then use it; docs/conditional.md)")
    return 0


def parse_temperature(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--temperature must be a number or comma-separated numbers, got {text!r}") from None
    check_temperatures(values, repr(text[:40]))
    return values[0] if len(values) == 1 else values


def check_temperatures(values: list[float], shown: str) -> None:
    from .sampling import MAX_TEMPERATURE, temperatures_in_range

    if not temperatures_in_range(values):
        raise UserError(f"--temperature must be between 0 and {MAX_TEMPERATURE:g}, got {shown}")


MAX_INTERPOLATION_STEPS = 1000


def check_seed(seed: int) -> int:
    from .config import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def sample_command(args: argparse.Namespace) -> int:
    from .inference import reference_range
    from .sampling import check_prior, write_samples

    if args.num < 1 or args.batch_size < 1:
        raise UserError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    check_seed(args.seed)
    temperature = parse_temperature(args.temperature)
    trained = open_model(args)
    model = trained.model
    check_prior(model, args.prior)  # before the output folder is touched
    if isinstance(temperature, list) and len(temperature) != model.decoder.num_levels:
        raise UserError(f"--temperature needs 1 or {model.decoder.num_levels} values (one per resolution level), "
                        f"got {len(temperature)}")
    reference = None
    if args.intensity == "data":
        reference = trained.intensity_reference
        reference_range(reference, str(trained.checkpoint.path))  # a clear error if the checkpoint has none
    request = cli_conditional.sample_conditions(args, trained.checkpoint)
    claim_output(args, "sample")
    paths = write_samples(model, args.output_dir, request.num, temperature, args.seed,
                          voxel_size_mm=trained.voxel_size_mm, batch_size=args.batch_size,
                          device=trained.device, show_progress=progress_setting(args), intensity_reference=reference,
                          extra_record={**trained.record(), **request.record}, covariates=request.covariates,
                          prior=args.prior, guidance=request.guidance, references=request.references,
                          voxels=args.voxels)
    print(f"wrote {len(paths)} volumes and samples.png to {args.output_dir}")
    return 0


def open_model(args: argparse.Namespace):
    from .inference import open_trained

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return open_trained(args.checkpoint, use_ema=not args.raw_weights, device=args.device)


def claim_output(args: argparse.Namespace, command: str) -> None:
    from .output_folder import claim_folder

    claim_folder(args.output_dir, command, args.overwrite)


def progress_setting(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress or args.quiet else None


def reconstruct_command(args: argparse.Namespace) -> int:
    from .generate import reconstruct_files
    from .scan_files import input_files

    check_temperatures([args.temperature], str(args.temperature))
    check_seed(args.seed)
    files = input_files(args.input, args.pattern)
    trained = open_model(args)
    covariates = cli_conditional.scan_vectors(args, trained, files)
    claim_output(args, "reconstruct")
    record = reconstruct_files(trained, files, args.output_dir, posterior_mean=args.mode == "mean",
                               prior_above=args.prior_above, temperature=args.temperature, seed=args.seed,
                               batch_size=args.batch_size, intensity=args.intensity, show_progress=progress_setting(args),
                               covariates=covariates)
    for row in record["files"]:
        print(f"{row['reconstruction']}: {row['elbo_bits_per_voxel']:.4f} bits/voxel, PSNR {row['psnr_db']:.2f} dB, "
              f"SSIM {row['ssim']:.4f}, MAE {row['mae']:.4f}")
    print(f"wrote {len(record['files'])} reconstructions (model grid, and *_native.nii.gz in each input's own "
          f"space), reconstructions.png and reconstructions.json to {args.output_dir}")
    return 0


def encode_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scan_files import input_files
    from .latents import encode_files
    from .output_folder import claim_file

    files = input_files(args.input, args.pattern)
    trained = open_model(args)
    cli_conditional.refuse(trained, "encode")
    claim_file(args.output, [Path(args.output).with_suffix(".json")], args.overwrite)
    path = encode_files(trained, files, args.output, batch_size=args.batch_size, show_progress=progress_setting(args))
    print(f"wrote the latents of {len(files)} volumes ({trained.model.num_layers} layers) to {path} "
          f"(metadata also in {path.with_suffix('.json')})")
    return 0


def decode_command(args: argparse.Namespace) -> int:
    from .latents import decode_latents, native_path

    trained = open_model(args)
    cli_conditional.refuse(trained, "decode")
    claim_output(args, "decode")
    paths = decode_latents(trained, args.latents, args.output_dir, args.batch_size, show_progress=progress_setting(args))
    native = sum(native_path(p).is_file() for p in paths)
    where = (f", {native} of them also in their encoded scan's own space (*_native.nii.gz)" if native else
             "; the latents file records no scan geometry (an older version wrote it), so they are on the model "
             "grid only")
    print(f"wrote {len(paths)} decoded volumes to {args.output_dir}{where}")
    return 0


def interpolate_command(args: argparse.Namespace) -> int:
    from .latents import interpolate

    if not 2 <= args.steps <= MAX_INTERPOLATION_STEPS:
        raise UserError(f"--steps must be between 2 and {MAX_INTERPOLATION_STEPS} (both ends included), got {args.steps}")
    (a,), (b,) = (single_file(f) for f in (args.a, args.b))
    trained = open_model(args)
    cli_conditional.refuse(trained, "interpolate")
    claim_output(args, "interpolate")
    paths = interpolate(trained, a, b, args.output_dir, steps=args.steps, method=args.method,
                        batch_size=args.batch_size, intensity=args.intensity, show_progress=progress_setting(args))
    print(f"wrote {len(paths)} volumes, the two ends in their scans' own space (a_native.nii.gz, b_native.nii.gz), "
          f"interpolation.png and interpolation.json to {args.output_dir}")
    return 0


def single_file(path: str) -> list:
    from pathlib import Path

    from .scan_files import input_files

    if Path(path).is_dir():
        raise UserError(f"interpolate takes two NIfTI files; {path} is a folder")
    files = input_files(path)
    if len(files) != 1:
        raise UserError(f"interpolate takes two NIfTI files; {path} lists {len(files)}")
    return files


def evaluate_command(args: argparse.Namespace) -> int:
    from .evaluate import EvaluationOptions, run_evaluation
    from .evaluate.run import check_set_size
    from .sampling import check_prior

    for flag in ("num_samples", "max_heldout", "max_train", "num_pairs", "baseline_repeats"):
        if getattr(args, flag) < 1:
            shown = "--num/--num-samples" if flag == "num_samples" else f"--{flag.replace('_', '-')}"
            raise UserError(f"{shown} must be >= 1, got {getattr(args, flag)}")
    check_seed(args.seed)
    options = EvaluationOptions(
        num_samples=args.num_samples, temperature=parse_temperature(args.temperature), seed=args.seed,
        batch_size=args.batch_size, max_heldout=args.max_heldout, max_train=args.max_train,
        num_pairs=args.num_pairs, baseline_repeats=args.baseline_repeats, set_size=args.set_size, prior=args.prior,
        voxels=args.voxels,
        morphometry=args.morphometry,
        feature_plugin=args.feature_plugin, pattern=args.pattern, show_progress=progress_setting(args), covariates_file=args.covariates,
    )
    check_set_size(options)  # the held-out bound is checked once the data is selected
    trained = open_model(args)
    check_prior(trained.model, args.prior)  # before the output folder is touched
    options.guidance = cli_conditional.checked_guidance(args, trained.checkpoint)
    options.counterfactual_guidance = cli_conditional.checked_guidance(args, trained.checkpoint, "counterfactuals")
    claim_output(args, "evaluate")
    report = run_evaluation(trained, args.data, args.output_dir, options)
    print(report.summary())
    return 0


def config_show_command(args: argparse.Namespace) -> int:
    notices: list[str] = []
    budget = None
    if args.gpu_memory is not None:
        from .memory import parse_size

        if not args.estimate_memory:
            raise UserError("--gpu-memory needs --estimate-memory")
        try:
            budget = parse_size(args.gpu_memory)
        except ValueError as error:
            raise UserError(f"--gpu-memory: {error}") from None
    checkpoint = None
    if args.checkpoint is not None:
        from .checkpoint import resolve_checkpoint

        if args.preset or args.config or args.set:
            raise UserError("config show --checkpoint shows the checkpoint's own configuration; drop --preset, "
                            "--config and --set")
        checkpoint = resolve_checkpoint(args.checkpoint)
        cfg = checkpoint.config
    else:
        cfg = load_config(args, notices=notices)
    if args.json:
        print(cfg.to_json())
        return 0
    from .model import VeryDeepVAE

    schema = None
    if checkpoint is not None:
        from .inference import covariate_schema

        schema = covariate_schema(checkpoint)
    model = VeryDeepVAE(cfg, schema.dim if schema is not None else 0)
    print(cfg.to_json())
    print(model_summary(model, cfg))
    if checkpoint is not None:
        print(f"checkpoint {checkpoint.path}, step {checkpoint.step}")
        print("\n".join(cli_conditional.show_schema(checkpoint)))
    elif cfg.condition_on:
        print(f"conditioned on {', '.join(cfg.condition_on)}: the conditioning weights (not counted above) depend on "
              "the covariates' levels, known once the data are read")
    if args.estimate_memory:
        from .memory import report
        from .train.memory_plan import for_config_show

        shown, levels, why = for_config_show(cfg, budget, notices)
        print(report(shown, budget, (levels, why)))
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    return 0


def model_summary(model, cfg) -> str:
    params = sum(p.numel() for p in model.parameters())
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    lines = [
        f"parameters: {params:,} ({params / 1e6:.2f} M; encoder {enc:,}, decoder {dec:,}, "
        f"output head {sum(p.numel() for p in model.output_head.parameters()):,})",
        f"latent layers: {model.num_layers}; latent dimensions: {model.latent_dimensions():,} "
        f"({model.latent_dimensions() / cfg.resolution ** 3:.1f}x the {cfg.resolution ** 3:,} voxels)",
        "level  resolution  channels  latent layers  z channels  kernel (up/down)",
    ]
    for level, res in enumerate(cfg.level_resolutions()):
        lines.append(f"{level:5d}  {res:>9}³  {cfg.top_down_channels[level]:8d}  "
                     f"{cfg.latent_feature_maps_per_resolution[level]:13d}  {cfg.channels_per_latent[level]:10d}  "
                     f"{cfg.kernel_sizes_bottom_up[level]}/{cfg.kernel_sizes_top_down[level]}")
    return "\n".join(lines)


def inspect_command(args: argparse.Namespace) -> int:
    from .train.inspect_run import inspect_run

    print("\n".join(inspect_run(args.run)))
    return 0


def phantom_command(args: argparse.Namespace) -> int:
    from .data.phantom import generate_population

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.resolution < 8 or args.resolution & (args.resolution - 1):
        raise UserError(f"--resolution must be a power of two >= 8, got {args.resolution}")
    claim_output(args, "phantom")
    paths = generate_population(args.num, args.resolution, args.output_dir, args.seed,
                                progress=False if args.quiet else None)
    print(f"wrote {len(paths)} volumes and participants.tsv to {args.output_dir}")
    return 0
