"""The command line's shared pieces: the help formatter, and one spelling per option across every
command (``--output``, ``--data``, ``--device``...; the older spellings stay as aliases, shown in
``--help``)."""

from __future__ import annotations

import argparse

from .config import VOXEL_CHOICES


class Formatter(argparse.HelpFormatter):
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


def command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the help formatter of the whole command line."""
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=Formatter)


def device_name(text: str) -> str:
    from .device import check_device_name

    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def output_option(p: argparse.ArgumentParser, text: str, required: bool = True, dest: str = "output_dir") -> None:
    p.add_argument("--output", "--output-dir", dest=dest, required=required, metavar="DIR", help=text)


def data_option(p: argparse.ArgumentParser, text: str, required: bool = False, dest: str = "data") -> None:
    p.add_argument("--data", "--input", dest=dest, required=required, metavar="PATH", help=text)


def device_option(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", type=device_name, default=default, metavar="DEVICE",
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps"
                        + ("" if default else " (default: the configuration's device, auto)"))


def seed_option(p: argparse.ArgumentParser, text: str = "random seed") -> None:
    p.add_argument("--seed", type=int, default=0, help=text)


def voxels_option(p: argparse.ArgumentParser) -> None:
    """--voxels: how a sample's voxels come from p(x | z) (VeryDeepVAE.draws_voxels)."""
    p.add_argument("--voxels", choices=list(VOXEL_CHOICES), default="auto",
                   help="how a sample's voxels come from p(x | z): auto = as the run's sample_voxels setting "
                        "says (draw for the demo preset, else mean); mean = smooth; draw = with the model's texture, "
                        "neighbouring voxels correlated as measured on the training volumes; independent = drawn, "
                        "each voxel on its own")


def progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def verbosity_options(p: argparse.ArgumentParser, verbose: str | None = None) -> None:
    """--quiet, and --verbose where a command has more to say (console.py)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final result")
    if verbose:
        group.add_argument("-v", "--verbose", action="store_true", help=verbose)


def overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output folder (or file) that holds earlier outputs, moving them aside first")


def model_options(p: argparse.ArgumentParser) -> None:
    overwrite_option(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or run folder (newest checkpoint)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--batch-size", type=int, default=4, help="volumes processed at once")
    device_option(p)
    progress_option(p)
    verbosity_options(p)


def config_options(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--preset", choices=PRESETS, help="start from a preset configuration (default: the built-in "
                                                     "defaults, a 32³ model)")
    p.add_argument("--config", help="JSON or YAML configuration file (original key names accepted), or a run folder, "
                                    "its run.json or a checkpoint (the configuration that run trained with)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration value (repeatable), e.g. --set batch_size=2")
