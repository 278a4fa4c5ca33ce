"""What each dependency is for: nilearn (with pandas and scikit-learn) only rebuilds the packaged
atlas, so it is the optional [atlas] extra; the README's table lists every dependency."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from verydeepvae.errors import DataError

tomllib = pytest.importorskip("tomllib")
REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_nilearn_is_the_optional_atlas_extra_not_a_dependency():
    project = _project()
    assert "nilearn" not in {_name(r) for r in project["dependencies"]}
    assert {_name(r) for r in project["optional-dependencies"]["atlas"]} == {"nilearn"}


def test_everything_but_the_atlas_rebuild_works_without_nilearn(tmp_path):
    code = (
        "import sys; sys.modules['nilearn'] = None\n"  # any import of nilearn now fails
        "from verydeepvae.data.phantom import generate_population\n"
        f"paths = generate_population(2, 16, {str(tmp_path / 'ph')!r}, 0)\n"
        "import verydeepvae.cli, verydeepvae.generate, verydeepvae.latents, verydeepvae.evaluate, verydeepvae.train.loop\n"
        "print(len(paths))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "2"


def test_rebuilding_the_atlas_without_nilearn_says_how_to_get_it(monkeypatch, capsys):
    import runpy

    from verydeepvae.data import atlas

    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    with pytest.raises(DataError, match=r"pip install 'verydeepvae\[atlas\]'"):
        atlas.nilearn_data_dir()
    script = runpy.run_path(str(REPO / "scripts" / "make_atlas.py"), run_name="make_atlas")
    assert script["main"](["--out", "/nonexistent/never_written.nii.gz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verydeepvae[atlas]" in err[0], err


def test_the_readme_says_what_every_dependency_is_for():
    project = _project()
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| dependency |"):]
    table = table[:table.index("\n\n")]
    listed = {_name(name) for row in table.splitlines()[2:] for name in re.findall(r"`([^`]+)`", row.split("|")[1])}
    wanted = {_name(r) for r in project["dependencies"]} | {_name(r) for extra in project["optional-dependencies"].values()
                                                            for r in extra}
    assert wanted <= listed, wanted - listed
