"""Library packages import only downward (DESIGN.md): data < tokenizer < model < train /
inference < align, inference < serve, and no library module imports a stage module or the
CLI. Read from the source with ast, so a new upward import fails here rather than in a
newcomer's head."""

from __future__ import annotations

import ast
from pathlib import Path

ONEREC = Path(__file__).resolve().parents[2] / "onerec"

# package -> onerec packages it must never import (higher layers).
FORBIDDEN = {
    "data": {"tokenizer", "model", "train", "inference", "align", "baselines", "export", "report", "serve"},
    "tokenizer": {"model", "train", "inference", "align", "baselines", "export", "report", "serve"},
    "model": {"data", "tokenizer", "train", "inference", "align", "baselines", "report", "serve"},
    "train": {"tokenizer", "inference", "align", "baselines", "export", "report", "serve"},
    "inference": {"train", "align", "baselines", "report", "serve"},
    "baselines": {"train", "align", "report", "serve"},
    "align": {"baselines", "report", "serve"},
    # serve answers requests through inference; it trains nothing.
    "serve": {"train", "align", "baselines", "report"},
    # report reads any stage's output with that stage's loader: it sits above the libraries.
    "report": set(),
}
NEVER_FROM_LIBRARY = {"stages", "cli"}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onerec."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("onerec."))
    return names


def test_library_packages_import_only_downward():
    problems = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ONEREC / package).rglob("*.py")):
            bad = _imported_packages(path) & (forbidden | NEVER_FROM_LIBRARY)
            if bad:
                problems.append(f"{path.relative_to(ONEREC.parent)} imports onerec.{', onerec.'.join(sorted(bad))}")
    assert not problems, "\n".join(problems)


def test_the_walk_sees_real_imports():
    assert "config" in _imported_packages(ONEREC / "data" / "splits.py")
    assert "stages" in _imported_packages(ONEREC / "cli.py")


def _imported_modules(path: Path) -> set[str]:
    """Every onerec module `path` imports, anywhere in the file (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onerec."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("onerec."))
    return names


def test_distributed_modules_import_in_one_direction():
    """groups <- expert_parallel <- deepspeed: no module of onerec.distributed imports one to
    its left, even inside a function (an import cycle hides there)."""
    order = ["groups", "expert_parallel", "deepspeed"]
    problems = []
    for position, name in enumerate(order):
        imported = _imported_modules(ONEREC / "distributed" / f"{name}.py")
        for later in order[position + 1 :]:
            if f"onerec.distributed.{later}" in imported:
                problems.append(f"onerec.distributed.{name} imports onerec.distributed.{later}")
    assert not problems, "\n".join(problems)


def test_only_distributed_code_imports_onerec_distributed():
    """Device choice lives in onerec/device.py: a stage that runs on one process needs no
    process-group module. The modules that do import onerec.distributed are the ones that
    join or use process groups."""
    users = sorted(
        str(path.relative_to(ONEREC.parent)) for path in ONEREC.rglob("*.py")
        if "distributed" in _imported_packages(path) and path.parent.name != "distributed"
    )
    assert users == [
        "onerec/stages/dpo.py", "onerec/stages/pretrain.py", "onerec/stages/reward.py", "onerec/stages/tokenize.py",
        "onerec/train/trainer.py"
    ], users
