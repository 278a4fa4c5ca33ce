"""Command-line interface: argument parsing only; every command calls a library function.

User errors print one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .errors import UserError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"verydeepvae: error: {error}", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_USER_ERROR))
    except OSError as error:  # full disk, read-only or missing folder met while writing outputs
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"verydeepvae: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("verydeepvae: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad arguments already; keep its one-line message."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="verydeepvae", description="Very deep VAEs for 3D brain MRI.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"verydeepvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume) a model")
    _config_options(p)
    p.add_argument("--data", help="folder of NIfTI files (nested folders too) or a text/CSV list of paths; "
                                  "default: the built-in phantom population")
    p.add_argument("--output-dir", help="where checkpoints, figures, TensorBoard events and samples go")
    p.add_argument("--max-steps", type=int, help="number of optimiser steps (overrides total_epochs)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--visualise-pipeline", action="store_true",
                   help="write augmented training examples to <output-dir>/pipeline_test first")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="skip unreadable or unusable NIfTI files (listed in skipped_files.txt) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)

    p = sub.add_parser("sample", help="draw synthetic volumes from a trained model")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or run folder (newest checkpoint)")
    p.add_argument("--num", type=int, default=8, help="number of volumes (default 8)")
    p.add_argument("--temperature", default="1.0",
                   help="prior temperature: one value, or one per resolution level (highest first), comma separated")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--intensity", choices=["model", "data"], default="model",
                   help="model: intensities in [0, 1]; data: mapped to the training data's typical scale")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_sample)

    p = sub.add_parser("config", help="inspect configurations")
    config_sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print the resolved configuration and model size")
    _config_options(show)
    show.add_argument("--json", action="store_true", help="print only the configuration as JSON")
    show.set_defaults(handler=_config_show)
    p.set_defaults(handler=lambda args: (p.print_help(), EXIT_USER_ERROR)[1])

    p = sub.add_parser("phantom", help="write the built-in FLAIR-like phantom brain population")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_phantom)
    return parser


def _config_options(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--preset", choices=PRESETS, help="start from a preset configuration")
    p.add_argument("--config", help="JSON or YAML configuration file (original key names accepted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration value (repeatable), e.g. --set batch_size=2")


def _load_config(args: argparse.Namespace, extra: dict[str, Any] | None = None, notices: list[str] | None = None):
    from .config import build_config, parse_override

    overrides: dict[str, Any] = dict(parse_override(text) for text in args.set)
    overrides.update(extra or {})
    return build_config(preset=args.preset, config_file=args.config, overrides=overrides, notices=notices)


def _train(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    for flag, key in (("data", "data_path"), ("output_dir", "output_dir"), ("max_steps", "max_steps"),
                      ("device", "device"), ("precision", "precision")):
        if getattr(args, flag) is not None:
            extra[key] = getattr(args, flag)
    if args.resume:
        extra["resume"] = True
    if args.visualise_pipeline:
        extra["visualise_training_pipeline_before_starting"] = True
    if args.skip_bad_files:
        extra["skip_bad_files"] = True
    notices: list[str] = []
    cfg = _load_config(args, extra, notices)
    from .train.loop import train

    result = train(cfg, notices=notices, show_progress=False if args.no_progress else None)
    if result.checkpoint is not None:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}; samples in {result.output_dir / 'samples'}")
    return 0


def parse_temperature(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--temperature must be a number or comma-separated numbers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise UserError(f"--temperature must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .generate import load_model, write_samples
    from .train.checkpoint import resolve_checkpoint

    if args.num < 1 or args.batch_size < 1:
        raise UserError("--num and --batch-size must be >= 1")
    temperature = parse_temperature(args.temperature)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was requested but no CUDA GPU is available; use --device cpu")
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint, use_ema=not args.raw_weights, device=device)
    if isinstance(temperature, list) and len(temperature) != model.decoder.num_levels:
        raise UserError(f"--temperature needs 1 or {model.decoder.num_levels} values (one per resolution level), "
                        f"got {len(temperature)}")
    data = checkpoint.meta.get("data", {})
    scale = None
    if args.intensity == "data":
        scale = data.get("intensity_reference", {}).get("high")
        if scale is None:
            raise UserError(f"checkpoint {checkpoint.path} records no intensity scale; use --intensity model")
    paths = write_samples(model, args.output_dir, args.num, temperature, args.seed,
                          voxel_size_mm=float(data.get("voxel_size_mm", 1.0)), batch_size=args.batch_size,
                          device=device, show_progress=not args.no_progress, intensity_scale=scale,
                          extra_record={"checkpoint": str(checkpoint.path), "step": checkpoint.step,
                                        "weights": "raw" if args.raw_weights else "ema"})
    print(f"wrote {len(paths)} volumes and samples.png to {args.output_dir}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    notices: list[str] = []
    cfg = _load_config(args, notices=notices)
    if args.json:
        print(cfg.to_json())
        return 0
    from .model import VeryDeepVAE

    model = VeryDeepVAE(cfg)
    print(cfg.to_json())
    print(model_summary(model, cfg))
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


def _phantom(args: argparse.Namespace) -> int:
    from .data.phantom import generate_population

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.resolution < 8 or args.resolution & (args.resolution - 1):
        raise UserError(f"--resolution must be a power of two >= 8, got {args.resolution}")
    paths = generate_population(args.num, args.resolution, args.output_dir, args.seed)
    print(f"wrote {len(paths)} volumes and participants.tsv to {args.output_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
