"""Covariate files for conditional training (issue 12): matching scans to rows, kinds, the schema
and its standardisation, and every bad case as one line, exit status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from verydeepvae.cli import main
from verydeepvae.data import covariate_table as ct
from verydeepvae.data.covariates import Covariate, CovariateSchema, build_schema
from verydeepvae.data.run_covariates import read_scan_covariates
from verydeepvae.errors import CheckpointError, UserError

AGES = [61.0, 72.5, 55.0, 80.0, 67.0, 90.0]
SEXES = ["F", "M", "M", "F", "F", "M"]


@pytest.fixture
def scans(tmp_path) -> Path:
    from conftest import write_ellipsoids

    folder = tmp_path / "scans"
    write_ellipsoids(folder, 6, size=16)
    return folder


def _table(path: Path, header: list[str], rows: list[list], sep: str = "\t") -> Path:
    path.write_text("\n".join(sep.join(str(v) for v in row) for row in [header] + rows) + "\n")
    return path


def _train(tmp_path: Path, scans: Path, covariates: Path | None, names: str | None, *extra: str) -> int:
    args = ["train", "--preset", "tiny", "--data", str(scans), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "2", "--no-progress", "--set", "subjects_to_plot=0", "--set", "quality_samples=0"]
    if covariates is not None:
        args += ["--covariates", str(covariates)]
    if names is not None:
        args += ["--condition-on", names]
    return main(args + list(extra))


def _one_line(capsys, *fragments: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


# --- matching and reading ---------------------------------------------------------------------------


def test_participant_id_matches_bids_file_names_and_folders(tmp_path):
    files = [tmp_path / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz", tmp_path / "sub-10_ses-2_FLAIR.nii.gz",
             tmp_path / "other" / "sub-1.nii.gz"]
    table = ct.read_table(_table(tmp_path / "p.tsv", ["participant_id", "age"],
                                 [["sub-1", 50], ["sub-01", 60], ["sub-10", 70]]))
    found, problems = ct.match_rows(table, files)
    assert not problems
    assert [table.rows[found[str(f)]][1] for f in files] == ["60", "70", "50"]  # sub-1 is not sub-10's prefix


def test_filename_and_relative_path_columns(tmp_path, scans):
    files = sorted(scans.glob("*.nii.gz"))
    by_name = _table(tmp_path / "n.csv", ["filename", "age"], [[f.name, 50 + i] for i, f in enumerate(files)], ",")
    by_path = _table(tmp_path / "p.csv", ["path", "age"], [[f"scans/{f.name}", 50 + i] for i, f in enumerate(files)],
                     ",")
    for table in (by_name, by_path):
        found = read_scan_covariates(table, ["age"], files)
        assert not found.problems and [found.values[str(f)]["age"] for f in files] == [50.0 + i for i in range(6)]
        assert found.kinds == {"age": "numeric"}


def test_kinds_are_read_from_the_values_unless_given(tmp_path, scans):
    files = sorted(scans.glob("*.nii.gz"))
    table = _table(tmp_path / "c.tsv", ["filename", "age", "sex", "site"],
                   [[f.name, AGES[i], SEXES[i], i % 2] for i, f in enumerate(files)])
    assert read_scan_covariates(table, ["age", "sex", "site"], files).kinds == \
        {"age": "numeric", "sex": "categorical", "site": "numeric"}
    found = read_scan_covariates(table, ["site:categorical"], files)
    assert found.kinds == {"site": "categorical"} and found.values[str(files[1])]["site"] == "1"


def test_schema_standardises_with_the_training_scans_and_one_hot_encodes(tmp_path):
    values = {f"f{i}": {"age": AGES[i], "sex": SEXES[i]} for i in range(6)}
    train = ["f0", "f1", "f2", "f3"]
    schema = build_schema(values, train, {"age": "numeric", "sex": "categorical"}, "x.tsv", "filename")
    age = schema.get("age")
    assert age.mean == pytest.approx(np.mean(AGES[:4])) and age.sd == pytest.approx(np.std(AGES[:4]))
    assert (age.minimum, age.maximum) == (55.0, 80.0) and schema.get("sex").levels == ("F", "M")
    encoded = schema.encode([{"age": age.mean + 2 * age.sd, "sex": "M"}])
    np.testing.assert_allclose(encoded, [[2.0, 0.0, 1.0]], atol=1e-6)
    again = CovariateSchema.from_json(json.loads(json.dumps(schema.to_json())))
    assert again.covariates == schema.covariates and again.bank == schema.bank
    np.testing.assert_array_equal(again.encode(schema.bank_rows()), schema.encode(schema.bank_rows()))


def test_unspecified_covariates_are_drawn_near_the_specified_ones():
    bank = [[float(a), "M" if a > 70 else "F"] for a in range(50, 91)]
    schema = CovariateSchema((Covariate("age", "numeric", 70.0, 12.0, 50.0, 90.0), Covariate("sex", "categorical",
                                                                                             levels=("F", "M"))),
                             bank=bank)
    rows = schema.complete([{"age": 85.0}] * 20 + [{"sex": "F"}] * 20, np.random.default_rng(0))
    assert all(r["sex"] == "M" for r in rows[:20]) and all(r["age"] == 85.0 for r in rows[:20])
    assert all(r["age"] <= 70 and r["sex"] == "F" for r in rows[20:])


def test_guidance_references_move_only_the_requested_covariates_to_the_centre():
    from verydeepvae.conditional import resolve

    bank = [[float(a), "M" if a > 70 else "F"] for a in range(50, 91)]
    schema = CovariateSchema((Covariate("age", "numeric", 70.0, 12.0, 50.0, 90.0), Covariate("sex", "categorical",
                                                                                             levels=("F", "M"))),
                             bank=bank)
    centre = schema.encode(schema.bank_rows()).mean(axis=0)
    got = resolve(schema, [{"age": 85.0}, {"sex": "F"}, {}, {"age": 60.0, "sex": "M"}], seed=1)
    ref, vec = got.references, got.vectors
    assert ref[0, 0] == pytest.approx(centre[0]) and np.array_equal(ref[0, 1:], vec[0, 1:])  # age asked
    np.testing.assert_allclose(ref[1, 1:], centre[1:]) and np.testing.assert_array_equal(ref[1, 0], vec[1, 0])
    np.testing.assert_array_equal(ref[2], vec[2])  # nothing asked: guidance has nothing to scale
    np.testing.assert_allclose(ref[3], centre, rtol=1e-6)


def test_a_malformed_schema_in_a_checkpoint_is_one_clear_error():
    with pytest.raises(CheckpointError, match="unreadable covariate schema"):
        CovariateSchema.from_json({"covariates": [{"name": "age", "kind": "numeric", "mean": 1, "sd": 0,
                                                   "minimum": 0, "maximum": 1}]})


def test_an_unknown_condition_or_a_bad_value_names_the_covariate():
    schema = CovariateSchema((Covariate("age", "numeric", 70.0, 12.0, 50.0, 90.0),
                              Covariate("sex", "categorical", levels=("F", "M"))))
    with pytest.raises(UserError, match="not conditioned on 'agee'"):
        schema.get("agee")
    with pytest.raises(UserError, match="sex must be one of F, M"):
        schema.get("sex").parse("X")
    with pytest.raises(UserError, match="age must be a number"):
        schema.get("age").parse("old")
    assert "outside the training range" in schema.get("age").out_of_range(95.0)


# --- every bad case: one line, exit 2, nothing written ---------------------------------------------


def _bad_case(tmp_path, scans, name):
    """(covariates file, --condition-on, expected fragments) of one bad case."""
    header = ["participant_id", "age", "sex"]
    rows = [[f"subject_{i:03d}", AGES[i], SEXES[i]] for i in range(6)]
    path = tmp_path / "participants.tsv"
    if name == "missing_file":
        return tmp_path / "nope.tsv", "age", ["nope.tsv", "does not exist"]
    if name == "no_id_column":
        _table(path, ["subject", "age"], [[r[0], r[1]] for r in rows])
        return path, "age", ["none of the columns path, filename, participant_id"]
    if name == "unknown_column":
        _table(path, header, rows)
        return path, "agee", ["no column 'agee'", "did you mean 'age'"]
    if name == "scan_without_row":
        _table(path, header, rows[:5])
        return path, "age", ["no row for scan", "subject_005.nii.gz"]
    if name == "missing_value":
        rows[2][1] = "n/a"
        _table(path, header, rows)
        return path, "age", ["row 4 (subject_002), column age: missing value"]
    if name == "empty_value":
        rows[3][2] = ""
        _table(path, header, rows)
        return path, "age,sex", ["row 5 (subject_003), column sex: missing value"]
    if name == "non_numeric":
        rows[1][1] = "seventy"
        _table(path, header, rows)
        return path, "age", ["row 3 (subject_001), column age: 'seventy' is not a finite number"]
    if name == "duplicate_rows":
        _table(path, header, rows + [rows[0]])
        return path, "age", ["rows 2 and 8 both have participant_id 'subject_000'"]
    if name == "ragged_row":
        path.write_text("participant_id\tage\tsex\nsubject_000\t61\n")
        return path, "age", ["row 2: 2 fields, but the header has 3"]
    if name == "constant_column":
        _table(path, header, [[r[0], 60, r[2]] for r in rows])
        return path, "age", ["column age has the same value"]
    if name == "bad_kind":
        _table(path, header, rows)
        return path, "age:ordinal", ["must be numeric or categorical"]
    raise AssertionError(name)


BAD_CASES = ["missing_file", "no_id_column", "unknown_column", "scan_without_row", "missing_value", "empty_value",
             "non_numeric", "duplicate_rows", "ragged_row", "constant_column", "bad_kind"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_covariate_file_is_one_line_exit_2_and_nothing_written(tmp_path, scans, capsys, case):
    covariates, names, fragments = _bad_case(tmp_path, scans, case)
    assert _train(tmp_path, scans, covariates, names) == 2
    _one_line(capsys, *fragments)
    assert not (tmp_path / "run").exists()


def test_several_problems_are_still_one_line(tmp_path, scans, capsys):
    path = _table(tmp_path / "p.tsv", ["participant_id", "age"], [[f"subject_{i:03d}", AGES[i]] for i in range(3)])
    assert _train(tmp_path, scans, path, "age") == 2
    _one_line(capsys, "no row for scan", "and 2 more scans with covariate problems", "--skip-bad-files")


@pytest.mark.parametrize("args, fragment", [
    (["--covariates", "x.tsv"], "covariates_file (--covariates) needs condition_on"),
    (["--condition-on", "age"], "condition_on with data_path needs covariates_file"),
    (["--condition-on", "age,age"], "condition_on names 'age' twice"),
])
def test_inconsistent_options_are_one_line(tmp_path, scans, capsys, args, fragment):
    assert main(["train", "--preset", "tiny", "--data", str(scans), "--output-dir", str(tmp_path / "run"),
                 "--no-progress", *args]) == 2
    _one_line(capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_an_unknown_phantom_factor_is_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--condition-on", "ages",
                 "--no-progress"]) == 2
    _one_line(capsys, "no factor 'ages'", "did you mean 'age'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_skip_bad_files_leaves_scans_with_bad_rows_out(tmp_path, scans, capsys):
    rows = [[f"subject_{i:03d}", AGES[i], SEXES[i]] for i in range(5)]
    rows[1][1] = "n/a"
    path = _table(tmp_path / "p.tsv", ["participant_id", "age", "sex"], rows)
    assert _train(tmp_path, scans, path, "age,sex", "--skip-bad-files") == 0
    run = tmp_path / "run"
    skipped = (run / "skipped_files.txt").read_text()
    assert "subject_001.nii.gz" in skipped and "subject_005.nii.gz" in skipped and "missing value" in skipped
    recorded = json.loads((run / "covariates.json").read_text())
    assert len(recorded["files"]) == 4 and not any("subject_001" in f for f in recorded["files"])
    assert "skipped 2 of 6 input files" in capsys.readouterr().out


def test_condition_on_takes_one_name_or_a_comma_separated_string():
    from verydeepvae.config import build_config

    assert build_config(preset="tiny", overrides={"condition_on": "age"}).condition_on == ["age"]
    assert build_config(preset="tiny", overrides={"condition_on": "age, sex:categorical"}).condition_on == \
        ["age", "sex:categorical"]
    with pytest.raises(UserError, match="must name at least one covariate"):
        build_config(preset="tiny", overrides={"condition_on": []})
