"""Conditional generation end to end on one tiny model trained on the phantom population with
``--condition-on age,sex`` (issue 12): the checkpoint's schema, sample --condition/--conditions,
counterfactual, reconstruct, evaluate, the Python API, resume, and the one-line errors.  Nothing
here judges quality: a 6-step model only has to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from verydeepvae.cli import main
from verydeepvae.checkpoint import list_checkpoints, load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TRAIN = ["--preset", "tiny", "--no-progress", "--set", "phantom_num=12", "--set", "subjects_to_plot=1",
         "--set", "validation_every=3", "--set", "checkpoint_every=3", "--set", "quality_samples=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conditional") / "run"
    assert main(["train", *TRAIN, "--output-dir", str(out), "--max-steps", "6", "--condition-on", "age,sex"]) == 0
    return out


@pytest.fixture(scope="module")
def phantoms(run) -> list[Path]:
    return sorted((run / "cache").glob("phantom_*/sub-*.nii.gz"))


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _one_line(capsys, *fragments: str) -> None:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and all(f in err[0] for f in fragments), err


def test_the_checkpoint_records_the_schema_and_standardisation_round_trips(run):
    checkpoint = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    schema = checkpoint.meta["covariates"]
    assert [c["name"] for c in schema["covariates"]] == ["age", "sex"] and schema["dim"] == 3
    assert checkpoint.config.condition_on == ["age", "sex"]
    record = json.loads((run / "run.json").read_text())
    assert [c["name"] for c in record["sessions"][-1]["data"]["covariates"]["covariates"]] == ["age", "sex"]
    final = json.loads((run / "samples" / "samples.json").read_text())
    assert len(final["conditions"]) == 1 and set(final["conditions"][0]["covariates"]) == {"age", "sex"}
    recorded = json.loads((run / "covariates.json").read_text())
    split = json.loads((run / "split.json").read_text())
    ages = np.array([recorded["files"][f]["age"] for f in split["train"]])
    age = schema["covariates"][0]
    assert age["mean"] == pytest.approx(ages.mean()) and age["sd"] == pytest.approx(ages.std())
    assert (age["minimum"], age["maximum"]) == (pytest.approx(ages.min()), pytest.approx(ages.max()))
    assert schema["covariates"][1]["levels"] == ["F", "M"]
    from verydeepvae.generate import open_trained

    trained = open_trained(run, device="cpu")
    assert trained.model.covariate_dim == 3 and len(trained.model.covariate_bank) == len(split["train"])
    # the voxel noise is measured for a conditional model too, each volume given its covariates
    assert trained.model.voxel_noise is not None and checkpoint.meta["voxel_noise"]["num_volumes"] >= 4
    np.testing.assert_allclose(trained.covariates.encode([{"age": ages.mean(), "sex": "M"}]), [[0.0, 0.0, 1.0]],
                               atol=1e-5)


def test_config_show_prints_the_covariates(run, capsys):
    assert main(["config", "show", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    assert "conditioned on age, sex (3 inputs)" in out and "sex: categorical, one-hot over F, M" in out


def test_sample_with_conditions_records_each_volume(run, tmp_path, capsys):
    args = ["sample", "--checkpoint", str(run), "--num", "3", "--seed", "2", "--no-progress"]
    assert main([*args, "--condition", "age=80", "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--condition", "age=80", "--output-dir", str(tmp_path / "b")]) == 0
    assert main([*args, "--condition", "age=50", "--output-dir", str(tmp_path / "c")]) == 0
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert [c["file"] for c in record["conditions"]] == [f"sample_{i:04d}.nii.gz" for i in range(3)]
    assert all(c["covariates"]["age"] == 80.0 and c["drawn"] == ["sex"] and c["covariates"]["sex"] in ("F", "M")
               for c in record["conditions"])
    a, b, c = (_read(tmp_path / d / "sample_0000.nii.gz") for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_with_a_conditions_file(run, tmp_path):
    table = tmp_path / "want.tsv"
    table.write_text("age\tsex\n60\tF\n\tM\n85\t\n")
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run), "--conditions", str(table), "--output-dir", str(out),
                 "--no-progress"]) == 0
    conditions = json.loads((out / "samples.json").read_text())["conditions"]
    assert len(list(out.glob("sample_*.nii.gz"))) == 3
    assert [c["drawn"] for c in conditions] == [[], ["age"], ["sex"]]
    assert conditions[0]["covariates"] == {"age": 60.0, "sex": "F"} and conditions[1]["covariates"]["sex"] == "M"


def test_an_age_outside_the_training_range_gets_a_notice(run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(run), "--num", "1", "--condition", "age=120",
                 "--output-dir", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "age=120 is outside the training range" in capsys.readouterr().err


@pytest.mark.parametrize("condition, fragment", [
    (["--condition", "agee=70"], "not conditioned on 'agee'"),
    (["--condition", "sex=X"], "sex must be one of F, M"),
    (["--condition", "age=old"], "age must be a number"),
    (["--condition", "age"], "--condition expects name=value"),
])
def test_sample_errors_are_one_line(run, tmp_path, capsys, condition, fragment):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run), "--output-dir", str(out), "--no-progress", *condition]) == 2
    _one_line(capsys, fragment)
    assert not out.exists()


def test_guidance_is_recorded_changes_the_samples_and_reaches_the_api_and_evaluate(run, tmp_path):
    import verydeepvae

    args = ["sample", "--checkpoint", str(run), "--num", "2", "--seed", "3", "--condition", "age=85", "--no-progress"]
    assert main([*args, "--output-dir", str(tmp_path / "w1")]) == 0
    assert main([*args, "--guidance", "3", "--output-dir", str(tmp_path / "w3")]) == 0
    assert json.loads((tmp_path / "w3" / "samples.json").read_text())["guidance"] == 3.0
    assert json.loads((tmp_path / "w1" / "samples.json").read_text())["guidance"] == 1.0
    w1, w3 = (_read(tmp_path / d / "sample_0000.nii.gz") for d in ("w1", "w3"))
    assert not np.array_equal(w1, w3)
    # nothing requested: guidance scales nothing (drawn covariates are never amplified)
    free = ["sample", "--checkpoint", str(run), "--num", "2", "--seed", "3", "--no-progress"]
    assert main([*free, "--output-dir", str(tmp_path / "f1")]) == 0
    assert main([*free, "--guidance", "3", "--output-dir", str(tmp_path / "f3")]) == 0
    np.testing.assert_array_equal(_read(tmp_path / "f1" / "sample_0001.nii.gz"),
                                  _read(tmp_path / "f3" / "sample_0001.nii.gz"))
    model = verydeepvae.load(run, device="cpu")
    api = model.sample(2, seed=3, conditions={"age": 85}, guidance=3.0)
    np.testing.assert_allclose(api.data[0], w3, atol=1e-6)
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(run), "--output-dir", str(out), "--num-samples", "4",
                 "--max-train", "4", "--num-pairs", "4", "--guidance", "2,sex=1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    recorded = {"default": 2.0, "per_covariate": {"sex": 1.0}}
    assert report["options"]["guidance"] == recorded and report["conditional"]["guidance"] == recorded
    assert "Covariate guidance sex 1 (others 2)" in (out / "report.md").read_text()


def test_guidance_per_covariate_scales_only_the_named_covariates(run, tmp_path):
    import verydeepvae

    args = ["sample", "--checkpoint", str(run), "--num", "2", "--seed", "3", "--condition", "age=85", "--no-progress"]
    assert main([*args, "--guidance", "3", "--output-dir", str(tmp_path / "w3")]) == 0
    assert main([*args, "--guidance", "age=3,sex=0", "--output-dir", str(tmp_path / "a3")]) == 0
    assert main([*args, "--guidance", "sex=3", "--output-dir", str(tmp_path / "s3")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "w1")]) == 0
    assert json.loads((tmp_path / "a3" / "samples.json").read_text())["guidance"] == {
        "default": 1.0, "per_covariate": {"age": 3.0, "sex": 0.0}}
    # only age was asked for (sex drawn), so the scale of sex does not matter
    w3, a3, s3, w1 = (_read(tmp_path / d / "sample_0000.nii.gz") for d in ("w3", "a3", "s3", "w1"))
    np.testing.assert_array_equal(a3, w3)  # bit for bit: a scale-1 or unmoved covariate adds an exact zero
    np.testing.assert_array_equal(s3, w1)
    model = verydeepvae.load(run, device="cpu")
    for guidance in ({"age": 3}, "age=3"):
        np.testing.assert_allclose(model.sample(2, seed=3, conditions={"age": 85}, guidance=guidance).data[0], w3,
                                   atol=1e-6)
    both = ["sample", "--checkpoint", str(run), "--num", "2", "--seed", "3", "--condition", "age=85",
            "--condition", "sex=M", "--no-progress"]
    assert main([*both, "--guidance", "3", "--output-dir", str(tmp_path / "b3")]) == 0
    assert main([*both, "--guidance", "3,sex=1", "--output-dir", str(tmp_path / "b31")]) == 0
    assert not np.allclose(_read(tmp_path / "b3" / "sample_0000.nii.gz"),
                           _read(tmp_path / "b31" / "sample_0000.nii.gz"), atol=1e-5)


def test_counterfactual_guidance_keeps_the_reconstruction_and_moves_further(run, phantoms, tmp_path):
    own = ["--observed", "age=61", "--observed", "sex=F"]
    base = ["counterfactual", "--checkpoint", str(run), "--input", str(phantoms[1]), *own, "--sweep", "age=61,90",
            "--no-progress"]
    assert main([*base, "--output-dir", str(tmp_path / "w1")]) == 0
    assert main([*base, "--guidance", "3", "--output-dir", str(tmp_path / "w3")]) == 0
    stem = phantoms[1].name.split(".")[0]
    assert json.loads((tmp_path / "w3" / "counterfactuals.json").read_text())["guidance"] == 3.0
    own1, own3 = (_read(tmp_path / d / f"{stem}_age-61.nii.gz") for d in ("w1", "w3"))
    np.testing.assert_allclose(own3, own1, atol=1e-5)
    old1, old3 = (_read(tmp_path / d / f"{stem}_age-90.nii.gz") for d in ("w1", "w3"))
    assert not np.allclose(old1, old3, atol=1e-5)
    # per covariate: the sweep changes age only, so a scale for sex alone changes nothing
    assert main([*base, "--guidance", "sex=4", "--output-dir", str(tmp_path / "s4")]) == 0
    assert json.loads((tmp_path / "s4" / "counterfactuals.json").read_text())["guidance"] == {
        "default": 1.0, "per_covariate": {"sex": 4.0}}
    np.testing.assert_allclose(_read(tmp_path / "s4" / f"{stem}_age-90.nii.gz"), old1, atol=1e-6)


@pytest.mark.parametrize("value, fragment", [("-1", "--guidance scales must be numbers >= 0"),
                                             ("nan", "--guidance scales must be numbers >= 0"),
                                             ("age=-2", "--guidance scales must be numbers >= 0"),
                                             ("age=2,weight=3", "not conditioned on 'weight'; its covariates are"),
                                             ("age=", "--guidance expects W or NAME=W"),
                                             ("=3", "--guidance expects W or NAME=W"),
                                             ("2,3", "only the first item may be a bare scale")])
def test_bad_guidance_is_one_line(run, tmp_path, capsys, value, fragment):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run), "--guidance", value, "--output-dir", str(out),
                 "--no-progress"]) == 2
    _one_line(capsys, fragment)
    assert not out.exists()


def test_a_conditions_file_with_an_unknown_column_is_one_line(run, tmp_path, capsys):
    table = tmp_path / "want.csv"
    table.write_text("age,site\n60,1\n")
    assert main(["sample", "--checkpoint", str(run), "--conditions", str(table), "--output-dir",
                 str(tmp_path / "s"), "--no-progress"]) == 2
    _one_line(capsys, "column 'site' is not a covariate of the model")


def test_counterfactual_sweep_writes_volumes_differences_and_a_strip(run, phantoms, tmp_path, capsys):
    out = tmp_path / "cf"
    assert main(["counterfactual", "--checkpoint", str(run), "--input", str(phantoms[0]), "--condition", "age=85",
                 "--sweep", "age=50:90:20", "--output-dir", str(out), "--no-progress"]) == 0
    stem = phantoms[0].name.split(".")[0]
    for name in ("input", "recon", "counterfactual", "difference", "age-50", "age-70", "age-90"):
        assert (out / f"{stem}_{name}.nii.gz").is_file(), name
    assert (out / f"{stem}_sweep.png").is_file()
    record = json.loads((out / "counterfactuals.json").read_text())
    scan = record["scans"][0]
    assert scan["observed_from"].endswith("covariates.json") and record["mode"] == "noise"
    assert [o["covariates"]["age"] for o in scan["outputs"]] == [85.0, 50.0, 70.0, 90.0]
    cf, recon, diff = (_read(out / f"{stem}_{n}.nii.gz") for n in ("counterfactual", "recon", "difference"))
    np.testing.assert_allclose(diff, cf - recon, atol=1e-6)
    image = nib.load(str(out / f"{stem}_counterfactual.nii.gz"))
    np.testing.assert_allclose(image.affine, nib.load(str(out / f"{stem}_input.nii.gz")).affine)


def test_the_counterfactual_at_the_scans_own_values_is_its_reconstruction(run, phantoms, tmp_path):
    out, rec = tmp_path / "cf", tmp_path / "rec"
    own = ["--observed", "age=61", "--observed", "sex=F"]
    assert main(["counterfactual", "--checkpoint", str(run), "--input", str(phantoms[1]), *own, "--condition",
                 "age=61", "--output-dir", str(out), "--no-progress"]) == 0
    assert main(["reconstruct", "--checkpoint", str(run), "--input", str(phantoms[1]), *own, "--output-dir", str(rec),
                 "--no-progress"]) == 0
    stem = phantoms[1].name.split(".")[0]
    recon = _read(rec / f"{stem}_recon.nii.gz")
    np.testing.assert_allclose(_read(out / f"{stem}_counterfactual.nii.gz"), recon, atol=1e-5)
    np.testing.assert_allclose(_read(out / f"{stem}_recon.nii.gz"), recon, atol=1e-5)


def test_a_scan_without_covariates_is_one_line(run, phantoms, tmp_path, capsys):
    lonely = tmp_path / "elsewhere"
    lonely.mkdir()
    shutil.copy(phantoms[0], lonely / "scan.nii.gz")
    out = tmp_path / "cf"
    assert main(["counterfactual", "--checkpoint", str(run), "--input", str(lonely / "scan.nii.gz"), "--condition",
                 "age=80", "--output-dir", str(out), "--no-progress"]) == 2
    _one_line(capsys, "no age for scan", "--observed age=VALUE")
    assert not out.exists()
    assert main(["counterfactual", "--checkpoint", str(run), "--input", str(lonely / "scan.nii.gz"), "--output-dir",
                 str(out), "--observed", "age=70", "--observed", "sex=M", "--no-progress"]) == 2
    _one_line(capsys, "needs --condition NAME=VALUE and/or --sweep")


def test_encode_refuses_a_conditional_model(run, phantoms, tmp_path, capsys):
    assert main(["encode", "--checkpoint", str(run), "--input", str(phantoms[0]), "--output",
                 str(tmp_path / "z.safetensors")]) == 2
    _one_line(capsys, "encode does not support conditional models yet")


def test_evaluate_adds_the_conditional_section(run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(run), "--output-dir", str(out), "--num-samples", "4",
                 "--max-train", "4", "--num-pairs", "4", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    section = report["conditional"]
    assert set(section["per_covariate"]) == {"age", "sex"} and report["model"]["conditioned_on"] == ["age", "sex"]
    age = section["per_covariate"]["age"]
    assert len(age["values"]) == 5 and len(age["requested"]) == 5 * section["per_point"]
    assert "ventricle_ml" in age["measures"] and "slope_ratio" in age["measures"]["ventricle_ml"]
    assert "counterfactual" in age and "measures" in age["counterfactual"]
    truth = age["counterfactual"]["truth"]  # the held-out scans are phantoms: their true counterfactuals too
    assert set(truth["monotonic_fraction"]) == set(age["counterfactual"]["measures"])
    assert np.isfinite(truth["psnr_counterfactual_db"]) and np.isfinite(truth["psnr_unchanged_db"])
    assert section["per_covariate"]["sex"]["values"] == ["F", "M"]
    text = (out / "report.md").read_text()
    assert "## Conditional generation" in text and "counterfactual_age.png" in text
    assert "true counterfactuals: monotonic" in text
    assert (out / "figures" / "conditional_age_samples.png").is_file()


def test_the_python_api_samples_what_the_cli_samples(run, tmp_path):
    import verydeepvae

    model = verydeepvae.load(run, device="cpu")
    assert model.covariates.names == ["age", "sex"]
    volumes = model.sample(2, seed=4, conditions={"age": 75, "sex": "F"})
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--seed", "4", "--condition", "age=75",
                 "--condition", "sex=F", "--output-dir", str(tmp_path / "cli"), "--no-progress"]) == 0
    np.testing.assert_allclose(volumes.data[1], _read(tmp_path / "cli" / "sample_0001.nii.gz"), atol=1e-6)
    assert volumes.conditions == [{"age": 75.0, "sex": "F"}] * 2
    scans = sorted((run / "cache").glob("phantom_*/sub-*.nii.gz"))[:1]
    cf = model.counterfactual(scans, sweep=("age", [50, 90]))
    assert cf.data.shape == (2, 16, 16, 16) and [c["age"] for c in cf.conditions] == [50.0, 90.0]


def test_resume_keeps_the_runs_covariates(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "covariates.json").read_text()
    assert main(["train", *TRAIN, "--output-dir", str(copy), "--max-steps", "8", "--condition-on", "age,sex",
                 "--resume"]) == 0
    assert f"next: verydeepvae calibrate-guidance --checkpoint {copy}" in capsys.readouterr().out
    assert (copy / "covariates.json").read_text() == before
    assert load_checkpoint(list_checkpoints(copy / "checkpoints")[-1]).step == 8


def test_resume_refuses_other_covariates(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["train", *TRAIN, "--output-dir", str(copy), "--max-steps", "8", "--condition-on", "age",
                 "--resume"]) == 2
    _one_line(capsys, "another architecture", "condition_on")


def test_an_unconditional_checkpoint_is_unchanged_and_takes_no_conditions(tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["train", *TRAIN, "--output-dir", str(out), "--max-steps", "2"]) == 0
    assert "calibrate-guidance" not in capsys.readouterr().out
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert "covariates" not in checkpoint.meta and checkpoint.config.condition_on is None
    assert not any(".condition." in k for k in checkpoint.tensors) and not (out / "covariates.json").exists()
    # a checkpoint written before conditioning existed has neither key in its configuration
    from verydeepvae.checkpoint import save_checkpoint

    meta = dict(checkpoint.meta)
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("condition_on", "covariates_file")}
    old = save_checkpoint(tmp_path / "old", checkpoint.step, checkpoint.tensors, meta)
    assert main(["sample", "--checkpoint", str(old), "--num", "1", "--output-dir", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    assert "conditions" not in json.loads((tmp_path / "s" / "samples.json").read_text())
    assert main(["sample", "--checkpoint", str(old), "--num", "1", "--condition", "age=70", "--output-dir",
                 str(tmp_path / "t"), "--no-progress"]) == 2
    _one_line(capsys, "unconditional model", "--condition-on")
    assert main(["sample", "--checkpoint", str(old), "--num", "1", "--guidance", "2", "--output-dir",
                 str(tmp_path / "u"), "--no-progress"]) == 2
    _one_line(capsys, "--guidance is for conditional models")


def test_the_python_api_in_docs_conditional_runs_as_written(run, tmp_path, monkeypatch):
    import re

    from verydeepvae.data.phantom import generate_population

    doc = Path(__file__).resolve().parents[1] / "docs" / "conditional.md"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "runs" / "conditional")
    generate_population(2, 16, tmp_path / "phantoms", seed=9, montage=False, progress=False)
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["again"].data.shape == (1, 16, 16, 16)


def test_the_conditional_benchmark_runs_with_per_covariate_guidance(run, tmp_path):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "conditional.py"
    out = tmp_path / "stats"
    done = subprocess.run([sys.executable, str(bench), "--run", str(run), "--output", str(out), "--heldout-num", "6",
                           "--per-group", "4", "--per-point", "2", "--sweep", "50:90:20", "--counterfactuals", "2",
                           "--guidance", "age=2", "--batch-size", "4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["guidance"] == {"default": 1.0, "per_covariate": {"age": 2.0}}
    realism = stats["sweeps"]["age"]["frechet_ratio"]
    assert set(realism) == {"guided", "unguided", "still_brains"}
    cf = stats["counterfactual"]
    volumes = np.asarray(cf["ventricle_ml_per_scan"])
    assert volumes.shape == (2, len(cf["ages"])) and np.all(volumes >= 0)
    falls = [a - b for row in volumes for a, b in zip(row[:-1], row[1:])]  # volume at one age minus the next
    assert cf["largest_step_back_ml"] == pytest.approx(max([0.0, *falls]))
    assert "Fréchet ratio to the held-out phantoms" in done.stdout and "guidance age 2 (others 1)" in done.stdout
    assert (out / "aged_50_to_90.png").is_file() and (out / "samples_by_age.png").is_file()
    truth = cf["truth"]  # held-out phantoms: their true counterfactuals are measured beside the model's
    assert np.asarray(truth["ventricle_ml_per_scan"]).shape == volumes.shape
    assert 0.0 <= truth["fraction_monotonic"] <= 1.0 and np.isfinite(truth["psnr_to_truth_db"])
    assert "true counterfactuals" in done.stdout
