"""The Python API: docs/python-api.md's code blocks run here, in order, in one namespace (so the
page cannot rot), and importing the package changes nothing in the process."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_the_python_api_page_runs_as_written(tmp_path, monkeypatch):
    from conftest import write_ellipsoids

    from verydeepvae.cli import main

    monkeypatch.chdir(tmp_path)
    files = write_ellipsoids(tmp_path / "scans", 2, size=16)
    files[0].rename(tmp_path / "scans" / "a.nii.gz")
    files[1].rename(tmp_path / "scans" / "b.nii.gz")
    write_ellipsoids(tmp_path / "data", 8, size=16, seed=3)
    assert main(["train", "--preset", "tiny", "--data", "data", "--output-dir", "runs/api-demo", "--max-steps", "2",
                 "--no-progress", "--set", "subjects_to_plot=0", "--set", "num_workers=0"]) == 0
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (our own documentation)
    assert len(list((tmp_path / "out" / "samples").glob("sample_*.nii.gz"))) == 4
    assert (tmp_path / "out" / "empty.nii.gz").is_file()


def test_api_samples_are_the_clis_samples(tmp_path):
    import nibabel as nib
    from conftest import write_ellipsoids

    import verydeepvae
    from verydeepvae.cli import main

    write_ellipsoids(tmp_path / "data", 8, size=16)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--output-dir", str(run),
                 "--max-steps", "2", "--no-progress", "--set", "subjects_to_plot=0", "--set", "num_workers=0"]) == 0
    assert main(["sample", "--checkpoint", str(run), "--output-dir", str(tmp_path / "cli"), "--num", "3",
                 "--seed", "5", "--temperature", "0.7", "--no-progress"]) == 0
    volumes = verydeepvae.load(run, device="cpu").sample(3, temperature=0.7, seed=5)
    for i in range(3):
        written = np.asarray(nib.load(str(tmp_path / "cli" / f"sample_{i:04d}.nii.gz")).dataobj)
        assert np.allclose(written, volumes[i], atol=1e-6)
    reloaded = nib.load(str(volumes.save(tmp_path / "api")[0]))
    assert np.allclose(reloaded.affine, volumes.affines[0])


def test_wrong_inputs_are_one_clear_error(tmp_path):
    import verydeepvae
    from verydeepvae.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        verydeepvae.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="weights must be"):
        verydeepvae.load(tmp_path, weights="best")


def test_importing_the_package_changes_nothing_and_loads_no_torch():
    code = ("import os, sys; before = dict(os.environ); import verydeepvae; "
            "assert dict(os.environ) == before, 'environment changed'; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert sorted(verydeepvae.__all__) == ['Model', 'Volumes', '__version__', 'fit', 'load', 'save_nifti']; "
            "assert callable(verydeepvae.load) and 'torch' in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_command_line_is_built_without_torch_monai_or_matplotlib():
    """`verydeepvae --help` and every command's start pay only for what the command uses: building
    the parser once imported the whole evaluation (MONAI, SciPy, torch), about 6 s on 2 cores."""
    code = ("import sys; from verydeepvae.cli import build_parser; parser = build_parser(); "
            "heavy = sorted({'torch', 'monai', 'matplotlib', 'scipy'} & {m.split('.')[0] for m in sys.modules}); "
            "assert not heavy, heavy; "
            "assert 'calibrate-guidance' in parser.format_help()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _cli_environment(env: dict[str, str]) -> list[str]:
    """OMP_WAIT_POLICY and GOMP_SPINCOUNT as a CLI command leaves them, started with ``env``."""
    code = ("import os, sys; from verydeepvae.cli import main; main(['config', 'show', '--preset', 'tiny']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return result.stderr.strip().splitlines()[-1].split()


def test_the_cli_asks_for_a_bounded_openmp_spin_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _cli_environment(env) == ["None", "300000"]
    assert _cli_environment({**env, "OMP_WAIT_POLICY": "PASSIVE"}) == ["PASSIVE", "None"]
    assert _cli_environment({**env, "GOMP_SPINCOUNT": "INFINITE"}) == ["None", "INFINITE"]


def test_the_cli_sets_malloc_thresholds_unless_the_user_set_them(monkeypatch):
    from verydeepvae import process_defaults

    calls = []
    monkeypatch.setattr(process_defaults, "set_mmap_threshold", lambda size: calls.append(("mmap", size)))
    monkeypatch.setattr(process_defaults, "set_trim_threshold", lambda size: calls.append(("trim", size)))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    process_defaults.apply_cli_defaults()
    assert calls == [("mmap", 16 * 1024 * 1024), ("trim", 1024 * 1024 * 1024)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    calls.clear()
    process_defaults.apply_cli_defaults()
    assert calls == []
    if platform.libc_ver()[0] == "glibc":
        monkeypatch.undo()
        assert process_defaults.set_mmap_threshold(16 * 1024 * 1024)  # glibc accepts both
        assert process_defaults.set_trim_threshold(1024 * 1024 * 1024)


def test_the_package_is_typed():
    import verydeepvae

    assert (Path(verydeepvae.__file__).parent / "py.typed").is_file()
