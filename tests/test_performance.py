"""Speed/memory modes give the same training signal (the memory estimate: test_memory_estimate.py).

Correctness only: timings and measured memory peaks live in bench/train_step.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from verydeepvae import memory
from verydeepvae.config import build_config
from verydeepvae.errors import ConfigError
from verydeepvae.model import VeryDeepVAE, gaussian

BF16_PRECISION = 2.0 ** -8  # relative spacing of bfloat16 numbers (8 significant bits)


def _model(**overrides):
    cfg = build_config(preset="tiny", overrides=overrides)
    torch.manual_seed(0)
    model = VeryDeepVAE(cfg)
    with torch.no_grad():  # wake the zero-initialised prior heads so every path carries gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.rand(2, 1, cfg.resolution, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(1))
    return cfg, model, x


def _step(model, x, bf16: bool = False, noise_seed: int = 1):
    """Loss, per-layer KL and every parameter's gradient of one training step."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(noise_seed)  # the posterior samples
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same_grads(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("levels", ["all", [0], [1, 3]])
def test_checkpointing_gives_the_same_loss_and_gradients(levels):
    _, model, x = _model()
    plain, plain_grads = _step(model, x)
    model.set_checkpoint_levels(build_config(preset="tiny", overrides={"checkpoint_levels": levels})
                                .checkpointed_levels())
    ckpt, ckpt_grads = _step(model, x)
    assert torch.equal(ckpt.loss, plain.loss)
    assert torch.equal(ckpt.kl_per_layer, plain.kl_per_layer)
    _assert_same_grads(ckpt_grads, plain_grads, rtol=1e-5, atol=1e-7)
    # the comparison can fail: other posterior noise gives other gradients (so the recomputation
    # in the backward pass really did reuse the forward pass's random draws)
    _, other_grads = _step(model, x, noise_seed=2)
    assert any(not torch.allclose(other_grads[n], plain_grads[n], rtol=1e-3, atol=1e-6) for n in plain_grads)


def _conv_runs(model, run) -> dict[str, int]:
    """How often each Conv3d of ``model`` ran forward during ``run()``."""
    calls: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def test_a_layer_recomputed_whole_runs_its_parts_once_more_with_the_same_gradients():
    _, model, x = _model()
    plain, plain_grads = _step(model, x)
    levels = list(range(5))
    model.set_checkpoint_levels(levels)  # every level nested (the default)
    nested_runs = _conv_runs(model, lambda: _step(model, x))
    model.set_checkpoint_levels(levels, nested=[0])
    whole, whole_grads = _step(model, x)
    whole_runs = _conv_runs(model, lambda: _step(model, x))
    assert torch.equal(whole.loss, plain.loss)
    _assert_same_grads(whole_grads, plain_grads, rtol=1e-5, atol=1e-7)
    layer0 = model.decoder.layer_levels.index(0)
    layer1 = model.decoder.layer_levels.index(1)
    prior0, prior1 = (f"decoder.layers.{i}.prior.c2.conv" for i in (layer0, layer1))
    # forward, the layer's recomputation and, when nested, each part's own recomputation
    assert nested_runs[prior0] == whole_runs[prior0] == 3
    assert nested_runs[prior1] == 3
    assert whole_runs[prior1] == 2
    assert whole_runs[f"decoder.layers.{layer1}.res.branch.c2.conv"] == 2


def test_training_nests_only_where_the_estimate_says_it_lowers_the_peak(tmp_path):
    from verydeepvae.train.state import build_model_with_shared_weights

    cfg = build_config(preset="demo", overrides={"checkpoint_levels": "all", "output_dir": str(tmp_path)})
    est = memory.estimate(cfg)
    every = list(range(cfg.num_levels))
    nested = est.nested_levels(every)
    assert nested == [0]  # the full-resolution layer's working set is the step's largest
    model = build_model_with_shared_weights(cfg, 0, torch.device("cpu"))
    assert {lv for layer, lv in zip(model.decoder.layers, model.decoder.layer_levels) if layer.nested} == {0}
    assert all(layer.checkpointed for layer in model.decoder.layers)
    # recomputing the other levels whole holds no more than the largest nested working set
    ceiling = max(lv.transient_checkpointed for lv in est.levels)
    assert all(lv.transient_whole <= ceiling for lv in est.levels if lv.level not in nested)
    assert est.levels[0].transient_whole > ceiling
    assert est.nested_levels([]) == []
    assert set(est.nested_levels([1, 2])) <= {1, 2}


def test_checkpointing_keeps_fewer_tensors_for_the_backward_pass():
    def saved_bytes(model, x):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total

    _, model, x = _model()
    plain = saved_bytes(model, x)
    model.set_checkpoint_levels(range(5))
    assert saved_bytes(model, x) < 0.3 * plain


def test_checkpointed_sampling_with_an_explicit_generator_is_not_recomputed():
    _, model, x = _model(checkpoint_levels="all")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(model.sample(2, 1.0, generator=g1), model.sample(2, 1.0, generator=g2))
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))


def test_channels_last_gives_the_same_loss_and_gradients():
    _, model, x = _model()
    plain, plain_grads = _step(model, x)
    cl_model = copy.deepcopy(model)
    cl_model.set_channels_last(True)
    leaks = []

    def check(module, inputs, output):  # every convolution sees (and makes) channels-last tensors
        if inputs[0].shape[1] == 1:  # ambiguous layout: blocks.Conv3d converts the output
            return
        for t in (inputs[0], output):
            if t.shape[2] > 1 and not t.is_contiguous(memory_format=torch.channels_last_3d):
                leaks.append(tuple(t.shape))

    for module in cl_model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(check)
    cl, cl_grads = _step(cl_model, x)
    assert leaks == []
    torch.testing.assert_close(cl.loss, plain.loss, rtol=1e-5, atol=0)
    _assert_same_grads(cl_grads, plain_grads, rtol=1e-3, atol=1e-6)
    # and the weights can be saved and loaded like any others
    restored = VeryDeepVAE(build_config(preset="tiny"))
    restored.load_state_dict({k: v.contiguous() for k, v in cl_model.state_dict().items()})


def test_bf16_loss_is_fp32_loss_to_bf16_precision_with_float32_kl_and_likelihood():
    _, model, x = _model()
    fp32, _ = _step(model, x)
    bf16, grads = _step(model, x, bf16=True)
    assert bf16.loss.dtype == bf16.kl_per_layer.dtype == bf16.nll.dtype == torch.float32
    assert abs(bf16.loss.item() - fp32.loss.item()) <= BF16_PRECISION * abs(fp32.loss.item())
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_all_modes_together_checkpointing_changes_nothing():
    _, model, x = _model(channels_last=True)
    plain, plain_grads = _step(model, x, bf16=True)
    model.set_checkpoint_levels(range(5))
    ckpt, ckpt_grads = _step(model, x, bf16=True)
    assert torch.equal(ckpt.loss, plain.loss)
    _assert_same_grads(ckpt_grads, plain_grads, rtol=1e-5, atol=1e-7)


def test_fused_sample_and_kl_match_the_composed_maths(monkeypatch):
    torch.manual_seed(0)
    shape = (2, 3, 4, 4, 4)
    raw = [torch.randn(shape) for _ in range(4)]
    raw[1][0, 0, 0, 0, :2] = torch.tensor([-40.0, 40.0])  # the std's clamp and softplus's linear range
    raw[3][0, 0, 0, 1, :2] = torch.tensor([-40.0, 40.0])
    eps, w_z, w_kl = torch.randn(shape), torch.randn(shape), torch.randn(2)

    def composed(ts, noise):  # the plain float64 maths as the reference
        q_std, p_std = gaussian.std_from_raw(ts[1]).double(), gaussian.std_from_raw(ts[3]).double()
        kl = gaussian.kl_diagonal_gaussians(ts[0], q_std, ts[2], p_std).flatten(1).sum(1)
        return ts[0] + q_std * noise, kl

    fused = [t.clone().requires_grad_() for t in raw]
    monkeypatch.setattr(gaussian, "CHUNK_ELEMENTS", 40)  # several slabs along depth
    z, kl = gaussian.posterior_sample_and_kl(*fused, eps)
    ((z * w_z).sum() + (kl * w_kl).sum()).backward()
    ref = [t.double().requires_grad_() for t in raw]
    z64, kl64 = composed([ref[0], ref[1].float(), ref[2], ref[3].float()], eps.double())
    ((z64 * w_z.double()).sum() + (kl64 * w_kl.double()).sum()).backward()
    torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl64, rtol=1e-4, atol=1e-4)
    for x, y in zip(fused, ref):
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-4)
    assert len(gaussian._slabs(z.shape)) == 4
    half = [t.clone().bfloat16().contiguous(memory_format=torch.channels_last_3d).requires_grad_() for t in raw]
    z, kl = gaussian.posterior_sample_and_kl(*half, eps)
    (z.sum() + kl.sum()).backward()
    assert z.dtype == kl.dtype == torch.float32 and all(t.grad.dtype == torch.bfloat16 for t in half)
    assert z.is_contiguous(memory_format=torch.channels_last_3d)


# -- the training loop with every mode on ----------------------------------------------------------
class _Blobs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.volumes = [torch.rand(1, 16, 16, 16, generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        return self.volumes[i]


@dataclass
class _Bundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    voxel_size_mm: float = 2.0
    intensity_reference: dict | None = None


def _loop_config(tmp_path, **overrides):
    """A tiny in-memory training run: no workers, no figures, everything logged every step."""
    base = {"output_dir": str(tmp_path / "run"), "num_workers": 0, "subjects_to_plot": 0, "max_steps": 2,
            "batch_size": 2, "log_every": 1, "validation_every": 2, "checkpoint_every": 2}
    return build_config(preset="tiny", overrides={**base, **overrides})


def test_training_loop_with_checkpointing_channels_last_bf16_and_accumulation(tmp_path):
    from verydeepvae.train.loop import train

    cfg = _loop_config(tmp_path, grad_accumulation=2, precision="bf16", channels_last=True, checkpoint_levels=[0, 1])
    result = train(cfg, bundle=_Bundle(_Blobs(8, 0), _Blobs(2, 1)), show_progress=False)
    assert result.step == 2 and result.checkpoint is not None
    assert all(torch.isfinite(torch.tensor(v["elbo_bits_per_voxel"])) for v in result.validation)


def test_bf16_on_a_cpu_without_native_bf16_is_announced(tmp_path, monkeypatch):
    from verydeepvae.train import loop, precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = _loop_config(tmp_path, max_steps=1, precision="bf16", validation_every=1, checkpoint_every=1)
    notices: list[str] = []
    loop.train(cfg, bundle=_Bundle(_Blobs(4, 0), _Blobs(2, 1)), notices=notices, show_progress=False)
    assert any("no native bfloat16" in n for n in notices)


def test_the_training_forward_pass_compiles_as_one_graph():
    """torch.compile traces the whole forward pass of a training step without a break (a break
    splits the compiled step in pieces and runs Python between them at every step)."""
    _, model, x = _model()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compiled_training_saves_checkpoints_an_uncompiled_model_resumes(tmp_path):
    from verydeepvae.train.loop import train

    bundle = _Bundle(_Blobs(4, 0), _Blobs(2, 1))
    compiled = train(_loop_config(tmp_path, compile=True), bundle=bundle, show_progress=False)
    assert compiled.step == 2 and compiled.checkpoint is not None
    assert all(torch.isfinite(torch.tensor(v["elbo_bits_per_voxel"])) for v in compiled.validation)
    # the checkpoint holds the plain model's names (no torch.compile wrapper prefix): eager resumes
    resumed = train(_loop_config(tmp_path, max_steps=3, resume=True), bundle=bundle, show_progress=False)
    assert resumed.step == 3


# -- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value,levels", [("none", []), ("all", [0, 1, 2, 3, 4]), ([3, 0, 3], [0, 3]), (1, [1])])
def test_checkpoint_levels_values(value, levels):
    assert build_config(preset="tiny", overrides={"checkpoint_levels": value}).checkpointed_levels() == levels


@pytest.mark.parametrize("value,fragment", [("some", '"none", "all"'), ([5], "from 0 (resolution 16) to 4"),
                                            (True, "checkpoint_levels must be")])
def test_bad_checkpoint_levels_name_the_key(value, fragment):
    with pytest.raises(ConfigError, match="checkpoint_levels") as info:
        build_config(preset="tiny", overrides={"checkpoint_levels": value})
    assert fragment in str(info.value)


def test_one_data_loader_serves_every_epoch_with_augmentation_keyed_by_epoch(tmp_path, monkeypatch):
    """Re-creating the DataLoader (and forking its worker) at every epoch cost 10-20 % of a demo
    step; one loader now streams (epoch, index) items.  The keys still follow the epochs."""
    from conftest import write_ellipsoids

    from verydeepvae.config import build_config
    from verydeepvae.train import batches, loop
    from verydeepvae.train.sampler import EpochKeyed

    created, keys = [], []
    real_loader, real_getitem = batches.DataLoader, EpochKeyed.__getitem__
    monkeypatch.setattr(batches, "DataLoader", lambda *a, **k: created.append(1) or real_loader(*a, **k))
    monkeypatch.setattr(EpochKeyed, "__getitem__", lambda self, item: keys.append(item[0]) or real_getitem(self, item))
    write_ellipsoids(tmp_path / "data", 10, size=16)
    cfg = build_config(preset="tiny", overrides={"data_path": str(tmp_path / "data"), "output_dir": str(tmp_path / "run"),
                                                 "max_steps": 6, "batch_size": 4, "num_workers": 0,
                                                 "subjects_to_plot": 0, "quality_samples": 0})
    loop.train(cfg, show_progress=False)  # 9 training volumes, 2 batches per epoch: 3 epochs
    assert created == [1]
    assert sorted(set(keys))[:3] == [0, 1, 2] and keys == sorted(keys)


def test_the_step_benchmark_leaves_out_emulated_bf16_by_default_and_runs_it_when_asked(monkeypatch):
    import importlib.util
    from pathlib import Path

    from verydeepvae import process_defaults
    from verydeepvae.train import precision

    monkeypatch.setattr(process_defaults, "apply_cli_defaults", lambda: None)  # no allocator or env changes here
    path = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    default = bench.DEFAULT_MODES.split(",")
    bf16 = [m for m in default if bench.MODES[m].get("precision") == "bf16"]
    assert bf16

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    modes, note = bench.modes_to_run(None, "cpu")
    assert modes == [m for m in default if m not in bf16] and "fp32" in modes
    assert all(m in note for m in bf16) and "--modes" in note
    assert bench.modes_to_run("bf16,fp32", "cpu") == (["bf16", "fp32"], "")  # asked for: run
    assert bench.modes_to_run(None, "cuda") == (default, "")  # a GPU has its own bf16

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert bench.modes_to_run(None, "cpu") == (default, "")
