"""Command-line interface: argument parsing only; every command calls a library function.

User errors print one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Iterator, Sequence

from . import cli_conditional, commands
from .cli_options import (Formatter, command, config_options, data_option, device_option, model_options,
                          output_option, overwrite_option, progress_option, seed_option, verbosity_options,
                          voxels_option)
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
        if not _out_of_memory(error):
            raise
        print(f"verydeepvae: error: out of memory ({str(error).splitlines()[0] if str(error) else 'no details'}); "
              "try a smaller --batch-size, or --device cpu", file=sys.stderr)
        return EXIT_USER_ERROR


def _out_of_memory(error: Exception) -> bool:
    """torch's OutOfMemoryError (torch is loaded by then if it was raised; never imported here)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verydeepvae", description="Very deep VAEs for 3D brain MRI.",
                                     formatter_class=Formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"verydeepvae {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _train_command(sub)
    _sample_command(sub)
    _reconstruct_command(sub)
    _latent_commands(sub)
    _evaluate_command(sub)
    cli_conditional.add_counterfactual_command(sub)
    cli_conditional.add_calibrate_command(sub)
    _config_command(sub)
    _inspect_and_phantom_commands(sub)
    return parser


def _train_command(sub) -> None:
    """train: the configuration, where the data and outputs are, and how to run."""
    p = command(sub, "train", "train (or resume) a model")
    config_options(p)
    data_option(p, "folder of NIfTI files (nested folders too) or a text/CSV list of paths; "
                    "default: the built-in phantom population")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only), e.g. '*FLAIR*' "
                                     "(default: every .nii and .nii.gz; sets nifti_filename_pattern)")
    output_option(p, "where checkpoints, figures, TensorBoard events and samples go "
                      "(default: the configuration's output_dir, runs/default)", required=False)
    p.add_argument("--max-steps", type=int, help="number of optimiser steps (default: from total_epochs)")
    p.add_argument("--batch-size", type=int, help="volumes per step and process (default: the configuration's)")
    p.add_argument("--seed", type=int, help="random seed of the split, the initial weights and the data order "
                                            "(default: the configuration's, 0)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output folder that holds another run, moving that run aside")
    device_option(p, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"],
                   help="arithmetic of the training step: fp16 needs a CUDA GPU, auto = bf16 where it is native, "
                        "fp16 on CUDA 7.x, else fp32 (default: the configuration's, auto)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU algorithms (slower) and a fixed CPU thread count: a resumed run repeats an "
                        "uninterrupted one bitwise")
    p.add_argument("--visualise-pipeline", action="store_true",
                   help="write augmented training examples to <output>/pipeline_test first")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip unreadable or unusable NIfTI files (listed in skipped_files.txt) instead of stopping")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line every log_every steps (as when the output is not a terminal)")
    verbosity_options(p, verbose="also a line for every checkpoint and figure written, and the run's versions, "
                                  "host and git commit at start")
    cli_conditional.add_train_options(p)
    p.set_defaults(handler=commands.train_command)


def _sample_command(sub) -> None:
    """sample: draw volumes from a trained model."""
    p = command(sub, "sample", "draw synthetic volumes from a trained model")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or run folder (newest checkpoint)")
    p.add_argument("--num", type=int, default=8, help="number of volumes")
    p.add_argument("--temperature", default="1.0",
                   help="prior temperature: one value, or one per resolution level (highest first), comma separated")
    p.add_argument("--prior", choices=["auto", "learned", "fitted"], default="auto",
                   help="which prior draws the coarsest latents: auto = the Gaussian fitted at the end of "
                        "training when the run chose it (model/fitted_prior.py), else the learned one")
    voxels_option(p)
    output_option(p, "folder for the volumes, samples.png and samples.json")
    seed_option(p)
    p.add_argument("--batch-size", type=int, default=4, help="volumes generated at once")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    overwrite_option(p)
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: intensities in [0, 1]; data: mapped to the training data's typical scale")
    device_option(p)
    progress_option(p)
    verbosity_options(p)
    cli_conditional.add_sample_options(p)
    p.set_defaults(handler=commands.sample_command)


def _config_command(sub) -> None:
    """config show: the resolved configuration, model size and memory estimate."""
    p = command(sub, "config", "inspect configurations")
    config_sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = command(config_sub, "show", "print the resolved configuration and model size")
    config_options(show)
    show.add_argument("--json", action="store_true", help="print only the configuration as JSON")
    show.add_argument("--estimate-memory", action="store_true",
                      help="estimate training memory per sample, with and without activation checkpointing")
    show.add_argument("--gpu-memory", metavar="SIZE",
                      help="with --estimate-memory: the largest batch size fitting this memory, e.g. 24GiB")
    show.add_argument("--checkpoint", help="show a trained model's configuration (a checkpoint file or run folder) "
                                           "and, for a conditional model, its covariates")
    show.set_defaults(handler=commands.config_show_command)
    config_parser = p  # bound now: ``p`` is reassigned below, and a lambda would see the last one
    p.set_defaults(handler=lambda args: (config_parser.print_help(), EXIT_USER_ERROR)[1])


def _inspect_and_phantom_commands(sub) -> None:
    """inspect a run folder; write the phantom population."""
    p = command(sub, "inspect", "one screen about a run: training now?, steps, checkpoints, last figures")
    p.add_argument("run", help="a run folder (the --output of train); read only, safe while it trains")
    p.set_defaults(handler=commands.inspect_command)

    p = command(sub, "phantom", "write the built-in FLAIR-like phantom brain population")
    p.add_argument("--num", type=int, default=100, help="number of subjects")
    p.add_argument("--resolution", type=int, default=64, help="volumes are RESOLUTION³ voxels (a power of two)")
    output_option(p, "folder for the volumes and participants.tsv")
    seed_option(p, "random seed of the population")
    overwrite_option(p)
    verbosity_options(p)
    p.set_defaults(handler=commands.phantom_command)


_NATIVE = "; each also resampled into its input scan's own space (*_native.nii.gz)"


def _reconstruct_command(sub) -> None:
    """reconstruct: input scans through the model, with their measurements."""
    p = command(sub, "reconstruct", "reconstruct NIfTI volumes; per-file bits/voxel, PSNR, SSIM, MAE")
    model_options(p)
    data_option(p, "a NIfTI file, a folder of them or a text/CSV list of paths", required=True, dest="input")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only), e.g. '*FLAIR*'")
    output_option(p, "folder for the reconstructions, reconstructions.png and reconstructions.json" + _NATIVE)
    p.add_argument("--mode", choices=["mean", "sample"], default="mean",
                   help="latents: posterior mean at every layer or a posterior sample")
    p.add_argument("--prior-above", type=int, metavar="RES",
                   help="take the latents at resolutions finer than RES³ from the prior (progressive "
                        "reconstruction; default: every latent from the posterior)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="prior temperature for the latents taken from the prior (0: prior means)")
    seed_option(p)
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: [0, 1]; data: mapped back to each input file's own intensity scale")
    cli_conditional.add_scan_options(p)
    p.set_defaults(handler=commands.reconstruct_command)


def _latent_commands(sub) -> None:
    """encode, decode, interpolate: the latent codes of input scans."""
    p = command(sub, "encode", "write the posterior-mean latents of NIfTI volumes to a .safetensors file")
    model_options(p)
    data_option(p, "a NIfTI file, a folder of them or a text/CSV list of paths", required=True, dest="input")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only)")
    p.add_argument("--output", "--output-dir", dest="output", required=True, metavar="FILE",
                   help="latents file to write (.safetensors; metadata, including each input's scan space, "
                        "also as .json)")
    p.set_defaults(handler=commands.encode_command)

    p = command(sub, "decode", "decode a latents file written by encode back to NIfTI volumes")
    model_options(p)
    p.add_argument("--latents", required=True, help="a .safetensors file written by verydeepvae encode")
    output_option(p, "folder for the decoded volumes; each also in its encoded scan's own space "
                      "(*_native.nii.gz) when the latents file records it")
    p.set_defaults(handler=commands.decode_command)

    p = command(sub, "interpolate", "volumes between two inputs, interpolating every latent layer")
    model_options(p)
    p.add_argument("a", help="first NIfTI file")
    p.add_argument("b", help="second NIfTI file")
    p.add_argument("--steps", type=int, default=8, help="number of volumes written, both ends included")
    p.add_argument("--method", choices=["slerp", "linear"], default="slerp",
                   help="spherical or linear interpolation of each latent layer")
    output_option(p, "folder for interp_XX.nii.gz, interpolation.png and interpolation.json; the two ends "
                      "also in their input scan's own space (a_native.nii.gz, b_native.nii.gz)")
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: [0, 1]; data: mapped back to the inputs' intensity scales (interpolated)")
    p.set_defaults(handler=commands.interpolate_command)


def _evaluate_command(sub) -> None:
    """evaluate: the evaluation report on held-out data."""
    p = command(sub, "evaluate", "evaluation report (JSON + Markdown + figures) on held-out data")
    model_options(p)
    data_option(p, "folder / list of NIfTI files to evaluate on; default: the run's own split "
                    "(split.json validation files are held out)")
    p.add_argument("--pattern", help="only files whose path matches this glob (folders only)")
    output_option(p, "where report.json, report.md and figures/ go")
    p.add_argument("--num", "--num-samples", dest="num_samples", type=int, default=32, help="prior samples to draw")
    p.add_argument("--temperature", default="1.0", help="sampling temperature: one value or one per level")
    p.add_argument("--prior", choices=["auto", "learned", "fitted"], default="auto",
                   help="which prior draws the coarsest latents: auto = the Gaussian fitted at the end of "
                        "training when the run chose it (model/fitted_prior.py), else the learned one")
    voxels_option(p)
    cli_conditional.add_guidance_option(p, "the requested covariate's effect W times in the conditional section")
    seed_option(p)
    p.add_argument("--max-heldout", type=int, default=100, help="at most this many held-out volumes")
    p.add_argument("--max-train", type=int, default=1000,
                   help="at most this many training volumes for the memorisation check")
    p.add_argument("--num-pairs", type=int, default=100, help="MS-SSIM pairs for diversity")
    p.add_argument("--baseline-repeats", type=int, default=50,
                   help="random real half splits each real-vs-real baseline is averaged over")
    p.add_argument("--set-size", type=int, default=None,
                   help="volumes per set in the sample-vs-real and real-vs-real distances and tissue W1s "
                        "(default: half the held-out volumes); e.g. 24 with 96 held-out volumes and --num 96 "
                        "reads the ratios 48 held-out volumes give, with less noise")
    p.add_argument("--morphometry", choices=["auto", "on", "off"], default="auto",
                   help="tissue volumes (FLAIR-like contrast): auto = when participants.tsv (phantom) is found")
    p.add_argument("--feature-plugin", metavar="MODULE:CALLABLE",
                   help="optional extra feature extractor you supply (e.g. a MedicalNet wrapper with local weights)")
    p.add_argument("--covariates", metavar="FILE",
                   help="a conditional model: TSV/CSV of the held-out scans' covariates (default: the run's "
                        "covariates.json, or a participants.tsv next to the scans)")
    p.set_defaults(handler=commands.evaluate_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
