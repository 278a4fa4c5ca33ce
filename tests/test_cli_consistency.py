"""Command-line consistency found by using every command as a new user (issue 14, first items)."""

from __future__ import annotations

import json

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
