"""Command-line interface: argument parsing only; every command calls a library function.

User errors print one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from typing import Any, Iterator, Sequence

from . import cli_conditional
from .errors import Interrupted, Stopped, UserError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    from .process_defaults import apply_cli_defaults

    apply_cli_defaults()  # before any command loads torch
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the run record (train)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        with _sigterm_interrupts(args.command != "train"):  # training handles signals itself (train/loop.py)
            return int(args.handler(args) or 0)
    except UserError as error:
        kind = "stopped" if isinstance(error, Stopped) else "error"
        print(f"verydeepvae: {kind}: {error}", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_USER_ERROR))
    except OSError as error:  # full disk, read-only or missing folder met while writing outputs
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"verydeepvae: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as error:
        print("verydeepvae: interrupted", file=sys.stderr)
        return getattr(error, "exit_code", 130)
    except Exception as error:
        if type(error).__name__ != "OutOfMemoryError":  # torch's, without importing torch here
            raise
        print(f"verydeepvae: error: out of memory ({str(error).splitlines()[0] if str(error) else 'no details'}); "
              "try a smaller --batch-size, or --device cpu", file=sys.stderr)
        return EXIT_USER_ERROR


@contextlib.contextmanager
def _sigterm_interrupts(enabled: bool) -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` (as Ctrl-C raises KeyboardInterrupt) while the command
    runs, so it can leave consistent outputs; the previous handler is restored afterwards."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Formatter(argparse.HelpFormatter):
    """Every option's default in its help line (unless the help already says what happens by
    default), and an option's older spellings shown once, after its name: ``--output DIR (also
    --output-dir)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or any(default is v for v in (None, False, True))
                or default == argparse.SUPPRESS or isinstance(default, list)):
            return text
        return f"{text} (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) < 2 or not all(o.startswith("--") for o in action.option_strings):
            return super()._format_action_invocation(action)
        first, *others = action.option_strings
        shown = first
        if action.nargs != 0:
            shown += " " + self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{shown} (also {', '.join(others)})"


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad arguments already; keep its one-line message."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _command(sub, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")


def _device_name(text: str) -> str:
    from .device import check_device_name

    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# One spelling per idea in every command; the older spellings stay as aliases (shown in --help).
def _output_option(p: argparse.ArgumentParser, text: str, required: bool = True, dest: str = "output_dir") -> None:
    p.add_argument("--output", "--output-dir", dest=dest, required=required, metavar="DIR", help=text)


def _data_option(p: argparse.ArgumentParser, text: str, required: bool = False, dest: str = "data") -> None:
    p.add_argument("--data", "--input", dest=dest, required=required, metavar="PATH", help=text)


def _device_option(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", type=_device_name, default=default, metavar="DEVICE",
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps"
                        + ("" if default else " (default: the configuration's device, auto)"))


def _seed_option(p: argparse.ArgumentParser, text: str = "random seed") -> None:
    p.add_argument("--seed", type=int, default=0, help=text)


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="verydeepvae", description="Very deep VAEs for 3D brain MRI.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"verydeepvae {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _command(sub, "train", "train (or resume) a model")
    _config_options(p)
    _data_option(p, "folder of NIfTI files (nested folders too) or a text/CSV list of paths; "
                    "default: the built-in phantom population")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only), e.g. '*FLAIR*' "
                                     "(default: every .nii and .nii.gz; sets nifti_filename_pattern)")
    _output_option(p, "where checkpoints, figures, TensorBoard events and samples go "
                      "(default: the configuration's output_dir, runs/default)", required=False)
    p.add_argument("--max-steps", type=int, help="number of optimiser steps (default: from total_epochs)")
    p.add_argument("--batch-size", type=int, help="volumes per step and process (default: the configuration's)")
    p.add_argument("--seed", type=int, help="random seed of the split, the initial weights and the data order "
                                            "(default: the configuration's, 0)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output folder that holds another run, moving that run aside")
    _device_option(p, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"],
                   help="arithmetic of the training step: fp16 needs a CUDA GPU, auto = bf16 where it is native, "
                        "fp16 on CUDA 7.x, else fp32 (default: the configuration's, fp32)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU algorithms (slower): a resumed run repeats an uninterrupted one bitwise")
    p.add_argument("--visualise-pipeline", action="store_true",
                   help="write augmented training examples to <output>/pipeline_test first")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip unreadable or unusable NIfTI files (listed in skipped_files.txt) instead of stopping")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line every log_every steps (as when the output is not a terminal)")
    _verbosity_options(p, verbose="also a line for every checkpoint and figure written, and the run's versions, "
                                  "host and git commit at start")
    cli_conditional.add_train_options(p)
    p.set_defaults(handler=_train)

    p = _command(sub, "sample", "draw synthetic volumes from a trained model")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or run folder (newest checkpoint)")
    p.add_argument("--num", type=int, default=8, help="number of volumes")
    p.add_argument("--temperature", default="1.0",
                   help="prior temperature: one value, or one per resolution level (highest first), comma separated")
    p.add_argument("--prior", choices=["auto", "learned", "fitted"], default="auto",
                   help="which prior draws the coarsest latents: auto = the Gaussian fitted at the end of "
                        "training when the run chose it (model/fitted_prior.py), else the learned one")
    _output_option(p, "folder for the volumes, samples.png and samples.json")
    _seed_option(p)
    p.add_argument("--batch-size", type=int, default=4, help="volumes generated at once")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    _overwrite_option(p)
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: intensities in [0, 1]; data: mapped to the training data's typical scale")
    _device_option(p)
    _progress_option(p)
    _verbosity_options(p)
    cli_conditional.add_sample_options(p)
    p.set_defaults(handler=_sample)

    _inference_commands(sub)
    cli_conditional.add_counterfactual_command(sub)

    p = _command(sub, "config", "inspect configurations")
    config_sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = _command(config_sub, "show", "print the resolved configuration and model size")
    _config_options(show)
    show.add_argument("--json", action="store_true", help="print only the configuration as JSON")
    show.add_argument("--estimate-memory", action="store_true",
                      help="estimate training memory per sample, with and without activation checkpointing")
    show.add_argument("--gpu-memory", metavar="SIZE",
                      help="with --estimate-memory: the largest batch size fitting this memory, e.g. 24GiB")
    show.add_argument("--checkpoint", help="show a trained model's configuration (a checkpoint file or run folder) "
                                           "and, for a conditional model, its covariates")
    show.set_defaults(handler=_config_show)
    config_parser = p  # bound now: ``p`` is reassigned below, and a lambda would see the last one
    p.set_defaults(handler=lambda args: (config_parser.print_help(), EXIT_USER_ERROR)[1])

    p = _command(sub, "inspect", "one screen about a run: training now?, steps, checkpoints, last figures")
    p.add_argument("run", help="a run folder (the --output of train); read only, safe while it trains")
    p.set_defaults(handler=_inspect)

    p = _command(sub, "phantom", "write the built-in FLAIR-like phantom brain population")
    p.add_argument("--num", type=int, default=100, help="number of subjects")
    p.add_argument("--resolution", type=int, default=64, help="volumes are RESOLUTION³ voxels (a power of two)")
    _output_option(p, "folder for the volumes and participants.tsv")
    _seed_option(p, "random seed of the population")
    _overwrite_option(p)
    _verbosity_options(p)
    p.set_defaults(handler=_phantom)
    return parser


_NATIVE = "; each also resampled into its input scan's own space (*_native.nii.gz)"


def _inference_commands(sub) -> None:
    """reconstruct, encode, decode, interpolate, evaluate: each calls one library function."""
    p = _command(sub, "reconstruct", "reconstruct NIfTI volumes; per-file bits/voxel, PSNR, SSIM, MAE")
    _model_options(p)
    _data_option(p, "a NIfTI file, a folder of them or a text/CSV list of paths", required=True, dest="input")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only), e.g. '*FLAIR*'")
    _output_option(p, "folder for the reconstructions, reconstructions.png and reconstructions.json" + _NATIVE)
    p.add_argument("--mode", choices=["mean", "sample"], default="mean",
                   help="latents: posterior mean at every layer or a posterior sample")
    p.add_argument("--prior-above", type=int, metavar="RES",
                   help="take the latents at resolutions finer than RES³ from the prior (progressive "
                        "reconstruction; default: every latent from the posterior)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="prior temperature for the latents taken from the prior (0: prior means)")
    _seed_option(p)
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: [0, 1]; data: mapped back to each input file's own intensity scale")
    cli_conditional.add_scan_options(p)
    p.set_defaults(handler=_reconstruct)

    p = _command(sub, "encode", "write the posterior-mean latents of NIfTI volumes to a .safetensors file")
    _model_options(p)
    _data_option(p, "a NIfTI file, a folder of them or a text/CSV list of paths", required=True, dest="input")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only)")
    p.add_argument("--output", "--output-dir", dest="output", required=True, metavar="FILE",
                   help="latents file to write (.safetensors; metadata, including each input's scan space, "
                        "also as .json)")
    p.set_defaults(handler=_encode)

    p = _command(sub, "decode", "decode a latents file written by encode back to NIfTI volumes")
    _model_options(p)
    p.add_argument("--latents", required=True, help="a .safetensors file written by verydeepvae encode")
    _output_option(p, "folder for the decoded volumes; each also in its encoded scan's own space "
                      "(*_native.nii.gz) when the latents file records it")
    p.set_defaults(handler=_decode)

    p = _command(sub, "interpolate", "volumes between two inputs, interpolating every latent layer")
    _model_options(p)
    p.add_argument("a", help="first NIfTI file")
    p.add_argument("b", help="second NIfTI file")
    p.add_argument("--steps", type=int, default=8, help="number of volumes written, both ends included")
    p.add_argument("--method", choices=["slerp", "linear"], default="slerp",
                   help="spherical or linear interpolation of each latent layer")
    _output_option(p, "folder for interp_XX.nii.gz, interpolation.png and interpolation.json; the two ends "
                      "also in their input scan's own space (a_native.nii.gz, b_native.nii.gz)")
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: [0, 1]; data: mapped back to the inputs' intensity scales (interpolated)")
    p.set_defaults(handler=_interpolate)

    p = _command(sub, "evaluate", "evaluation report (JSON + Markdown + figures) on held-out data")
    _model_options(p)
    _data_option(p, "folder / list of NIfTI files to evaluate on; default: the run's own split "
                    "(split.json validation files are held out)")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only)")
    _output_option(p, "where report.json, report.md and figures/ go")
    p.add_argument("--num", "--num-samples", dest="num_samples", type=int, default=32, help="prior samples to draw")
    p.add_argument("--temperature", default="1.0", help="sampling temperature: one value or one per level")
    p.add_argument("--prior", choices=["auto", "learned", "fitted"], default="auto",
                   help="which prior draws the coarsest latents: auto = the Gaussian fitted at the end of "
                        "training when the run chose it (model/fitted_prior.py), else the learned one")
    _seed_option(p)
    p.add_argument("--max-heldout", type=int, default=100, help="at most this many held-out volumes")
    p.add_argument("--max-train", type=int, default=1000,
                   help="at most this many training volumes for the memorisation check")
    p.add_argument("--num-pairs", type=int, default=100, help="MS-SSIM pairs for diversity")
    p.add_argument("--baseline-repeats", type=int, default=50,
                   help="random real half splits each real-vs-real baseline is averaged over")
    p.add_argument("--morphometry", choices=["auto", "on", "off"], default="auto",
                   help="tissue volumes (FLAIR-like contrast): auto = when participants.tsv (phantom) is found")
    p.add_argument("--feature-plugin", metavar="MODULE:CALLABLE",
                   help="optional extra feature extractor you supply (e.g. a MedicalNet wrapper with local weights)")
    p.add_argument("--covariates", metavar="FILE",
                   help="a conditional model: TSV/CSV of the held-out scans' covariates (default: the run's "
                        "covariates.json, or a participants.tsv next to the scans)")
    p.set_defaults(handler=_evaluate)


def _verbosity_options(p: argparse.ArgumentParser, verbose: str | None = None) -> None:
    """--quiet, and --verbose where a command has more to say (console.py)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final result")
    if verbose:
        group.add_argument("-v", "--verbose", action="store_true", help=verbose)


def _verbosity(args: argparse.Namespace) -> int:
    from .console import NORMAL, QUIET, VERBOSE

    return QUIET if args.quiet else VERBOSE if getattr(args, "verbose", False) else NORMAL


def _overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder (or file) that holds earlier outputs, moving them aside first")


def _model_options(p: argparse.ArgumentParser) -> None:
    _overwrite_option(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or run folder (newest checkpoint)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--batch-size", type=int, default=4, help="volumes processed at once")
    _device_option(p)
    _progress_option(p)
    _verbosity_options(p)


def _config_options(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--preset", choices=PRESETS, help="start from a preset configuration (default: the built-in "
                                                     "defaults, a 32³ model)")
    p.add_argument("--config", help="JSON or YAML configuration file (original key names accepted), or a run folder, "
                                    "its run.json or a checkpoint (the configuration that run trained with)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration value (repeatable), e.g. --set batch_size=2")


def _load_config(args: argparse.Namespace, extra: dict[str, Any] | None = None, notices: list[str] | None = None):
    from .config import build_config, parse_override

    overrides: dict[str, Any] = dict(parse_override(text) for text in args.set)
    overrides.update(extra or {})
    stored = None
    if args.config is not None:
        from .train.run_record import stored_config

        stored = stored_config(args.config)  # None: an ordinary configuration file
    return build_config(preset=args.preset, config_file=args.config, overrides=overrides, notices=notices,
                        file_values=stored)


def _train(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
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
    cfg = _load_config(args, extra, notices)
    from .train.loop import train

    result = train(cfg, notices=notices, show_progress=_progress(args), verbosity=_verbosity(args),
                   command=args.argv)
    if result.checkpoint is not None:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}; samples in {result.output_dir / 'samples'}")
    return 0


def parse_temperature(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--temperature must be a number or comma-separated numbers, got {text!r}") from None
    _check_temperatures(values, repr(text[:40]))
    return values[0] if len(values) == 1 else values


def _check_temperatures(values: list[float], shown: str) -> None:
    from .sampling import MAX_TEMPERATURE, temperatures_in_range

    if not temperatures_in_range(values):
        raise UserError(f"--temperature must be between 0 and {MAX_TEMPERATURE:g}, got {shown}")


MAX_INTERPOLATION_STEPS = 1000


def check_seed(seed: int) -> int:
    from .config import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def _sample(args: argparse.Namespace) -> int:
    from .inference import reference_range
    from .sampling import check_prior, write_samples

    if args.num < 1 or args.batch_size < 1:
        raise UserError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    check_seed(args.seed)
    temperature = parse_temperature(args.temperature)
    trained = _open(args)
    model = trained.model
    check_prior(model, args.prior)  # before the output folder is touched
    if isinstance(temperature, list) and len(temperature) != model.decoder.num_levels:
        raise UserError(f"--temperature needs 1 or {model.decoder.num_levels} values (one per resolution level), "
                        f"got {len(temperature)}")
    reference = None
    if args.intensity == "data":
        reference = trained.intensity_reference
        reference_range(reference, str(trained.checkpoint.path))  # a clear error if the checkpoint has none
    num, covariates, conditioned = cli_conditional.sample_conditions(args, trained.checkpoint)
    _claim(args, "sample")
    paths = write_samples(model, args.output_dir, num, temperature, args.seed,
                          voxel_size_mm=trained.voxel_size_mm, batch_size=args.batch_size,
                          device=trained.device, show_progress=_progress(args), intensity_reference=reference,
                          extra_record={**trained.record(), **conditioned}, covariates=covariates, prior=args.prior)
    print(f"wrote {len(paths)} volumes and samples.png to {args.output_dir}")
    return 0


def _open(args: argparse.Namespace):
    from .inference import open_trained

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return open_trained(args.checkpoint, use_ema=not args.raw_weights, device=args.device)


def _claim(args: argparse.Namespace, command: str) -> None:
    from .output_folder import claim_folder

    claim_folder(args.output_dir, command, args.overwrite)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress or args.quiet else None


def _reconstruct(args: argparse.Namespace) -> int:
    from .generate import reconstruct_files
    from .scan_files import input_files

    _check_temperatures([args.temperature], str(args.temperature))
    check_seed(args.seed)
    files = input_files(args.input, args.pattern)
    trained = _open(args)
    covariates = cli_conditional.scan_vectors(args, trained, files)
    _claim(args, "reconstruct")
    record = reconstruct_files(trained, files, args.output_dir, posterior_mean=args.mode == "mean",
                               prior_above=args.prior_above, temperature=args.temperature, seed=args.seed,
                               batch_size=args.batch_size, intensity=args.intensity, show_progress=_progress(args),
                               covariates=covariates)
    for row in record["files"]:
        print(f"{row['reconstruction']}: {row['elbo_bits_per_voxel']:.4f} bits/voxel, PSNR {row['psnr_db']:.2f} dB, "
              f"SSIM {row['ssim']:.4f}, MAE {row['mae']:.4f}")
    print(f"wrote {len(record['files'])} reconstructions (model grid, and *_native.nii.gz in each input's own "
          f"space), reconstructions.png and reconstructions.json to {args.output_dir}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scan_files import input_files
    from .latents import encode_files
    from .output_folder import claim_file

    files = input_files(args.input, args.pattern)
    trained = _open(args)
    cli_conditional.refuse(trained, "encode")
    claim_file(args.output, [Path(args.output).with_suffix(".json")], args.overwrite)
    path = encode_files(trained, files, args.output, batch_size=args.batch_size, show_progress=_progress(args))
    print(f"wrote the latents of {len(files)} volumes ({trained.model.num_layers} layers) to {path} "
          f"(metadata also in {path.with_suffix('.json')})")
    return 0


def _decode(args: argparse.Namespace) -> int:
    from .latents import decode_latents, native_path

    trained = _open(args)
    cli_conditional.refuse(trained, "decode")
    _claim(args, "decode")
    paths = decode_latents(trained, args.latents, args.output_dir, args.batch_size, show_progress=_progress(args))
    native = sum(native_path(p).is_file() for p in paths)
    where = (f", {native} of them also in their encoded scan's own space (*_native.nii.gz)" if native else
             "; the latents file records no scan geometry (an older version wrote it), so they are on the model "
             "grid only")
    print(f"wrote {len(paths)} decoded volumes to {args.output_dir}{where}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from .latents import interpolate

    if not 2 <= args.steps <= MAX_INTERPOLATION_STEPS:
        raise UserError(f"--steps must be between 2 and {MAX_INTERPOLATION_STEPS} (both ends included), got {args.steps}")
    (a,), (b,) = (_single_file(f) for f in (args.a, args.b))
    trained = _open(args)
    cli_conditional.refuse(trained, "interpolate")
    _claim(args, "interpolate")
    paths = interpolate(trained, a, b, args.output_dir, steps=args.steps, method=args.method,
                        batch_size=args.batch_size, intensity=args.intensity, show_progress=_progress(args))
    print(f"wrote {len(paths)} volumes, the two ends in their scans' own space (a_native.nii.gz, b_native.nii.gz), "
          f"interpolation.png and interpolation.json to {args.output_dir}")
    return 0


def _single_file(path: str) -> list:
    from pathlib import Path

    from .scan_files import input_files

    if Path(path).is_dir():
        raise UserError(f"interpolate takes two NIfTI files; {path} is a folder")
    files = input_files(path)
    if len(files) != 1:
        raise UserError(f"interpolate takes two NIfTI files; {path} lists {len(files)}")
    return files


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvaluationOptions, run_evaluation
    from .sampling import check_prior

    for flag in ("num_samples", "max_heldout", "max_train", "num_pairs", "baseline_repeats"):
        if getattr(args, flag) < 1:
            shown = "--num/--num-samples" if flag == "num_samples" else f"--{flag.replace('_', '-')}"
            raise UserError(f"{shown} must be >= 1, got {getattr(args, flag)}")
    check_seed(args.seed)
    options = EvaluationOptions(
        num_samples=args.num_samples, temperature=parse_temperature(args.temperature), seed=args.seed,
        batch_size=args.batch_size, max_heldout=args.max_heldout, max_train=args.max_train,
        num_pairs=args.num_pairs, baseline_repeats=args.baseline_repeats, prior=args.prior, morphometry=args.morphometry,
        feature_plugin=args.feature_plugin, pattern=args.pattern, show_progress=_progress(args), covariates_file=args.covariates,
    )
    trained = _open(args)
    check_prior(trained.model, args.prior)  # before the output folder is touched
    _claim(args, "evaluate")
    report = run_evaluation(trained, args.data, args.output_dir, options)
    print(report.summary())
    return 0


def _config_show(args: argparse.Namespace) -> int:
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
        cfg = _load_config(args, notices=notices)
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
        lines.append(f"{level:5d}  {res:>9}³  {cfg.resolved('channels_top_down')[level]:8d}  "
                     f"{cfg.latent_feature_maps_per_resolution[level]:13d}  {cfg.channels_per_latent[level]:10d}  "
                     f"{cfg.kernel_sizes_bottom_up[level]}/{cfg.kernel_sizes_top_down[level]}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from .train.inspect_run import inspect_run

    print("\n".join(inspect_run(args.run)))
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from .data.phantom import generate_population

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.resolution < 8 or args.resolution & (args.resolution - 1):
        raise UserError(f"--resolution must be a power of two >= 8, got {args.resolution}")
    _claim(args, "phantom")
    paths = generate_population(args.num, args.resolution, args.output_dir, args.seed,
                                progress=False if args.quiet else None)
    print(f"wrote {len(paths)} volumes and participants.tsv to {args.output_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
