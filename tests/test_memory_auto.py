"""checkpoint_levels auto: training picks the least recomputation whose estimated peak fits the
device's memory (train/memory_plan.py), says so in one line, and refuses before any data work
when nothing fits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from verydeepvae import memory
from verydeepvae.cli import main
from verydeepvae.config import Config, build_config
from verydeepvae.errors import ConfigError
from verydeepvae.presets import __file__ as presets_init
from verydeepvae.train import memory_plan, precision
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint
from verydeepvae.train.distributed import Runtime

CPU = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
GiB = 2**30


def _ram(monkeypatch, available: int | None) -> None:
    """Pretend this machine has ``available`` bytes of available RAM (None: unknown)."""
    monkeypatch.setattr(memory_plan, "available_ram",
                        lambda: (available, "available RAM") if available is not None else (None, ""))


def _ram_for(cfg: Config, levels: list[int]) -> int:
    """Available RAM whose planning share just holds ``cfg``'s step with ``levels`` checkpointed."""
    needed = memory_plan.CPU_HEAP_FACTOR * memory.estimate(cfg).peak(cfg.batch_size, levels)
    return int(needed / memory_plan.CPU_RAM_SHARE) + 16


# -- configuration -----------------------------------------------------------------------------------
def test_the_default_is_auto_in_the_config_and_every_preset():
    assert Config().checkpoint_levels == "auto"
    for preset in sorted(p.stem for p in Path(presets_init).parent.glob("*.json")):
        cfg = build_config(preset=preset)
        assert cfg.checkpoint_levels == "auto", preset
        assert cfg.checkpointed_levels() == []  # unresolved: no checkpointing outside training


@pytest.mark.parametrize("value,levels", [("auto", []), ("none", []), ("all", [0, 1, 2, 3, 4]), ([1, 0], [0, 1])])
def test_explicit_values_keep_working(value, levels):
    assert build_config(preset="tiny", overrides={"checkpoint_levels": value}).checkpointed_levels() == levels


def test_a_bad_value_names_auto_among_the_choices():
    with pytest.raises(ConfigError, match='"auto", "none", "all"'):
        build_config(preset="tiny", overrides={"checkpoint_levels": "some"})


# -- the chooser -------------------------------------------------------------------------------------
def test_ample_memory_means_no_checkpointing(monkeypatch):
    _ram(monkeypatch, 64 * GiB)
    notices: list[str] = []
    cfg, plan = memory_plan.resolve(build_config(preset="32"), CPU, notices)
    assert cfg.checkpoint_levels == "none" and plan.levels == [] and plan.auto and plan.within_limit
    assert len(notices) == 1 and notices[0].startswith("memory: estimated peak ")
    assert notices[0].endswith("-> checkpoint_levels none (auto)") and "of available RAM" not in notices[0]


def test_less_memory_checkpoints_the_finest_levels_first(monkeypatch):
    cfg = build_config(preset="32", overrides={"batch_size": 4})
    est = memory.estimate(cfg)
    candidates = memory.checkpoint_candidates(cfg.num_levels)
    picked = []
    for levels in candidates:
        _ram(monkeypatch, _ram_for(cfg, levels))
        chosen = memory_plan.plan(cfg, memory_plan.device_budget(torch.device("cpu")))
        assert chosen.within_limit
        picked.append(chosen.levels)
    # each budget gets its own candidate, unless a coarser level adds nothing (same peak, less recomputation)
    for levels, chosen in zip(candidates, picked):
        assert est.peak(4, chosen) == est.peak(4, levels) and len(chosen) <= len(levels)
    assert picked[0] == [] and picked[1] == [0] and picked[2] == [0, 1]
    assert [len(p) for p in picked] == sorted(len(p) for p in picked)  # never less as the budget shrinks


def test_on_a_cpu_a_level_cheap_to_recompute_is_checkpointed_too(monkeypatch):
    cfg = build_config(preset="128", overrides={"batch_size": 1, "precision": "bf16"})
    est = memory.estimate(cfg)
    _ram(monkeypatch, _ram_for(cfg, [0, 1]))  # levels 0 and 1 are the least that fits
    notices: list[str] = []
    resolved, plan = memory_plan.resolve(cfg, CPU, notices)
    assert plan.levels == [0, 1, 2] and plan.cheap == (2,) and resolved.checkpoint_levels == [0, 1, 2]
    assert notices[0].endswith("-> checkpoint_levels [0, 1, 2] (auto; [2] added because it is cheap to recompute)")
    # why level 2 and not level 3: 4 % more work for 14 % less memory; level 3 saves 2 %
    assert est.recomputation_share(2) <= memory_plan.CHEAP_RECOMPUTATION < est.recomputation_share(1)
    assert est.peak(1, [0, 1, 2]) <= (1 - memory_plan.WORTH_SAVING) * est.peak(1, [0, 1])
    assert est.peak(1, [0, 1, 2, 3]) > (1 - memory_plan.WORTH_SAVING) * est.peak(1, [0, 1, 2])
    # a GPU's memory serves the run alone: the least recomputation that fits
    gpu = dataclasses.replace(memory_plan.device_budget(torch.device("cpu")), spare=False)
    assert memory_plan.plan(cfg, gpu).levels == [0, 1] and memory_plan.plan(cfg, gpu).cheap == ()


def test_beyond_the_planning_share_but_within_ram_takes_every_level_and_says_so(monkeypatch):
    cfg = build_config(preset="32", overrides={"batch_size": 4})
    every = list(range(cfg.num_levels))
    _ram(monkeypatch, int(_ram_for(cfg, every) * 0.7))  # over the share, under the RAM
    notices: list[str] = []
    cfg2, plan = memory_plan.resolve(cfg, CPU, notices)
    assert cfg2.checkpoint_levels == "all" and plan.fits and not plan.within_limit
    assert "beyond the" in notices[0] and "within the" in notices[0] and "(auto)" in notices[0]


def test_unknown_memory_assumes_it_fits_and_says_so(monkeypatch):
    monkeypatch.setattr(memory_plan, "_meminfo", lambda path="/proc/meminfo": {})
    monkeypatch.setattr(memory_plan, "cgroup_memory_limit", lambda *a, **k: None)
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # import psutil fails
    notices: list[str] = []
    cfg, plan = memory_plan.resolve(build_config(preset="tiny"), CPU, notices)
    assert cfg.checkpoint_levels == "none" and plan.fits is None
    assert "the available RAM is unknown: assumed to fit" in notices[0]


def test_an_explicit_setting_is_honoured_with_a_notice_when_it_will_not_fit(monkeypatch):
    cfg = build_config(preset="32", overrides={"batch_size": 4, "checkpoint_levels": "none"})
    _ram(monkeypatch, _ram_for(cfg, [0, 1]))
    notices: list[str] = []
    resolved, plan = memory_plan.resolve(cfg, CPU, notices)
    assert resolved.checkpoint_levels == "none" and plan.levels == [] and not plan.auto and plan.fits is False
    assert len(notices) == 1 and "checkpoint_levels none (configured)" in notices[0]
    assert "may run out of memory" in notices[0] and "checkpoint_levels auto would pick" in notices[0]
    quiet: list[str] = []  # one that fits: nothing to say
    memory_plan.resolve(dataclasses.replace(cfg, checkpoint_levels="all"), CPU, quiet)
    assert quiet == []


def test_cpu_ranks_on_one_machine_share_its_ram(monkeypatch):
    _ram(monkeypatch, 12 * GiB)
    one, four = memory_plan.device_budget(torch.device("cpu")), memory_plan.device_budget(torch.device("cpu"), 4)
    assert four.hard == one.hard // 4 and "shared by 4 processes" in four.source


def test_every_rank_plans_with_the_smallest_budget(monkeypatch):
    """Ranks measure their own memory; the all-reduced minimum makes every rank choose the same."""
    from verydeepvae.train import distributed

    other_rank = torch.tensor([-1.0 * GiB, -2.0 * GiB], dtype=torch.float64)
    monkeypatch.setattr(distributed, "all_reduce_max", lambda values, runtime: torch.maximum(values, other_rank))
    runtime = dataclasses.replace(CPU, world_size=2)
    budget = memory_plan.Budget(8 * GiB, 16 * GiB, 1.0, "mine", "mine")
    smallest = memory_plan.smallest_over_ranks(budget, runtime)
    assert (smallest.limit, smallest.hard) == (GiB, 2 * GiB) and "smallest" in smallest.source
    monkeypatch.setattr(distributed, "all_reduce_max", lambda values, runtime: values)  # mine is the smallest
    assert memory_plan.smallest_over_ranks(budget, runtime) is budget


def test_a_cuda_budget_is_the_free_memory_less_a_reserve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GiB, 24 * GiB))
    budget = memory_plan.device_budget(torch.device("cuda", 0))
    reserve = int(memory_plan.CUDA_RESERVE_FRACTION * 24 * GiB)
    assert budget.limit == budget.hard == 20 * GiB - reserve and budget.factor == 1.0
    assert budget.source == "20.00 GiB free less a 10% reserve on cuda:0"
    assert budget.hard_source == "free memory on cuda:0 (20.00 GiB free less a 10% reserve)"


# -- where the numbers come from ----------------------------------------------------------------------
def test_meminfo_is_read_in_bytes(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       24683584 kB\nMemAvailable:   23931276 kB\nHugePages_Total:       0\n")
    info = memory_plan._meminfo(str(path))
    assert info["MemAvailable"] == 23931276 * 1024 and info["HugePages_Total"] == 0
    assert memory_plan._meminfo(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_memory_limit_on_the_process_or_a_parent_is_found(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/job/step\n")
        (tmp_path / "fs" / "job" / "step").mkdir(parents=True)
        (tmp_path / "fs" / "job" / "step" / "memory.max").write_text("max\n")
        (tmp_path / "fs" / "job" / "memory.max").write_text(f"{8 * GiB}\n")
    else:
        proc.write_text("5:cpu,cpuacct:/x\n4:memory:/job\n")
        (tmp_path / "fs" / "memory" / "job").mkdir(parents=True)
        (tmp_path / "fs" / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{8 * GiB}\n")
        (tmp_path / "fs" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_plan.cgroup_memory_limit(str(proc), str(tmp_path / "fs")) == 8 * GiB
    proc.write_text("0::/\n")
    assert memory_plan.cgroup_memory_limit(str(proc), str(tmp_path / "nothing")) is None


# -- messages ------------------------------------------------------------------------------------------
def test_out_of_memory_advice_uses_the_runs_budget():
    cfg = build_config(preset="128", overrides={"checkpoint_levels": [0, 1]})
    budget = memory_plan.Budget(8 * GiB, 16 * GiB, memory_plan.CPU_HEAP_FACTOR, "50% of 16 GiB", "available RAM")
    line = precision.out_of_memory_message(cfg, torch.device("cpu"), 9, "step_00000008.safetensors", budget)
    assert "checkpoint_levels [0, 1]" in line and "of the 16.00 GiB of available RAM" in line
    assert "with checkpoint_levels all" in line and "with precision bf16 too" in line and "\n" not in line


def test_config_show_marks_what_auto_would_pick(monkeypatch, capsys):
    _ram(monkeypatch, 64 * GiB)
    assert main(["config", "show", "--preset", "tiny", "--estimate-memory"]) == 0
    out = capsys.readouterr().out
    assert "no checkpointing (auto)" in out and "auto on this machine (cpu)" in out
    assert main(["config", "show", "--preset", "128", "--estimate-memory", "--gpu-memory", "12GiB",
                 "--set", "precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_levels [0] (auto)" in out and "auto on a GPU with this much free memory" in out
    _ram(monkeypatch, GiB)
    assert main(["config", "show", "--preset", "128", "--estimate-memory"]) == 0
    assert "training would stop" in capsys.readouterr().out


# -- training -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import write_ellipsoids

    folder = tmp_path_factory.mktemp("memory_auto") / "data"
    write_ellipsoids(folder, 6, size=16)
    return folder


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--precision", "fp32", "--no-progress", "--set", "subjects_to_plot=0", "--set", "num_workers=0",
                 "--set", "quality_samples=0", *extra])


def test_nothing_fits_is_one_line_with_advice_and_exit_2_before_any_data_work(data, tmp_path, monkeypatch, capsys):
    _ram(monkeypatch, 8 * 2**20)  # 8 MiB: not even the tiny model at batch size 1
    out = tmp_path / "run"
    assert _train(data, out) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err + captured.out
    assert err[0].startswith("verydeepvae: error: memory: training needs an estimated peak")
    assert "even with checkpoint_levels all" in err[0] and "batch_size" in err[0]
    assert not (out / "split.json").exists() and not (out / "cache").exists() and not (out / "checkpoints").exists()


def test_nothing_fits_from_the_command_line_exits_2_with_one_line(tmp_path):
    """A real process: a batch of ten million tiny volumes (tens of TiB) fits no machine."""
    import os
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "verydeepvae", "train", "--preset", "tiny", "--output-dir",
                             str(tmp_path / "run"), "--set", "batch_size=10000000", "--precision", "fp32", "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr and "even with checkpoint_levels all" in err[0]
    assert "the estimate fits batch_size" in err[0] and "with precision bf16 too" in err[0]


def test_nothing_fits_names_the_largest_batch_that_does(data, tmp_path, monkeypatch, capsys):
    cfg = build_config(preset="tiny", overrides={"batch_size": 8, "precision": "fp32"})
    every = list(range(cfg.num_levels))
    # room for three samples with every level checkpointed, not for eight
    _ram(monkeypatch, int(memory_plan.CPU_HEAP_FACTOR * memory.estimate(cfg).peak(3, every)) + 16)
    assert _train(data, tmp_path / "run", "--set", "batch_size=8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the estimate fits batch_size 3 with checkpoint_levels all" in err[0]
    assert "--set batch_size=N" in err[0]


def test_a_training_run_prints_its_choice_uses_it_and_records_it(data, tmp_path, monkeypatch, capsys):
    from verydeepvae.train import builder

    cfg = build_config(preset="tiny", overrides={"precision": "fp32"})
    _ram(monkeypatch, _ram_for(cfg, [0]))  # level 0 checkpointed just fits
    built = []
    original = builder.build_model_with_shared_weights
    monkeypatch.setattr(builder, "build_model_with_shared_weights",
                        lambda *args: built.append(original(*args)) or built[-1])
    out = tmp_path / "run"
    assert _train(data, out) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "memory:" in line]
    assert len(printed) == 1 and printed[0].strip().startswith("notice: memory: estimated peak")
    assert printed[0].endswith("-> checkpoint_levels [0] (auto)")
    model = built[0]
    assert all(block.checkpointed for block in model.encoder.levels[0])
    assert not any(block.checkpointed for level in model.encoder.levels[1:] for block in level)
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint.config.checkpointed_levels() == [0]  # the resolved choice, a valid configuration
    meta = checkpoint.meta
    assert meta["config"]["checkpoint_levels"] == [0]
    assert meta["memory"]["auto"] is True and meta["memory"]["checkpoint_levels"] == [0]
    assert meta["memory"]["available_bytes"] == _ram_for(cfg, [0])
    json.dumps(meta["memory"])


def test_a_checkpoint_that_says_none_still_loads_and_resumes_under_auto(data, tmp_path, monkeypatch, capsys):
    _ram(monkeypatch, 64 * GiB)
    out = tmp_path / "run"
    assert _train(data, out, "--set", "checkpoint_levels=none") == 0
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert load_checkpoint(newest).config.checkpoint_levels == "none"
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(out), "--max-steps", "3",
                 "--resume", "--no-progress", "--set", "subjects_to_plot=0", "--set", "num_workers=0",
                 "--set", "quality_samples=0"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "-> checkpoint_levels none (auto)" in printed
    assert "--resume: checkpoint_levels" not in printed  # a performance mode: honoured silently
    assert list_checkpoints(out / "checkpoints")[-1].name == "step_00000003.safetensors"
