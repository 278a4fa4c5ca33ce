"""sample / reconstruct / encode / decode / interpolate, end to end on one tiny trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from verydeepvae.cli import main
from verydeepvae.generate import BACKGROUND_LEVEL, load_preprocessed, open_trained, output_stems, to_data_intensity
from verydeepvae.latents import latent_layout, load_latents, slerp


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny 16³ model trained for 20 steps on 12 ellipsoid volumes (24³, 2 mm voxels)."""
    from conftest import write_ellipsoids

    root = tmp_path_factory.mktemp("generate")
    write_ellipsoids(root / "data", 12)
    out = root / "run"
    code = main(["train", "--preset", "tiny", "--data", str(root / "data"), "--output-dir", str(out),
                 "--max-steps", "20", "--no-progress", "--set", "train_fraction=0.75",
                 "--set", "validation_every=20", "--set", "checkpoint_every=20", "--set", "figures_every=1000"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def trained(run):
    return open_trained(run, device="cpu")


@pytest.fixture(scope="module")
def files(run) -> list[Path]:
    return sorted((run.parent / "data").glob("*.nii.gz"))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def _one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


# --- sample ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_temperature_zero_gives_the_prior_means_whatever_the_seed(run, trained, tmp_path):
    outs = []
    for seed, temperature in ((1, "0"), (2, "0"), (3, ",".join(["0"] * trained.model.decoder.num_levels))):
        out = tmp_path / f"s{seed}"
        assert main(["sample", "--checkpoint", str(run), "--num", "2", "--temperature", temperature,
                     "--seed", str(seed), "--output-dir", str(out), "--no-progress"]) == 0
        outs.append(_load(out / "sample_0001.nii.gz")[0])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    # the same volume decoded from the prior means taken layer by layer
    from verydeepvae.model.latent_layer import LatentChoice

    model = trained.model
    with torch.no_grad(), model.inference_autocast("cpu"):  # the training's precision, as `sample` uses
        _, _, zs = model.decoder(None, [LatentChoice(use_posterior=False, temperature=0.0)] * model.num_layers, 1)
        decoded = model.decode(zs)[0, 0].float().numpy()
    np.testing.assert_allclose(outs[0], decoded, atol=1e-6)
    # and those latents are the prior means: with T=0 the decoder draws nothing, so seeds do not matter
    g = torch.Generator().manual_seed(123)
    with torch.no_grad(), model.inference_autocast("cpu"):
        _, _, zs_again = model.decoder(None, [LatentChoice(use_posterior=False, temperature=0.0)] * model.num_layers,
                                       1, g)
    assert all(torch.equal(a, b) for a, b in zip(zs, zs_again))


@pytest.mark.slow
def test_sample_in_the_data_intensity_scale(run, trained, tmp_path):
    out = tmp_path / "data_scale"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--output-dir", str(out),
                 "--intensity", "data", "--no-progress", "--seed", "4"]) == 0
    ref = trained.intensity_reference
    low, high = ref["low"], ref["high"]
    assert 200 < low < high < 900  # the ellipsoids' intensities are 300-800 on a zero background
    data, _ = _load(out / "sample_0000.nii.gz")
    model_range = tmp_path / "model_scale"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--output-dir", str(model_range),
                 "--no-progress", "--seed", "4"]) == 0
    v, _ = _load(model_range / "sample_0000.nii.gz")
    np.testing.assert_allclose(data, to_data_intensity(v, low, high), rtol=1e-6, atol=1e-3)
    foreground = data[data > 0]
    assert foreground.size == 0 or (foreground.min() >= low - 1e-3 and foreground.max() <= high + 1e-3)
    record = json.loads((out / "samples.json").read_text())
    assert record["intensity"]["scale"] == "data" and record["intensity"]["low"] == pytest.approx(low)


@pytest.mark.slow
def test_voxels_mean_or_drawn_as_the_run_says_or_as_asked(run, tmp_path):
    def sample(checkpoint: Path, name: str, *extra: str) -> tuple[np.ndarray, str]:
        out = tmp_path / name
        assert main(["sample", "--checkpoint", str(checkpoint), "--num", "1", "--output-dir", str(out),
                     "--no-progress", "--seed", "3", *extra]) == 0
        return _load(out / "sample_0000.nii.gz")[0], json.loads((out / "samples.json").read_text())["voxels"]

    mean, said = sample(run, "default")
    assert said == "the mean of p(x | z)"
    drawn, said = sample(run, "drawn", "--voxels", "draw")
    # the run measured its voxel noise at the end of training (model/voxel_noise.py)
    assert said.startswith("each voxel drawn from p(x | z), neighbours correlated") and not np.array_equal(mean, drawn)
    # a run that says sample_voxels: draw keeps saying it in its checkpoints (a resumed copy of the run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--config", str(copy), "--resume", "--output-dir", str(copy), "--max-steps", "21", "-q",
                 "--no-progress", "--set", "sample_voxels=draw"]) == 0
    _, said = sample(copy, "resumed")
    assert said.startswith("each voxel drawn from p(x | z), neighbours correlated")
    assert sample(copy, "independent", "--voxels", "independent")[1] == "each voxel drawn from p(x | z), independently"
    assert sample(copy, "resumed_mean", "--voxels", "mean")[1] == "the mean of p(x | z)"


def test_to_data_intensity_maps_background_to_zero():
    v = np.array([0.0, BACKGROUND_LEVEL / 2, 0.5, 1.0], dtype=np.float32)
    np.testing.assert_allclose(to_data_intensity(v, 100.0, 300.0), [0.0, 0.0, 200.0, 300.0])


# --- reconstruct ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_reconstruct_writes_volumes_metrics_and_figure(run, trained, files, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(f) for f in files[:3]) + "\n")
    out = tmp_path / "recon"
    assert main(["reconstruct", "--checkpoint", str(run), "--input", str(listing), "--output-dir", str(out),
                 "--no-progress", "--prior-above", "4"]) == 0
    assert "bits/voxel" in capsys.readouterr().out
    record = json.loads((out / "reconstructions.json").read_text())
    assert (out / "reconstructions.png").is_file() and len(record["files"]) == 3
    _, metas = load_preprocessed(files[:3], trained.preprocess_settings)
    for row, meta in zip(record["files"], metas):
        recon, affine = _load(out / row["reconstruction"])
        original, affine_in = _load(out / row["preprocessed_input"])
        assert recon.shape == original.shape == (16, 16, 16)
        assert np.allclose(affine, affine_in) and np.allclose(np.diag(affine)[:3], meta["voxel_size_mm"])
        assert np.allclose(affine @ [7.5, 7.5, 7.5, 1], [0, 0, 0, 1], atol=1e-4)  # centred on the origin
        assert row["elbo_bits_per_voxel"] > 0 and row["kl_bits_per_voxel"] >= 0
        assert np.isfinite([row["psnr_db"], row["ssim"], row["mae"]]).all()
    assert record["prior_above_resolution"] == 4 and record["mode"] == "posterior mean"


@pytest.mark.slow
def test_reconstruct_posterior_samples_are_reproducible_and_mean_is_decode_of_encode(run, trained, files, tmp_path):
    from verydeepvae.generate import reconstruct_files

    a = reconstruct_files(trained, files[:2], tmp_path / "a", posterior_mean=False, seed=7, show_progress=False)
    b = reconstruct_files(trained, files[:2], tmp_path / "b", posterior_mean=False, seed=7, show_progress=False)
    assert a["files"] == b["files"]
    name = a["files"][0]["reconstruction"]
    assert np.array_equal(_load(tmp_path / "a" / name)[0], _load(tmp_path / "b" / name)[0])
    reconstruct_files(trained, files[:2], tmp_path / "mean", show_progress=False)
    x, _ = load_preprocessed(files[:2], trained.preprocess_settings)
    with torch.no_grad():
        decoded = trained.model.decode(trained.model.encode(torch.from_numpy(x)[:, None]))[:, 0].numpy()
    np.testing.assert_allclose(_load(tmp_path / "mean" / name)[0], decoded[0], atol=1e-5)


def _reoriented_copy(path: Path, folder: Path) -> Path:
    """The same scan stored another way round (axes A, L, S instead of R, A, S), so going back to
    the input's space has to undo a reorientation as well as the crop and the resampling."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    folder.mkdir(parents=True, exist_ok=True)
    image = nib.load(str(path))
    turned = image.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(("A", "L", "S"))))
    out = folder / f"turned_{path.name}"
    nib.save(nib.Nifti1Image(np.asarray(turned.dataobj, dtype=np.float32), turned.affine), str(out))
    assert nib.aff2axcodes(nib.load(str(out)).affine) == ("A", "L", "S")
    return out


@pytest.mark.slow
def test_reconstruct_also_writes_the_result_in_the_input_scans_own_space(run, files, tmp_path, capsys):
    scan = _reoriented_copy(files[0], tmp_path / "scans")
    out = tmp_path / "recon"
    assert main(["reconstruct", "--checkpoint", str(run), "--data", str(scan), "--output", str(out),
                 "--no-progress"]) == 0
    assert "_native.nii.gz" in capsys.readouterr().out
    row = json.loads((out / "reconstructions.json").read_text())["files"][0]
    native = nib.load(str(out / row["reconstruction_native"]))
    original = nib.load(str(scan))
    assert native.shape == original.shape and np.allclose(native.affine, original.affine)
    x, y = np.asarray(native.dataobj, dtype=np.float64).ravel(), np.asarray(original.dataobj, dtype=np.float64).ravel()
    constant = 0.0  # a constant image has no correlation with anything (zero variance)
    # 20 training steps, and the percentile clamp maps the ellipsoids' outer shell to background:
    # the geometry itself is checked to r > 0.97 in test_native_space.py
    assert np.corrcoef(x, y)[0, 1] > constant + 0.3
    assert float(native.header["cal_min"]) == 0.0 and float(native.header["cal_max"]) == 1.0
    data_scale = tmp_path / "recon_data"
    assert main(["reconstruct", "--checkpoint", str(run), "--input", str(scan), "--output-dir", str(data_scale),
                 "--intensity", "data", "--no-progress"]) == 0
    scaled = nib.load(str(data_scale / row["reconstruction_native"]))
    assert float(scaled.header["cal_max"]) > 100  # the scan's own units (ellipsoids of 300-800)
    np.testing.assert_allclose(np.corrcoef(np.asarray(scaled.dataobj, dtype=np.float64).ravel(), y)[0, 1],
                               np.corrcoef(x, y)[0, 1], atol=0.05)


# --- encode / decode ------------------------------------------------------------------------------


@pytest.mark.slow
def test_encode_writes_safetensors_latents_that_decode_to_the_reconstruction(run, trained, files, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for f in files[:3]:
        (folder / f.name).symlink_to(f)
    latents = tmp_path / "latents.safetensors"
    assert main(["encode", "--checkpoint", str(run), "--input", str(folder), "--output", str(latents),
                 "--no-progress"]) == 0
    raw = latents.read_bytes()  # safetensors: 8-byte little-endian header length, then a JSON header
    assert raw[8:9] == b"{" and int.from_bytes(raw[:8], "little") + 8 <= len(raw)
    zs, meta = load_latents(latents)
    assert meta == json.loads(latents.with_suffix(".json").read_text())
    assert meta["layers"] == latent_layout(trained.model) and len(meta["files"]) == 3
    assert [tuple(z.shape) for z in zs] == [(3, *shape) for shape in trained.model.latent_shapes()]
    decoded = tmp_path / "decoded"
    assert main(["decode", "--checkpoint", str(run), "--latents", str(latents), "--output-dir", str(decoded),
                 "--no-progress"]) == 0
    reconstructed = tmp_path / "recon"
    assert main(["reconstruct", "--checkpoint", str(run), "--input", str(folder), "--output-dir",
                 str(reconstructed), "--no-progress"]) == 0
    for name in output_stems(sorted(folder.iterdir())):
        a, affine_a = _load(decoded / f"{name}_decoded.nii.gz")
        b, affine_b = _load(reconstructed / f"{name}_recon.nii.gz")
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.allclose(affine_a, affine_b)


@pytest.mark.slow
def test_decode_of_encoded_scans_goes_back_to_their_own_space_where_the_file_records_it(run, files, tmp_path,
                                                                                          capsys):
    from verydeepvae.atomic import write_safetensors
    from verydeepvae.latents import LATENTS_META_KEY

    scan = _reoriented_copy(files[1], tmp_path / "scans")
    latents = tmp_path / "z.safetensors"
    assert main(["encode", "--checkpoint", str(run), "--data", str(scan), "--output", str(latents),
                 "--no-progress"]) == 0
    zs, meta = load_latents(latents)
    assert meta["scan_geometry"][0]["shape"] == list(nib.load(str(scan)).shape)
    assert main(["decode", "--checkpoint", str(run), "--latents", str(latents), "--output", str(tmp_path / "dec"),
                 "--no-progress"]) == 0
    assert "1 of them also in their encoded scan's own space" in capsys.readouterr().out
    assert main(["reconstruct", "--checkpoint", str(run), "--data", str(scan), "--output", str(tmp_path / "rec"),
                 "--no-progress"]) == 0
    stem = output_stems([scan])[0]
    decoded, affine = _load(tmp_path / "dec" / f"{stem}_decoded_native.nii.gz")
    recon, affine_recon = _load(tmp_path / "rec" / f"{stem}_recon_native.nii.gz")
    assert np.allclose(affine, nib.load(str(scan)).affine) and np.allclose(affine, affine_recon)
    np.testing.assert_allclose(decoded, recon, atol=1e-4)

    # a latents file without the scan's geometry (an older version's): the model grid only, and said so
    del meta["scan_geometry"]
    old = tmp_path / "old.safetensors"
    write_safetensors(old, {f"z.{i:02d}": z.contiguous() for i, z in enumerate(zs)}, {LATENTS_META_KEY: json.dumps(meta)})
    assert main(["decode", "--checkpoint", str(run), "--latents", str(old), "--output", str(tmp_path / "dec_old"),
                 "--no-progress"]) == 0
    assert "records no scan geometry" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "dec_old").iterdir()] == [f"{stem}_decoded.nii.gz"]

    # a hostile geometry is one clear error before anything is decoded
    meta["scan_geometry"] = [{"shape": [10**6, 10**6, 10**6], "affine": np.eye(4).tolist(),
                              "grid_to_world": np.eye(4).tolist()}]
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, {f"z.{i:02d}": z.contiguous() for i, z in enumerate(zs)}, {LATENTS_META_KEY: json.dumps(meta)})
    assert main(["decode", "--checkpoint", str(run), "--latents", str(bad), "--output", str(tmp_path / "dec_bad"),
                 "--no-progress"]) == 2
    _one_line_error(capsys, "the recorded scan geometry is not valid")
    assert not list((tmp_path / "dec_bad").glob("*.nii.gz"))


# --- interpolate ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_interpolation_ends_at_the_two_reconstructions(run, trained, files, tmp_path):
    out = tmp_path / "interp"
    assert main(["interpolate", str(files[0]), str(files[1]), "--checkpoint", str(run), "--steps", "4",
                 "--output-dir", str(out), "--no-progress"]) == 0
    frames = sorted(out.glob("interp_*.nii.gz"))
    assert [f.name for f in frames] == [f"interp_{k:02d}.nii.gz" for k in range(4)]
    assert (out / "interpolation.png").is_file()
    record = json.loads((out / "interpolation.json").read_text())
    assert record["t"] == pytest.approx([0, 1 / 3, 2 / 3, 1]) and record["method"] == "slerp"
    x, metas = load_preprocessed(files[:2], trained.preprocess_settings)
    with torch.no_grad():
        ends = trained.model.reconstruct(torch.from_numpy(x)[:, None])[:, 0].numpy()
    first, affine_first = _load(frames[0])
    last, affine_last = _load(frames[-1])
    np.testing.assert_allclose(first, ends[0], atol=1e-4)
    np.testing.assert_allclose(last, ends[1], atol=1e-4)
    assert np.allclose(np.diag(affine_first)[:3], metas[0]["voxel_size_mm"])
    assert np.allclose(np.diag(affine_last)[:3], metas[1]["voxel_size_mm"])
    for end, source in (("a", files[0]), ("b", files[1])):  # each end also in its own scan's space
        image, scan = nib.load(str(out / f"{end}_native.nii.gz")), nib.load(str(source))
        assert image.shape == scan.shape and np.allclose(image.affine, scan.affine)
    assert record["ends_native"] == {"a": "a_native.nii.gz", "b": "b_native.nii.gz"}
    linear = tmp_path / "linear"
    assert main(["interpolate", str(files[0]), str(files[1]), "--checkpoint", str(run), "--steps", "3",
                 "--method", "linear", "--output-dir", str(linear), "--no-progress"]) == 0
    assert len(list(linear.glob("interp_*.nii.gz"))) == 3


def test_slerp_keeps_the_norm_and_ends():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid, torch.tensor([0.7071, 0.7071, 0.0]),
                                                                             atol=1e-4)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear


def test_temperature_and_prior_level_checks():
    from verydeepvae.config import build_config
    from verydeepvae.errors import UserError
    from verydeepvae.generate import check_temperature, prior_level
    from verydeepvae.model import VeryDeepVAE

    model = VeryDeepVAE(build_config(preset="tiny"))  # 16³: levels 16, 8, 4, 2, 1
    assert check_temperature(model, 0.5) == 0.5 and check_temperature(model, [0.5]) == 0.5
    assert check_temperature(model, [1, 1, 1, 0.8, 0.5]) == [1, 1, 1, 0.8, 0.5]
    for bad in ([1, 1], -1, [1, 1, 1, 1, -0.1]):
        with pytest.raises(UserError):
            check_temperature(model, bad)
    assert prior_level(model, None) is None and prior_level(model, 16) == 0 and prior_level(model, 4) == 2
    with pytest.raises(UserError, match="--prior-above"):
        prior_level(model, 5)


def test_output_stems_are_unique():
    assert output_stems(["a/x.nii.gz", "b/x.nii.gz", "c/y.NII"]) == ["x", "x_2", "y"]


# --- user errors ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("args,fragment", [
    (["reconstruct", "--input", "/nonexistent/x.nii.gz", "--output-dir", "{tmp}/o"], "does not exist"),
    (["reconstruct", "--input", "{data}", "--output-dir", "{tmp}/o", "--prior-above", "5"], "--prior-above"),
    (["encode", "--input", "{data}", "--output", "{tmp}/latents.pt"], ".safetensors"),
    (["decode", "--latents", "{tmp}/missing.safetensors", "--output-dir", "{tmp}/o"], "does not exist"),
    (["interpolate", "{data}", "{data}", "--output-dir", "{tmp}/o"], "is a folder"),
    (["interpolate", "{first}", "{first}", "--steps", "1", "--output-dir", "{tmp}/o"], "--steps"),
])
def test_user_errors_exit_2_with_one_line(run, files, tmp_path, capsys, args, fragment):
    fill = {"tmp": str(tmp_path), "data": str(run.parent / "data"), "first": str(files[0])}
    argv = [a.format(**fill) for a in args] + ["--checkpoint", str(run), "--no-progress"]
    assert main(argv) == 2
    _one_line_error(capsys, fragment)


def test_not_a_nifti_input_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("hello")
    from verydeepvae.generate import input_files

    assert input_files(bad) == [bad.resolve()]
    from verydeepvae.data.nifti_load import PreprocessSettings
    from verydeepvae.errors import DataError

    with pytest.raises(DataError, match="notes.nii.gz"):
        load_preprocessed([bad], PreprocessSettings(resolution=16))
