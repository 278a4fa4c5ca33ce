"""What a first GPU / multi-GPU run needs, proven on the CPU (issue 17).

No GPU here: the CUDA calls are patched and the tests check the decisions (which device's generator
is restored, which state is saved, which precision and backend flags are chosen, how the loss scale
moves, what an out-of-memory error becomes).  What only real hardware can show is listed in
docs/gpu.md.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from verydeepvae.cli import main
from verydeepvae.config import build_config
from verydeepvae.model import VeryDeepVAE
from verydeepvae.train import precision, state
from verydeepvae.checkpoint import load_checkpoint, save_checkpoint
from verydeepvae.train.optim import EMA, UpdateSkipper, build_optimiser, update_loss_scale


# -- 1. every rank keeps its own CUDA random stream -------------------------------------------------
def test_building_the_model_restores_the_ranks_own_cuda_generator(monkeypatch):
    forked = []

    @contextlib.contextmanager
    def recording_fork_rng(devices=None, **kwargs):
        forked.append(list(devices))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", recording_fork_rng)
    monkeypatch.setattr(VeryDeepVAE, "to", lambda self, device: self)
    state.build_model_with_shared_weights(build_config(preset="tiny"), 0, torch.device("cuda", 3))
    state.build_model_with_shared_weights(build_config(preset="tiny"), 0, torch.device("cpu"))
    # manual_seed reseeds every CUDA device: the rank's own one (cuda:3) must be restored afterwards
    assert forked == [[3], []]


def test_two_ranks_start_from_the_same_weights_and_draw_different_noise():
    cfg = build_config(preset="tiny")
    draws, weights = [], []
    for rank in (0, 1):
        torch.manual_seed(100 + rank)  # the rank's own stream (seed + rank)
        model = state.build_model_with_shared_weights(cfg, 100, torch.device("cpu"))
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
        draws.append(torch.randn(8))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(draws[0], draws[1])


# -- 2. resuming on fewer GPUs -----------------------------------------------------------------------
def _training_state():
    cfg = build_config(preset="tiny")
    model = VeryDeepVAE(cfg)
    return model, EMA(model, 0.9), build_optimiser(model, cfg), UpdateSkipper(cfg)


def _fake_cuda(monkeypatch, current: int, restored: list):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: torch.full((16,), 40 + current, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: restored.append(int(s[0])))

    def everything(*args):
        raise AssertionError("only the process's own device may be saved or restored")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", everything)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", everything)


def test_a_checkpoint_holds_only_the_processs_own_cuda_generator(monkeypatch):
    model, ema, optimiser, skipper = _training_state()
    _fake_cuda(monkeypatch, current=2, restored=[])
    tensors, _ = state.capture_state(model, ema, optimiser, None, skipper)
    assert [k for k in tensors if k.startswith("rng.cuda")] == ["rng.cuda"]
    assert int(tensors["rng.cuda"][0]) == 42


def test_a_checkpoint_of_an_eight_gpu_run_resumes_on_one_gpu(tmp_path, monkeypatch):
    model, ema, optimiser, skipper = _training_state()
    tensors, meta = state.capture_state(model, ema, optimiser, None, skipper)
    # written before: one state per visible device, 11 of them ("rng.cuda.10" sorts before ".2")
    tensors.update({f"rng.cuda.{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(11)})
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 5, tensors, meta))
    restored: list[int] = []
    _fake_cuda(monkeypatch, current=2, restored=restored)
    assert state.restore_state(checkpoint, optimiser, None, skipper, rank=0)
    assert restored == [2]  # its own device's entry, no IndexError


def test_resuming_with_another_world_size_says_what_is_not_exact(tmp_path):
    from conftest import write_ellipsoids

    from verydeepvae.checkpoint import list_checkpoints
    from verydeepvae.train.loop import train

    data = tmp_path / "data"
    write_ellipsoids(data, 8, size=16)
    out = tmp_path / "run"
    cfg = build_config(preset="tiny", overrides={"data_path": str(data), "output_dir": str(out), "max_steps": 2,
                                                 "subjects_to_plot": 0, "num_workers": 0})
    train(cfg, show_progress=False)
    newest = list_checkpoints(out / "checkpoints")[-1]
    checkpoint = load_checkpoint(newest)
    checkpoint.meta["world_size"] = 8
    newest.unlink()
    save_checkpoint(out / "checkpoints", 2, checkpoint.tensors, checkpoint.meta)
    notices: list[str] = []
    resumed = build_config(preset="tiny", overrides={**cfg.to_dict(), "resume": True, "max_steps": 3})
    train(resumed, show_progress=False, notices=notices)
    assert any("saved by 8 process(es) and resumes with 1" in n for n in notices)


# -- 3. the figure pass: after the checkpoint, one volume per pass from 64³ up, at the training precision --
def test_figures_come_after_the_checkpoint_under_autocast_one_volume_per_pass_from_64_cubed(tmp_path, monkeypatch):
    from conftest import write_ellipsoids

    from verydeepvae.train import loop
    from verydeepvae.train.figures import volumes_per_pass

    # 128³ and 64³ volumes one at a time (memory); small ones together (per-layer overhead)
    assert volumes_per_pass(128) == volumes_per_pass(64) == 1 and volumes_per_pass(32) == 4

    seen, in_figures = [], []
    original_reconstructions, original_sample = VeryDeepVAE.reconstructions, VeryDeepVAE.sample

    def reconstructions(self, x, *args, **kwargs):
        if in_figures:
            seen.append(("reconstructions", x.shape[0], torch.is_autocast_enabled("cpu")))
        return original_reconstructions(self, x, *args, **kwargs)

    def sample(self, n, *args, **kwargs):
        if in_figures:
            seen.append(("sample", n, torch.is_autocast_enabled("cpu")))
        return original_sample(self, n, *args, **kwargs)

    checkpoints_at_figures = []
    original_figures = loop._Trainer._figures

    def figures(self):
        checkpoints_at_figures.append(sorted(p.name for p in self.ckpt_dir.glob("step_*.safetensors")))
        in_figures.append(True)
        try:
            return original_figures(self)
        finally:
            in_figures.clear()

    monkeypatch.setattr(VeryDeepVAE, "reconstructions", reconstructions)
    monkeypatch.setattr(VeryDeepVAE, "sample", sample)
    monkeypatch.setattr(loop._Trainer, "_figures", figures)
    data = tmp_path / "data"
    write_ellipsoids(data, 20, size=16)
    cfg = build_config(preset="tiny", overrides={
        "data_path": str(data), "output_dir": str(tmp_path / "run"), "max_steps": 2, "precision": "bf16",
        "figures_every": 2, "checkpoint_every": 2, "subjects_to_plot": 2, "num_workers": 0, "quality_samples": 0,
        "train_fraction": 0.9})  # two validation volumes
    loop.train(cfg, show_progress=False)
    assert checkpoints_at_figures == [["step_00000002.safetensors"]]
    assert seen == [("reconstructions", 2, True), ("sample", 2, True)]  # 16³: both subjects in one pass
    assert (tmp_path / "run" / "figures" / "samples_step_00000002.png").exists()


# -- 4. out of memory: one line with advice, the newest checkpoint kept ------------------------------
def test_out_of_memory_in_training_is_one_line_with_advice(tmp_path, monkeypatch, capsys):
    from conftest import write_ellipsoids

    from verydeepvae.train import loop

    original_step = loop._Trainer._train_step

    def step(self, batches):
        if self.step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_step(self, batches)

    monkeypatch.setattr(loop._Trainer, "_train_step", step)
    data = tmp_path / "data"
    write_ellipsoids(data, 8, size=16)
    code = main(["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "6", "--no-progress", "--set", "checkpoint_every=2", "--set", "subjects_to_plot=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "out of memory on cpu at step 4" in err[-1] and "step_00000002.safetensors" in err[-1]
    assert "checkpoint_levels all" in err[-1] and "Traceback" not in "\n".join(err)


def test_out_of_memory_in_an_inference_command_is_one_line(tmp_path, monkeypatch, capsys):
    import verydeepvae.commands as commands

    def sample(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore details")

    monkeypatch.setattr(commands, "sample_command", sample)
    code = main(["sample", "--checkpoint", str(tmp_path), "--output-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "out of memory (CUDA out of memory. Tried to allocate 9.00 GiB)" in err[0] and "--batch-size" in err[0]


# -- 5. fp16 loss scale: only overflows lower it ------------------------------------------------------
def test_only_overflow_lowers_the_loss_scale_and_clean_steps_raise_it():
    weight = torch.nn.Parameter(torch.ones(4))
    optimiser = torch.optim.SGD([weight], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    trajectory = []
    for why in ["large", "large", "", "", "", "non-finite", "", "large", "", ""]:
        scaler.scale(weight.sum()).backward()
        scaler.unscale_(optimiser)
        if not why:
            scaler.step(optimiser)
        optimiser.zero_grad()
        update_loss_scale(scaler, why)
        trajectory.append(scaler.get_scale())
    # large-norm skips keep the scale; 3 clean steps double it; an overflow halves it and restarts
    # the count of clean steps (3 more needed, large-norm skips not counted)
    assert trajectory == [1024, 1024, 1024, 1024, 2048, 1024, 1024, 1024, 1024, 2048]


# -- 6. GPU backend policy ---------------------------------------------------------------------------
@pytest.fixture
def restore_backends():
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = flags
    torch.use_deterministic_algorithms(False)


def test_gpu_backends_fp32_means_float32_and_autotuning_is_on(restore_backends):
    notices: list[str] = []
    precision.configure_backends(build_config(preset="tiny", overrides={"precision": "fp32"}),
                                 torch.device("cuda", 0), notices)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert "TF32 off" in notices[0] and "--deterministic" in notices[0]
    precision.configure_backends(build_config(preset="tiny", overrides={"precision": "bf16"}),
                                 torch.device("cuda", 0), notices)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_deterministic_turns_autotuning_off_and_deterministic_algorithms_on(restore_backends):
    notices: list[str] = []
    precision.configure_backends(build_config(preset="tiny", overrides={"deterministic": True}),
                                 torch.device("cuda", 0), notices)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled()
    assert "autotuning off" in notices[0]


def test_deterministic_flag_on_the_command_line_reaches_the_configuration():
    from verydeepvae.cli import build_parser
    from verydeepvae.commands import load_config

    args = build_parser().parse_args(["train", "--preset", "tiny", "--deterministic"])
    assert args.deterministic and not load_config(args).deterministic  # set by train_command's extra options
    assert load_config(args, {"deterministic": True}).deterministic


def test_cpu_runs_get_no_gpu_backend_notice(restore_backends):
    notices: list[str] = []
    precision.configure_backends(build_config(preset="tiny"), torch.device("cpu"), notices)
    assert notices == []


# -- 7. precision auto on GPUs without fast bf16 --------------------------------------------------------
@pytest.mark.parametrize("capability, chosen", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_precision_auto_by_gpu_generation(monkeypatch, capability, chosen):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability[0] >= 8)
    notices: list[str] = []
    cfg = precision.resolve_precision(build_config(preset="tiny", overrides={"precision": "auto"}),
                                      torch.device("cuda", 0), notices)
    assert cfg.precision == chosen and notices == [notices[0]] and chosen in notices[0]


def test_explicit_bf16_on_a_gpu_without_fast_bf16_gets_a_notice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated
    notices: list[str] = []
    cfg = precision.resolve_precision(build_config(preset="tiny", overrides={"precision": "bf16"}),
                                      torch.device("cuda", 0), notices)
    assert cfg.precision == "bf16" and "compute capability 7.0" in notices[0] and "fp16" in notices[0]


def test_out_of_memory_advice_uses_the_estimator(monkeypatch):
    monkeypatch.setattr(precision, "device_memory_bytes", lambda device: 8 * 2**30)
    cfg = build_config(preset="128", overrides={"batch_size": 4, "precision": "fp32"})
    line = precision.out_of_memory_message(cfg, torch.device("cuda", 0), 0, None)
    assert line.startswith("out of memory on cuda:0 at step 1 (batch_size 4, precision fp32")
    assert "of 8.00 GiB" in line and "with checkpoint_levels all" in line and "with precision fp16 too" in line
    assert "no checkpoint was written yet" in line and "\n" not in line


def test_generation_runs_in_the_precision_the_model_was_trained_in(tmp_path):
    from verydeepvae.generate import load_model
    from verydeepvae.checkpoint import load_checkpoint, save_checkpoint

    cfg = build_config(preset="tiny", overrides={"precision": "bf16"})
    model = VeryDeepVAE(cfg)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"ema.{k}": v for k, v in model.state_dict().items()}}
    path = save_checkpoint(tmp_path, 1, tensors, {"config": cfg.to_dict()})
    loaded = load_model(load_checkpoint(path))
    seen = []
    loaded.decoder.register_forward_hook(lambda *a: seen.append(torch.is_autocast_enabled("cpu")))
    x = torch.rand(1, 1, 16, 16, 16)
    volumes = [loaded.sample(1), loaded.reconstruct(x), loaded.decode(loaded.encode(x))]
    assert seen == [True] * 4 and all(v.dtype == torch.float32 for v in volumes)
    assert VeryDeepVAE(build_config(preset="tiny")).inference_precision == "fp32"  # a fresh model: as before
