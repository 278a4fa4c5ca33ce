"""Real torchrun jobs on the CPU (gloo): agreement between ranks, one set of outputs, all-reduced
metrics, SIGTERM without zombies, and torchrun --max-restarts resuming from the newest checkpoint.

Every rank writes what it saw to $VERYDEEPVAE_DEBUG_DIR/rank<R>.jsonl (train/distributed.py
``debug_record``): its own, not yet reduced, losses, its pid and a digest of its parameters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_legacy import free_port, worker_env
from verydeepvae.errors import UserError
from verydeepvae.train import distributed
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint

TIMEOUT = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import write_ellipsoids

    folder = tmp_path_factory.mktemp("ddp") / "data"
    write_ellipsoids(folder, 12, size=16)
    return folder


def torchrun(*launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "verydeepvae", "train", "--preset", "tiny", "--data", str(data), "--output-dir", str(out),
            "--no-progress", "--set", "train_fraction=0.75", "--set", "batch_size=2", *extra]


def env_with_debug(debug: Path) -> dict[str, str]:
    """The workers' environment; TMPDIR inside the test's folder, so torchrun's log folders
    (``torchelastic_*``) go away with it instead of piling up in the system's /tmp."""
    scratch = debug.parent / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    return dict(worker_env(), VERYDEEPVAE_DEBUG_DIR=str(debug), TMPDIR=str(scratch))


def records(debug: Path, rank: int, kind: str | None = None) -> list[dict]:
    path = debug / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if kind is None or r["kind"] == kind]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def processes_mentioning(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``marker`` (forked DataLoader workers
    keep their parent's command line, so they are found too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (status {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --- helpers without a process group --------------------------------------------------------------------


class FakeStore:
    """The c10d store's set/get/check, in memory."""

    def __init__(self, values: dict[str, str] | None = None):
        self.values = dict(values or {})

    def set(self, key: str, value: str) -> None:
        self.values[key] = value

    def get(self, key: str) -> bytes:
        return self.values[key].encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self.values for k in keys)


def fake_runtime(rank: int) -> distributed.Runtime:
    return distributed.Runtime(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))


def prefix_of_next_call(runtime: distributed.Runtime) -> str:
    return (f"verydeepvae/main_first/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{runtime.restart_count}/"
            f"{distributed._main_first_calls + 1}")


def test_main_first_runs_rank_0_first_and_everyone_agrees(monkeypatch):
    runtime = fake_runtime(1)
    prefix = prefix_of_next_call(runtime)
    store = FakeStore({f"{prefix}/0": "ok:abc"})
    monkeypatch.setattr(distributed, "_store", lambda: store)
    assert distributed.main_first(lambda: "built", runtime, "preparing the data", lambda r: "abc") == "built"
    assert store.values[f"{prefix}/1"] == "ok:abc"


def test_main_first_stops_every_rank_when_rank_0_failed(monkeypatch):
    runtime = fake_runtime(1)
    store = FakeStore({f"{prefix_of_next_call(runtime)}/0": "error:DataError"})
    monkeypatch.setattr(distributed, "_store", lambda: store)
    called = []
    with pytest.raises(UserError, match="rank 0 failed while preparing the data"):
        distributed.main_first(lambda: called.append(1), runtime, "preparing the data")
    assert called == []  # the other ranks do not even try


def test_main_first_notices_that_ranks_see_different_files(monkeypatch):
    runtime = fake_runtime(0)
    store = FakeStore({f"{prefix_of_next_call(runtime)}/1": "ok:other"})
    monkeypatch.setattr(distributed, "_store", lambda: store)
    with pytest.raises(UserError, match="rank 1 got a different result than rank 0"):
        distributed.main_first(lambda: "x", runtime, "preparing the data", lambda r: "mine")


def test_cuda_devices_in_a_configuration_are_applied_by_setup(monkeypatch):
    from verydeepvae.config import build_config

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_applied_devices", None)
    notices: list[str] = []
    runtime = distributed.setup(build_config(preset="tiny", overrides={"CUDA_devices": ["0", "1"]}), notices)
    assert runtime.device.type == "cpu" and runtime.world_size == 1
    assert notices == ["no CUDA GPU found: running on the CPU with gloo instead of CUDA_devices 0,1"]
    monkeypatch.setattr(distributed, "_applied_devices", None)
    monkeypatch.setattr(distributed, "physical_gpu_count", lambda: 2)
    with pytest.raises(UserError, match="device 3 does not exist"):
        distributed.setup(build_config(preset="tiny", overrides={"CUDA_devices": ["3"]}))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_every_ranks_rng_streams_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    from verydeepvae.config import build_config
    from verydeepvae.model import VeryDeepVAE
    from verydeepvae.checkpoint import save_checkpoint
    from verydeepvae.train.optim import EMA, UpdateSkipper, build_optimiser
    from verydeepvae.train.state import capture_state, process_rng_state, restore_state

    cfg = build_config(preset="tiny")
    model = VeryDeepVAE(cfg)
    ema, optimiser, skipper = EMA(model, 0.9), build_optimiser(model, cfg), UpdateSkipper(cfg)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    rank0 = process_rng_state()
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    rank1 = process_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())  # what rank 1 draws next
    tensors, meta = capture_state(model, ema, optimiser, None, skipper, [rank0, rank1])
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 5, tensors, meta))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    assert restore_state(checkpoint, optimiser, None, skipper, rank=1)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert not restore_state(checkpoint, optimiser, None, skipper, rank=2)  # written by 2 ranks


def test_a_safetensors_header_starting_with_byte_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    from verydeepvae.checkpoint import save_checkpoint

    for pad in range(256):
        path = save_checkpoint(tmp_path / str(pad), 1, {"a": torch.zeros(2)}, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert load_checkpoint(path).step == 1


# --- real torchrun jobs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_agree_write_one_set_of_outputs_and_log_the_mean(data, tmp_path):
    out, debug = tmp_path / "run", tmp_path / "debug"
    cmd = torchrun("--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}") + \
        train_args(data, out, "--max-steps", "8", "--set", "log_every=4", "--set", "validation_every=4",
                   "--set", "checkpoint_every=4", "--set", "figures_every=8", "--set", "subjects_to_plot=2")
    result = subprocess.run(cmd, env=env_with_debug(debug), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]

    # after 8 steps both ranks hold bit-identical parameters and EMA weights
    final = [records(debug, r, "finished") for r in (0, 1)]
    assert [len(f) for f in final] == [1, 1] and final[0][0]["step"] == final[1][0]["step"] == 8
    assert final[0][0]["parameters"] == final[1][0]["parameters"]
    assert final[0][0]["ema"] == final[1][0]["ema"]
    assert final[0][0]["pid"] != final[1][0]["pid"]

    # the logged training loss is the mean of the two ranks' own losses (which differ: other data)
    logged = {r["step"]: r for r in metrics(out) if r["kind"] == "train"}
    local = [{r["step"]: r["loss_nats_per_voxel"] for r in records(debug, rank, "train_local")} for rank in (0, 1)]
    assert sorted(logged) == [4, 8] and sorted(local[0]) == sorted(local[1]) == [4, 8]
    for step in (4, 8):
        assert local[0][step] != local[1][step]
        assert logged[step]["loss_nats_per_voxel"] == pytest.approx((local[0][step] + local[1][step]) / 2, rel=1e-12)
    # validation: the mean over every validation volume, whichever rank evaluated it
    for step in (4, 8):
        parts = [[r for r in records(debug, rank, "validation_local") if r["step"] == step][0] for rank in (0, 1)]
        assert [p["count"] for p in parts] == [2.0, 1.0]  # 3 validation volumes split over 2 ranks
        expected = sum(p["elbo_sum"] for p in parts) / sum(p["count"] for p in parts)
        value = [r for r in metrics(out) if r["kind"] == "validation" and r["step"] == step][0]
        assert value["loss_nats_per_voxel"] == pytest.approx(expected, rel=1e-12)

    # exactly one set of outputs, written by rank 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "cache", "checkpoints", "figures", "metrics.jsonl", "run.json", "samples", "split.json", "tensorboard",
        "train.log"]
    session = json.loads((out / "run.json").read_text())["sessions"][-1]  # one record, with every rank's device
    assert session["world_size"] == 2 and len(session["devices"]) == 2 and all(" cpu (" in d for d in session["devices"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step_00000004.safetensors", "step_00000008.safetensors"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    pairs = [(r["step"], r["kind"]) for r in metrics(out)]
    assert len(pairs) == len(set(pairs)) == 6  # train, validation and (rank 0's) quality at steps 4 and 8
    assert sorted(step for step, kind in pairs if kind == "quality") == [4, 8]
    assert sorted(p.name for p in (out / "samples").glob("*.nii.gz")) == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    assert len(list((out / "figures").glob("samples_step_*.png"))) == 1
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint.meta["world_size"] == 2 and "rng.rank1.torch" in checkpoint.tensors
    assert result.stdout.count("effective batch 4 = batch_size 2 x grad_accumulation 1 x world size 2") == 1


@pytest.mark.slow
def test_two_nodes_write_outputs_only_on_global_rank_0(data, tmp_path):
    """The README's two-node form, as two launchers on this machine: rank 1 is local rank 0 of
    node 1 and must not write checkpoints, events, figures or samples (the original did)."""
    out0, out1, debug = tmp_path / "node0", tmp_path / "node1", tmp_path / "debug"
    port = free_port()
    procs = []
    for node, out in ((0, out0), (1, out1)):
        cmd = torchrun("--nproc_per_node=1", "--nnodes=2", f"--node_rank={node}", "--master_addr=127.0.0.1",
                       f"--master_port={port}") + train_args(data, out, "--max-steps", "2", "--set", "log_every=1",
                                                             "--set", "subjects_to_plot=1")
        procs.append(subprocess.Popen(cmd, env=env_with_debug(debug), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert records(debug, 1, "finished")[0]["local_rank"] == 0
    assert records(debug, 0, "finished")[0]["parameters"] == records(debug, 1, "finished")[0]["parameters"]
    assert {"checkpoints", "tensorboard", "figures", "samples", "metrics.jsonl", "split.json"} <= {
        p.name for p in out0.iterdir()}
    # node 1 only keeps its own preprocessed-volume cache (it does not share node 0's file system here)
    assert [p.name for p in out1.iterdir()] == ["cache"]

    # --resume: node 1 has no checkpoint of its own and gets rank 0's
    port = free_port()
    procs = []
    for node, out in ((0, out0), (1, out1)):
        cmd = torchrun("--nproc_per_node=1", "--nnodes=2", f"--node_rank={node}", "--master_addr=127.0.0.1",
                       f"--master_port={port}") + train_args(data, out, "--max-steps", "3", "--set", "log_every=1",
                                                             "--set", "subjects_to_plot=1", "--resume")
        procs.append(subprocess.Popen(cmd, env=env_with_debug(debug), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert [r["step"] for r in records(debug, 1, "train_local")] == [1, 2, 3]  # step 3 only in the resumed run
    final = [records(debug, r, "finished")[-1] for r in (0, 1)]
    assert final[0]["step"] == final[1]["step"] == 3 and final[0]["parameters"] == final[1]["parameters"]
    assert final[0]["ema"] == final[1]["ema"]
    assert [p.name for p in out1.iterdir()] == ["cache"]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_process_and_the_state_resumes(data, tmp_path):
    from verydeepvae.cli import main

    out, debug = tmp_path / "run", tmp_path / "debug"
    cmd = torchrun("--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}") + \
        train_args(data, out, "--max-steps", "100000", "--set", "log_every=1", "--set", "checkpoint_every=100000",
                   "--set", "validation_every=100000", "--set", "figures_every=100000", "--set", "num_workers=1")
    launcher = subprocess.Popen(cmd, env=env_with_debug(debug), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        wait_for(lambda: len(records(debug, 1, "train_local")) >= 2, 150, "two logged steps", launcher)
        assert len(processes_mentioning(str(out))) >= 3  # the launcher, 2 workers (+ DataLoader workers)
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    wait_for(lambda: not processes_mentioning(str(out)), 5, "every worker process to be gone")
    stopped = [records(debug, r, "stopped") for r in (0, 1)]
    (tmp_path / "stderr.txt").write_text(stderr)
    assert [len(s) for s in stopped] == [1, 1], stderr[-3000:]
    assert stopped[0][0]["step"] == stopped[1][0]["step"]
    step = stopped[0][0]["step"]
    assert stderr.count("training stopped by signal at step") == 2  # one line per rank
    # the newest state was saved once, completely, at the step where every rank stopped
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step_{step:08d}.safetensors"]
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[0]).step == step
    # and it resumes
    code = main(train_args(data, out, "--max-steps", str(step + 2), "--resume", "--set", "log_every=1")[2:])
    assert code == 0
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).step == step + 2


@pytest.mark.slow
def test_max_restarts_resumes_from_the_newest_checkpoint_after_a_killed_worker(data, tmp_path):
    out, debug = tmp_path / "run", tmp_path / "debug"
    cmd = torchrun("--nproc_per_node=2", "--max-restarts=1", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{free_port()}") + \
        train_args(data, out, "--max-steps", "14", "--set", "log_every=1", "--set", "checkpoint_every=4",
                   "--set", "validation_every=100", "--set", "figures_every=100", "--set", "keep_checkpoints=0")
    launcher = subprocess.Popen(cmd, env=env_with_debug(debug), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        # kill rank 1 once the step-4 checkpoint is written and a later step has run
        wait_for(lambda: any(r["step"] >= 6 for r in records(debug, 1, "train_local")), 150,
                 "step 6", launcher)
        victim = records(debug, 1, "train_local")[-1]["pid"]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "after a torchrun restart: resuming from the newest checkpoint" in stdout
    resumed = [r for r in records(debug, 1, "train_local") if r["restart"] == 1]
    assert resumed and resumed[0]["pid"] != victim
    first = resumed[0]["step"]
    assert first in (5, 9)  # the step after a checkpoint (4 or 8), not step 1
    final = [records(debug, r, "finished") for r in (0, 1)]
    assert final[0][-1]["step"] == final[1][-1]["step"] == 14
    assert final[0][-1]["parameters"] == final[1][-1]["parameters"]
    steps = [r["step"] for r in metrics(out) if r["kind"] == "train"]
    assert steps == list(range(1, 15))  # records of the killed attempt after its checkpoint are replaced


@pytest.mark.slow
def test_two_ranks_start_again_together_when_the_finest_layer_is_unused(data, tmp_path):
    """The finest layer's check (train/finest_layer.py) is decided on the ranks' mean KL: both ranks
    leave the first attempt at the same step, rank 0 sets its files aside, both train again."""
    out, debug = tmp_path / "run", tmp_path / "debug"
    cmd = torchrun("--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}") + \
        train_args(data, out, "--max-steps", "4", "--set", "log_every=1", "--set", "checkpoint_every=2",
                   "--set", "validation_every=100", "--set", "figures_every=100", "--set", "quality_samples=0",
                   "--set", "finest_layer_restart_step=2", "--set", "finest_layer_restart_kl=1e9")
    result = subprocess.run(cmd, env=env_with_debug(debug), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training started again from step 0") == 1
    final = [records(debug, r, "finished") for r in (0, 1)]
    assert final[0][-1]["step"] == final[1][-1]["step"] == 4
    assert final[0][-1]["parameters"] == final[1][-1]["parameters"]
    for rank in (0, 1):  # steps 1-2 of the first attempt, then 1-4
        assert [r["step"] for r in records(debug, rank, "train_local")] == [1, 2, 1, 2, 3, 4]
    first = [p for p in tmp_path.iterdir() if p.name.startswith("run.first-attempt-")]
    assert len(first) == 1 and "stopped: the finest latent layer" in (first[0] / "train.log").read_text()
    assert list_checkpoints(first[0] / "checkpoints") == []  # it ended before its step-2 checkpoint
    assert [r["step"] for r in metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert checkpoint.meta["finest_layer_restart"]["step"] == 2
    assert checkpoint.meta["config"]["kl_free_bits_per_latent"] == 0.001
