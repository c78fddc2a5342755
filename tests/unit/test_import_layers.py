"""Imports point one way: no module of alice3d/ or landmark/ imports a higher layer (docs/ARCHITECTURE.md).

Every import statement counts, including those inside functions. Modules of one layer may
import each other; `core/` imports nothing else of alice3d and `viz/` nothing of alice3d.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = {
    "alice3d": 0, "alice3d.core": 0, "alice3d.config": 0, "alice3d.errors": 0, "alice3d.runtime": 0, "alice3d.viz": 0,
    "alice3d.data": 1, "alice3d.encoders": 1, "alice3d.train": 1,
    "alice3d.methods": 2, "landmark": 2,
    "alice3d.analysis": 3, "alice3d.finetune": 3, "alice3d.pretrain": 3,
    "alice3d.bundle": 4,
    "alice3d.cli": 5,  # every console script, alice3d-landmark's included (alice3d/cli/landmark.py)
}
# Bottom packages with a stricter rule: what of ours they may import at all.
ALLOWED = {"alice3d.core": ("alice3d.core",), "alice3d.viz": ("alice3d.viz",)}


def layer_of(module: str) -> tuple[str, int] | None:
    """(the LAYERS key that owns `module`, its layer), by longest prefix; None for other packages."""
    best = None
    for key in LAYERS:
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return (best, LAYERS[best]) if best else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `text` (the source of `path`), relative ones resolved."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` may name a submodule: check it as such when it is one.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                found.append((node.lineno, sub if is_module else target))
    return found


def violations(path: Path, text: str | None = None) -> list[str]:
    src = module_name(path)
    src_key, src_layer = layer_of(src)
    out = []
    for line, target in imported_modules(path, path.read_text() if text is None else text):
        owner = layer_of(target)
        if owner is None:
            continue
        key, layer = owner
        allowed = ALLOWED.get(src_key)
        if allowed is not None and key != "alice3d" and not any(target == a or target.startswith(a + ".") for a in allowed):
            out.append(f"{path.relative_to(ROOT)}:{line}: {src_key} may not import {target}")
        elif layer > src_layer:
            out.append(f"{path.relative_to(ROOT)}:{line}: {src} (layer {src_layer}) imports {target} (layer {layer})")
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in ("alice3d", "landmark") for p in (ROOT / pkg).rglob("*.py"))


def test_every_source_file_belongs_to_a_layer():
    assert sources(), "no sources found"
    for path in sources():
        assert layer_of(module_name(path)) is not None, f"{path}: add its package to LAYERS"


def test_no_module_imports_a_higher_layer():
    problems = sorted({v for path in sources() for v in violations(path)})
    assert not problems, "upward imports:\n" + "\n".join(problems)


@pytest.mark.parametrize("code, bad", [
    ("from alice3d.cli.common import run_main\n", True),
    ("def f():\n    from alice3d.finetune import train\n", True),
    ("from ..train.trainer import Trainer\n", False),
    ("import torch\nfrom alice3d.core import masking\n", False),
])
def test_the_checker_sees_upward_and_local_imports(code, bad):
    """Source text checked as if it lived in alice3d/data/ (layer 1)."""
    assert bool(violations(ROOT / "alice3d" / "data" / "_layer_probe.py", code)) is bad


@pytest.mark.parametrize("code, bad", [
    ("from alice3d.cli.common import run_main\n", True),
    ("def f():\n    from alice3d.pretrain.run import pretrain\n", True),
    ("from alice3d.finetune.train import train\n", True),
    ("from alice3d.analysis.landmark_accuracy import summarize\n", True),
    ("from alice3d.methods.alice import Alice\n", False),  # the same layer
    ("from alice3d.data.builders import load_volumes\nfrom landmark.cohort import compose\n", False),
])
def test_landmark_is_a_library_layer_below_pretrain(code, bad):
    """Source text checked as if it lived in landmark/ (layer 2): nothing above it, no CLI."""
    assert bool(violations(ROOT / "landmark" / "_layer_probe.py", code)) is bad


def test_the_layer_order_is_the_documented_one():
    order = ["alice3d.core", "alice3d.data", "alice3d.methods", "alice3d.pretrain", "alice3d.bundle", "alice3d.cli"]
    assert [LAYERS[k] for k in order] == sorted(LAYERS[k] for k in order) == list(range(6))
    assert LAYERS["landmark"] == LAYERS["alice3d.methods"] and layer_of("landmark.prepare") == ("landmark", 2)
    assert layer_of("alice3d.cli.landmark") == ("alice3d.cli", 5)
    assert LAYERS["alice3d.analysis"] == LAYERS["alice3d.finetune"] == LAYERS["alice3d.pretrain"]


def local_imports_without_reason(path: Path, text: str) -> list[str]:
    """In-function imports whose line (or the line above) carries no comment saying why."""
    lines = text.splitlines()
    tree = ast.parse(text)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            here = " ".join(lines[node.lineno - 1: node.end_lineno])
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if "#" not in here and not above.startswith("#"):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return out


def test_imports_sit_at_module_tops_unless_a_comment_says_why():
    problems = [v for path in sources() for v in local_imports_without_reason(path, path.read_text())]
    assert not problems, "move these imports to the module top or say why they are local:\n" + "\n".join(problems)


def test_the_local_import_check_sees_unexplained_ones():
    code = "import os\n\ndef f():\n    import json\n    import yaml  # heavy, only for f\n"
    assert [p.split(": ")[1] for p in local_imports_without_reason(ROOT / "x.py", code)] == ["import json"]
