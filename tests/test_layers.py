"""The import layers of engine/, read from the source (nothing imported): lower layers never import higher ones,
no CLI imports another, and no module imports another engine module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"

# (importing file, imported module, private name): each with its reason.
PRIVATE_ALLOWED = {
    ("engine/ops.py", "engine", "_laclip_ext"),  # the compiled extension; ops is its one importer
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import in the file, at any depth (function-level too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names]))
    return out


def _files(*places: str) -> list[Path]:
    files = []
    for place in places:
        path = ENGINE.parent / place
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _imported_modules(path: Path) -> set[str]:
    """Every module the file imports, with `from package import module` counted as that module."""
    modules = set()
    for module, names in _imports(path):
        modules.add(module)
        modules.update(f"{module}.{name}" for name in names)
    return modules


@pytest.mark.parametrize("place", ["engine/sources.py", "engine/distributed", "engine/cli.py", "engine/cli_common.py",
                                   "engine/finetune", "engine/records.py", "engine/datasets.py",
                                   "engine/gallery.py", "engine/retriever.py", "engine/index"])
def test_lower_layers_never_import_evaluation(place):
    for path in _files(place):
        bad = sorted(m for m in _imported_modules(path) if m == "engine.eval" or m.startswith("engine.eval."))
        assert not bad, f"{path.relative_to(ENGINE.parent)} imports {bad}"


def test_no_cli_imports_another_cli():
    """eval, finetune and serve share engine.cli_common; only `python -m engine` is engine/cli.py."""
    for path in _files("engine"):
        if path == ENGINE / "cli.py" or path == ENGINE / "__main__.py":
            continue
        assert "engine.cli" not in _imported_modules(path), f"{path.relative_to(ENGINE.parent)} imports engine.cli"


def test_records_sit_below_the_collections_and_datasets():
    for place in ("engine/records.py", "engine/gallery.py"):
        bad = {m for m in _imported_modules(_files(place)[0]) if m.startswith("engine.") and m.split(".")[1] in
               {"sources", "distributed", "datasets", "dataset_features", "eval", "finetune", "serve", "cli",
                "retriever", "index"}}
        assert not bad, f"{place} imports {sorted(bad)}"


def test_no_private_names_across_modules():
    found = []
    for path in _files("engine"):
        rel = path.relative_to(ENGINE.parent).as_posix()
        own = _module_name(path)
        for module, names in _imports(path):
            if not module.startswith("engine") or module == own:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__") and (rel, module, name) not in PRIVATE_ALLOWED:
                    found.append(f"{rel}: from {module} import {name}")
            if module.rpartition(".")[2].startswith("_") and not module.endswith("__init__") and \
                    (rel, module.rpartition(".")[0], module.rpartition(".")[2]) not in PRIVATE_ALLOWED:
                found.append(f"{rel}: import {module}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)
