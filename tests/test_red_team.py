"""Hostile and careless inputs from the red-team pass of issue 13, each reproduced: one line, exit
status 2 (or the signal's status), nothing outside the output folder touched, nothing mixed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from verydeepvae.cli import main
from verydeepvae.config import build_config
from verydeepvae.data import discover
from verydeepvae.errors import ConfigError, DataError, Interrupted


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("redteam")
    write_ellipsoids(root / "data", 8, size=16)
    out = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(root / "data"), "--output-dir", str(out),
                 "--max-steps", "2", "--no-progress", "--set", "checkpoint_every=2", "--set", "subjects_to_plot=0",
                 "--set", "num_workers=0"]) == 0
    return out


def _data(run: Path) -> Path:
    return run.parent / "data"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


# -- names from files are data, never paths ----------------------------------------------------------
def test_decode_never_writes_outside_its_output_folder(run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    latents = tmp_path / "z.safetensors"
    listing = tmp_path / "three.txt"
    listing.write_text("\n".join(str(f) for f in sorted(_data(run).glob("*.nii.gz"))[:3]))
    assert main(["encode", "--input", str(listing), "--checkpoint", str(run), "--output", str(latents),
                 "--no-progress"]) == 0
    with safe_open(str(latents), framework="pt") as handle:
        meta = json.loads(handle.metadata()["verydeepvae"])
    meta["names"] = ["../../escaped", str(tmp_path / "abs" / "escaped"), ".."]
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(str(latents)), str(hostile), metadata={"verydeepvae": json.dumps(meta)})
    out = tmp_path / "out" / "decoded"
    assert main(["decode", "--latents", str(hostile), "--checkpoint", str(run), "--output-dir", str(out),
                 "--no-progress"]) == 0
    written = sorted(p.name for p in out.iterdir())
    stems = ["escaped_2_decoded", "escaped_decoded", "volume_0003_decoded"]
    assert written == sorted([f"{s}.nii.gz" for s in stems] + [f"{s}_native.nii.gz" for s in stems])
    assert all(p.parent == out for p in tmp_path.rglob("*_decoded*.nii.gz")) and not (tmp_path / "abs").exists()
    del meta["names"]  # latents without names: numbered volumes, no traceback
    save_file(load_file(str(latents)), str(hostile), metadata={"verydeepvae": json.dumps(meta)})
    assert main(["decode", "--latents", str(hostile), "--checkpoint", str(run), "--output-dir", str(tmp_path / "d2"),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "d2").iterdir())[0] == "volume_0001_decoded.nii.gz"


def test_reconstruct_outputs_of_colliding_names_are_all_kept(run, tmp_path, capsys):
    source = sorted(_data(run).glob("*.nii.gz"))[0]
    for folder, name in (("a", "sub"), ("b", "sub"), ("c", "sub_2")):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / f"{name}.nii.gz")
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(str(tmp_path / f / f"{n}.nii.gz") for f, n in (("a", "sub"), ("b", "sub"), ("c", "sub_2"))))
    out = tmp_path / "rec"
    assert main(["reconstruct", "--input", str(inputs), "--checkpoint", str(run), "--output-dir", str(out), "--no-progress"]) == 0
    assert len(list(out.glob("*_recon.nii.gz"))) == 3 and len(list(out.glob("*_input.nii.gz"))) == 3


# -- never two invocations in one output folder -------------------------------------------------------
def test_a_second_sample_into_the_same_folder_is_refused_or_moves_the_first_aside(run, tmp_path, capsys):
    out = tmp_path / "samples"
    common = ["sample", "--checkpoint", str(run), "--output-dir", str(out), "--no-progress"]
    assert main([*common, "--num", "6"]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main([*common, "--num", "2", "--seed", "1"]) == 2
    assert "already holds files" in _error_line(capsys) and sorted(p.name for p in out.iterdir()) == before
    assert main([*common, "--num", "2", "--seed", "1", "--overwrite"]) == 0
    assert len(list(out.glob("sample_*.nii.gz"))) == 2
    assert json.loads((out / "samples.json").read_text())["files"] == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("samples.replaced-")]
    assert len(aside) == 1 and len(list(aside[0].glob("sample_*.nii.gz"))) == 6


def test_encode_never_replaces_a_runs_split_file(run, capsys):
    split = (run / "split.json").read_text()
    files = sorted(_data(run).glob("*.nii.gz"))[:1]
    assert main(["encode", "--input", str(files[0]), "--checkpoint", str(run), "--output", str(run / "split.safetensors"),
                 "--no-progress"]) == 2
    assert "split.json already exists" in _error_line(capsys) and (run / "split.json").read_text() == split
    assert not (run / "split.safetensors").exists()


# -- discovery: symlink loops, copies, our own outputs -----------------------------------------------------
def test_a_symlink_loop_and_copies_do_not_multiply_or_leak_scans(tmp_path):
    from conftest import write_ellipsoids

    data = tmp_path / "data"
    files = write_ellipsoids(data, 4, size=16)
    (data / "sub").mkdir()
    os.symlink("..", data / "sub" / "loop")
    for i in range(2):  # two copies of the first scan under other names
        shutil.copy(files[0], data / "sub" / f"copy{i}.nii.gz")
    found = discover.discover_files(data)
    assert len(found) == 6  # 4 scans + 2 copies, each real file once, the loop not followed
    notices: list[str] = []
    for seed in range(6):
        train, val = discover.split_keeping_copies_together(found, 0.5, seed, notices)
        copies = {str(files[0]), str(data / "sub" / "copy0.nii.gz"), str(data / "sub" / "copy1.nii.gz")}
        assert copies <= set(train) or copies <= set(val)
        assert sorted(train + val) == sorted(map(str, found))
    assert "2 input file(s) have the same content as another" in notices[0]


def test_without_copies_the_split_is_the_one_it_always_was(tmp_path):
    names = [tmp_path / f"s{i}.nii" for i in range(10)]
    for i, n in enumerate(names):
        n.write_bytes(bytes([i]) * (100 + i))
    assert discover.split_keeping_copies_together(names, 0.8, 3) == discover.split_files(names, 0.8, 3)


def test_an_output_folder_inside_the_data_is_not_trained_on(tmp_path, capsys):
    from conftest import write_ellipsoids

    data = tmp_path / "data"
    write_ellipsoids(data, 6, size=16)
    out = data / "runs" / "first"
    common = ["--preset", "tiny", "--data", str(data), "--no-progress", "--max-steps", "2", "--set",
              "checkpoint_every=2", "--set", "subjects_to_plot=0", "--set", "num_workers=0"]
    assert main(["train", *common, "--output-dir", str(out)]) == 0  # writes out/samples/*.nii.gz
    assert list((out / "samples").glob("*.nii.gz"))
    capsys.readouterr()
    assert main(["train", *common, "--output-dir", str(tmp_path / "second")]) == 0
    split = json.loads((tmp_path / "second" / "split.json").read_text())
    assert len(split["train"]) + len(split["validation"]) == 6
    assert "not searched for training data" in capsys.readouterr().out


# -- resume refusals -----------------------------------------------------------------------------------------
def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _resume(run: Path) -> int:
    return main(["train", "--preset", "tiny", "--data", str(_data_of(run)), "--output-dir", str(run), "--resume",
                 "--no-progress", "--max-steps", "3", "--set", "subjects_to_plot=0", "--set", "num_workers=0"])


def _data_of(run: Path) -> Path:
    return Path(json.loads((run / "split.json").read_text())["data_source"]) if (run / "split.json").exists() else run


def test_resume_when_no_checkpoint_loads_is_an_error_not_a_restart(run, tmp_path, capsys):
    copy = _copy_run(run, tmp_path)
    (copy / "checkpoints" / "step_00000002.safetensors.sha256").write_text("0" * 64 + "\n")
    before = sorted(p.name for p in copy.rglob("*"))
    assert _resume(copy) == 2
    line = _error_line(capsys)
    assert "no checkpoint in" in line and "can be loaded" in line and "SHA-256" in line
    assert sorted(p.name for p in copy.rglob("*") if p.name != ".lock") == [n for n in before if n != ".lock"]


def test_a_newest_checkpoint_with_unreadable_metadata_falls_back_to_the_previous_one(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    copy = _copy_run(run, tmp_path)
    good = copy / "checkpoints" / "step_00000002.safetensors"
    bad = copy / "checkpoints" / "step_00000003.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={"verydeepvae": "{not json"})
    assert _resume(copy) == 0
    out = capsys.readouterr().out
    assert "unreadable metadata (not JSON)" in out and "resumed from" in out and "step_00000002" in out


@pytest.mark.parametrize("change", [{"step": "abc"}, {"step": -5}, {"step": 10**30}, {"config": None},
                                    {"config": {"resolution": 16, "no_such_key": 1}}])
def test_a_checkpoint_with_bad_metadata_is_one_line(run, tmp_path, capsys, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = run / "checkpoints" / "step_00000002.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["verydeepvae"])
    meta.update(change)
    if change.get("config") is None and "config" in change:
        del meta["config"]
    target = tmp_path / "step_00000002.safetensors"
    save_file(load_file(str(source)), str(target), metadata={"verydeepvae": json.dumps(meta)})
    assert main(["sample", "--checkpoint", str(target), "--output-dir", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "checkpoint" in _error_line(capsys)


def test_resume_without_the_split_file_is_refused_before_any_data_work(run, tmp_path, capsys):
    copy = _copy_run(run, tmp_path)
    data_source = _data_of(copy)
    (copy / "split.json").unlink()
    code = main(["train", "--preset", "tiny", "--data", str(data_source), "--output-dir", str(copy), "--resume",
                 "--no-progress", "--max-steps", "3", "--set", "subjects_to_plot=0", "--set", "num_workers=0"])
    assert code == 2 and "split.json is missing" in _error_line(capsys)
    assert not (copy / "split.json").exists()


def test_resume_with_another_resolution_is_refused_before_preprocessing(run, tmp_path, capsys, monkeypatch):
    import verydeepvae.data as data_module

    copy = _copy_run(run, tmp_path)
    monkeypatch.setattr(data_module, "build_datasets", lambda *a, **k: pytest.fail("data work before the refusal"))
    code = main(["train", "--preset", "tiny", "--data", str(_data_of(copy)), "--output-dir", str(copy), "--resume",
                 "--no-progress", "--set", "resolution=32", "--set", "channels=[8,8,8,8,8,8]",
                 "--set", "channels_per_latent=[2,2,2,2,2,2]", "--set", "latent_feature_maps_per_resolution=[1,1,1,1,1,1]",
                 "--set", "kernel_sizes_bottom_up=[3,3,3,3,2,1]", "--set", "kernel_sizes_top_down=[3,3,3,3,2,1]"])
    assert code == 2 and "another architecture" in _error_line(capsys)


def test_a_best_file_without_its_key_does_not_stop_training(run, tmp_path):
    copy = _copy_run(run, tmp_path)
    (copy / "checkpoints" / "best.json").write_text("{}")
    assert _resume(copy) == 0


def test_a_checkpoint_without_its_sidecar_says_it_was_not_verified(run, tmp_path, capsys):
    copy = _copy_run(run, tmp_path)
    (copy / "checkpoints" / "step_00000002.safetensors.sha256").unlink()
    assert main(["sample", "--checkpoint", str(copy), "--output-dir", str(tmp_path / "s"), "--num", "1",
                 "--no-progress"]) == 0
    assert "loaded without checking its integrity" in capsys.readouterr().err


# -- configuration files and numbers -----------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_one_short_line_in_well_under_a_second(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines).replace("i: &i", "channels:") + "\n")
    started = time.perf_counter()
    assert main(["config", "show", "--config", str(bomb)]) == 2
    line = _error_line(capsys)
    assert time.perf_counter() - started < 5 and len(line) < 300 and "aliases" in line


def test_yaml_duplicate_keys_are_refused_and_1e_minus_3_is_a_number(tmp_path):
    from verydeepvae.config import parse_override, read_config_file

    dup = tmp_path / "dup.yaml"
    dup.write_text("learning_rate: 1e-3\nlearning_rate: 2e-3\n")
    with pytest.raises(ConfigError, match="duplicate key 'learning_rate'"):
        read_config_file(dup)
    assert build_config(preset="tiny", overrides=dict([parse_override("learning_rate=1e-3")])).learning_rate == 1e-3
    ok = tmp_path / "ok.yaml"
    ok.write_text("learning_rate: 1e-3\n")
    assert build_config(preset="tiny", config_file=ok).learning_rate == 1e-3


@pytest.mark.parametrize("setting, fragment", [("seed=-1", "seed must be between"),
                                               ("seed=100000000000000000000000", "seed must be between"),
                                               ("channels=[100000000,8,8,8,8]", "channels[0] must be between"),
                                               ("resolution=1073741824", "resolution must be a power of two")])
def test_config_numbers_outside_their_limits_are_one_line(capsys, setting, fragment):
    assert main(["config", "show", "--preset", "tiny", "--set", setting]) == 2
    assert fragment in _error_line(capsys)


@pytest.mark.parametrize("args, fragment", [
    (["sample", "--temperature", "nan"], "--temperature must be between 0 and"),
    (["sample", "--temperature", "inf"], "--temperature must be between 0 and"),
    (["sample", "--seed", "-1"], "--seed must be between"),
    (["reconstruct", "--input", "X", "--temperature", "nan"], "--temperature must be between 0 and"),
    (["interpolate", "A", "B", "--steps", "1000000000"], "--steps must be between 2 and"),
])
def test_command_numbers_outside_their_limits_are_one_line(run, tmp_path, capsys, args, fragment):
    command, rest = args[0], args[1:]
    assert main([command, *rest, "--checkpoint", str(run), "--output-dir", str(tmp_path / "o")]) == 2
    assert fragment in _error_line(capsys)
    assert not (tmp_path / "o").exists()


# -- input files -------------------------------------------------------------------------------------------------
def test_complex_huge_and_non_regular_inputs_are_refused_by_name(tmp_path):
    from verydeepvae.data.nifti_load import open_image

    complex_path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.complex64), np.eye(4)), str(complex_path))
    with pytest.raises(DataError, match="complex voxel values"):
        open_image(complex_path)
    huge = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.uint8), np.eye(4)), str(huge))
    raw = bytearray(huge.read_bytes())
    raw[42:48] = np.array([800, 800, 800], dtype="<i2").tobytes()  # dim[1..3] in the header
    huge.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="800x800x800 voxels"):
        open_image(huge)
    fifo = tmp_path / "fifo.nii"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        open_image(fifo)
    list_fifo = tmp_path / "list.txt"
    os.mkfifo(list_fifo)
    with pytest.raises(DataError, match="neither a folder nor a regular file"):
        discover.discover_files(list_fifo)


# -- disk full, interrupted sampling --------------------------------------------------------------------------
def test_a_full_disk_while_writing_a_checkpoint_or_latents_is_one_line(run, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    copy = _copy_run(run, tmp_path)
    assert _resume(copy) == 2
    assert "could not write the step-3 checkpoint" in _error_line(capsys)
    assert not [p for p in (copy / "checkpoints").iterdir() if ".tmp" in p.name]
    files = sorted(_data(run).glob("*.nii.gz"))[:1]
    assert main(["encode", "--input", str(files[0]), "--checkpoint", str(run), "--output", str(tmp_path / "z.safetensors"),
                 "--no-progress"]) == 2
    assert "StorageFull" in _error_line(capsys) and not list(tmp_path.glob(".z.*"))


def test_sigterm_during_sample_leaves_a_record_of_the_complete_volumes(run, tmp_path, monkeypatch, capsys):
    import verydeepvae.sampling as sampling

    original = sampling.iter_sample_batches

    def interrupted(*args, **kwargs):
        for k, item in enumerate(original(*args, **kwargs)):
            if k == 1:
                raise Interrupted(15)
            yield item

    monkeypatch.setattr(sampling, "iter_sample_batches", interrupted)
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run), "--output-dir", str(out), "--num", "4", "--batch-size", "2",
                 "--no-progress"]) == 143
    assert "interrupted after 2 of 4 volumes" in _error_line(capsys)
    record = json.loads((out / "samples.json").read_text())
    assert record["interrupted"] and record["files"] == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == record["files"]
