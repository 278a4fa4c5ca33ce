"""The package's shape, checked by reading its source: imports point down the layers (function-level
imports included), and every function and file stays small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "verydeepvae"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 450

# importer (a module or a package of ours) -> what it must never import: the layers above it
COMMANDS = ("cli", "cli_options", "cli_conditional", "commands", "legacy", "api", "demo_steps")
ABOVE_INFERENCE = ("train", "generate", "latents", "evaluate", "counterfactual") + COMMANDS
ABOVE_BLOCKS = ("checkpoint", "inference", "sampling", "scan_files", "conditional", "guidance") + ABOVE_INFERENCE
FORBIDDEN = {
    **{name: ABOVE_BLOCKS for name in ("model", "data", "config", "config_check", "config_text", "config_names")},
    **{name: ABOVE_INFERENCE for name in ("checkpoint", "inference", "sampling", "scan_files")},
    "train": ("generate", "latents", "evaluate", "counterfactual") + COMMANDS,
    **{name: ("train",) + COMMANDS for name in ("generate", "latents", "evaluate", "counterfactual")},
}
ONLY_ITSELF = ("metrics",)  # pure functions on arrays: nothing else of ours


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> list[str]:
    """``src/verydeepvae/train/loop.py`` -> ``["train", "loop"]`` (a package is its folder)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """Every module of ours that ``path`` imports, anywhere in it, as (line, parts below verydeepvae).
    ``from . import x`` counts as importing ``x``."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "verydeepvae":
                    found.append((node.lineno, alias.name.split(".")[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "verydeepvae":
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module:
                found.append((node.lineno, target))
            else:  # from . import a, b
                found.extend((node.lineno, target + [alias.name]) for alias in node.names)
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sources():
        own = module_name(path)
        if not own:
            continue
        for line, target in imported_modules(path):
            upward = own[0] in FORBIDDEN and target and target[0] in FORBIDDEN[own[0]]
            outside = own[0] in ONLY_ITSELF and target[:1] != own[:1]
            if upward or outside:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target) or 'verydeepvae'}")
    return problems


def test_imports_point_down_the_layers():
    assert upward_imports() == []


def test_the_import_walk_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "verydeepvae"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "vae.py").write_text("def f():\n    from ..generate import x\n    from ..train import loop\n")
    (fake / "metrics").mkdir()
    (fake / "metrics" / "a.py").write_text("from . import b\nfrom ..config import Config\nimport verydeepvae.viz\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert upward_imports() == ["metrics/a.py:2 imports config", "metrics/a.py:3 imports viz",
                                "model/vae.py:2 imports generate", "model/vae.py:3 imports train"]


def long_functions() -> list[str]:
    out = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - start + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    return out


def long_files() -> list[str]:
    out = []
    for path in sources():
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines >= MAX_FILE_LINES:
            out.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
    return out


def test_no_function_is_longer_than_60_lines():
    assert long_functions() == []


def test_no_source_file_reaches_450_lines():
    assert long_files() == []
