"""Command-line consistency found by using every command as a new user (issue 14, first items)."""

from __future__ import annotations

import json

import pytest

from verydeepvae.cli import main


def test_config_without_a_subcommand_prints_the_config_usage(capsys):
    assert main(["config"]) == 2
    out = capsys.readouterr().out
    assert "usage: verydeepvae config" in out and "show" in out and "phantom" not in out


def test_train_takes_seed_and_logs_a_real_throughput_without_a_progress_bar(tmp_path):
    from conftest import write_ellipsoids

    write_ellipsoids(tmp_path / "data", 8, size=16)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--output-dir", str(out),
                 "--max-steps", "4", "--seed", "7", "--no-progress", "--set", "log_every=2",
                 "--set", "subjects_to_plot=0", "--set", "num_workers=0"]) == 0
    assert json.loads((out / "split.json").read_text())["seed"] == 7
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["voxels_per_second"] > 0 for r in train)


# --- one spelling per idea, the old ones kept -----------------------------------------------------


def _subparsers(parser, prefix=()):
    """(command path, parser) for every command and subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from verydeepvae.cli import build_parser

    commands = list(_subparsers(build_parser()))
    assert {c for c, _ in commands} >= {("train",), ("sample",), ("reconstruct",), ("encode",), ("decode",),
                                        ("interpolate",), ("evaluate",), ("phantom",), ("config",),
                                        ("config", "show")}
    for command, parser in commands:
        text = parser.format_help()
        assert parser.description, command
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings or action.dest)
            shown = " ".join(text.split())  # argparse wraps lines
            if action.default is None or isinstance(action.default, (bool, list)):
                continue
            assert f"(default: {action.default})" in shown, (command, action.option_strings)
        for option in ("--output", "--data", "--device"):
            if any(option in a.option_strings for a in parser._actions):
                assert option in text


NEW_AND_OLD = [
    (["sample", "--checkpoint", "r", "--output", "o"], ["sample", "--checkpoint", "r", "--output-dir", "o"]),
    (["phantom", "--output", "o"], ["phantom", "--output-dir", "o"]),
    (["train", "--data", "d", "--output", "o"], ["train", "--input", "d", "--output-dir", "o"]),
    (["reconstruct", "--checkpoint", "r", "--data", "d", "--output", "o"],
     ["reconstruct", "--checkpoint", "r", "--input", "d", "--output-dir", "o"]),
    (["encode", "--checkpoint", "r", "--data", "d", "--output", "z.safetensors"],
     ["encode", "--checkpoint", "r", "--input", "d", "--output", "z.safetensors"]),
    (["decode", "--checkpoint", "r", "--latents", "z", "--output", "o"],
     ["decode", "--checkpoint", "r", "--latents", "z", "--output-dir", "o"]),
    (["interpolate", "a", "b", "--checkpoint", "r", "--output", "o"],
     ["interpolate", "a", "b", "--checkpoint", "r", "--output-dir", "o"]),
    (["evaluate", "--checkpoint", "r", "--data", "d", "--output", "o", "--num", "5"],
     ["evaluate", "--checkpoint", "r", "--input", "d", "--output-dir", "o", "--num-samples", "5"]),
]


@pytest.mark.parametrize("new,old", NEW_AND_OLD, ids=[n[0] for n, _ in NEW_AND_OLD])
def test_the_chosen_spelling_and_the_old_one_mean_the_same(new, old):
    from verydeepvae.cli import build_parser

    parsed_new, parsed_old = build_parser().parse_args(new), build_parser().parse_args(old)
    assert vars(parsed_new) == vars(parsed_old)


def test_sample_and_phantom_run_with_either_spelling(tmp_path, capsys):
    assert main(["phantom", "--num", "1", "--resolution", "16", "--output", str(tmp_path / "new")]) == 0
    assert main(["phantom", "--num", "1", "--resolution", "16", "--output-dir", str(tmp_path / "old")]) == 0
    new, old = sorted(p.name for p in (tmp_path / "new").iterdir()), sorted(p.name for p in (tmp_path / "old").iterdir())
    assert new == old and any(name.endswith(".nii.gz") for name in new)


def test_train_takes_the_options_the_other_commands_have():
    from verydeepvae.cli import build_parser

    args = build_parser().parse_args(["train", "--pattern", "*FLAIR*", "--batch-size", "3", "--device", "cuda:1"])
    assert (args.pattern, args.batch_size, args.device) == ("*FLAIR*", 3, "cuda:1")


# --- devices: one resolver --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "mps"])
def test_device_names_are_accepted_by_every_command(name):
    from verydeepvae.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sample", "--checkpoint", "r", "--output", "o", "--device", name]).device == name
    assert parser.parse_args(["train", "--device", name]).device == name
    assert parser.parse_args(["evaluate", "--checkpoint", "r", "--output", "o", "--device", name]).device == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:01"])
def test_a_misspelt_device_is_one_usage_error(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", "r", "--output", "o", "--device", name])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cuda:N" in err.strip().splitlines()[-1]


def test_cuda_n_is_checked_against_the_visible_devices(monkeypatch):
    import torch

    from verydeepvae.device import resolve_device
    from verydeepvae.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1, local_world_size=2) == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"device cuda:2 does not exist: 2 CUDA device\(s\) are visible, "
                                        r"cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(UserError, match="names one GPU, but 2 processes"):
        resolve_device("cuda:1", local_rank=0, local_world_size=2)


def test_cuda_without_a_gpu_and_mps_without_mps_are_one_line_exit_2(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, fragment in (("cuda:1", "device cuda:1 was requested but no CUDA GPU is available"),
                           ("mps", "device mps was requested but")):
        code = main(["sample", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--device", name])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "o").exists()


def test_training_and_generation_share_the_resolver():
    from verydeepvae import device, inference
    from verydeepvae.train import distributed

    assert inference.resolve_device is device.resolve_device
    assert distributed.resolve_device is device.resolve_device


def test_a_configured_device_is_checked_when_the_configuration_is_built():
    from verydeepvae.config import build_config
    from verydeepvae.errors import ConfigError

    assert build_config(preset="tiny", overrides={"device": "cuda:3"}).device == "cuda:3"
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N"):
        build_config(preset="tiny", overrides={"device": "gpu0"})


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``verydeepvae ...`` command in a code block of the README and docs/ (continuation lines
    joined; usage synopses with [optional] or a|b parts are left out)."""
    import re
    import shlex
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    found = []
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:sh|console|bash)?\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip().removeprefix("$ ")
                if "verydeepvae " not in line or "[" in line or "|" in line:
                    continue
                words = shlex.split(line)
                if words[0] != "verydeepvae":
                    words = words[words.index("verydeepvae"):] if "-m" in words else []
                if words and words[0] == "verydeepvae":
                    found.append((f"{doc.name}: {line}", words[1:]))
    return found


def test_every_documented_command_parses():
    from verydeepvae.cli import build_parser

    commands = _documented_commands()
    assert len(commands) > 20
    for where, words in commands:
        try:
            build_parser().parse_args(words)
        except SystemExit as error:
            raise AssertionError(f"{where} does not parse") from error
