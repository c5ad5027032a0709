"""The house's rules: rooms import only downwards, no module imports itself round a circle, no room
grows past what one person reads at once. The layer contracts live in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_MODULE_LINES = 450


def test_import_linter_contracts_are_kept():
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install '.[test]')")
    result = subprocess.run([lint, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_module_of_the_package_imports_itself_round_a_circle():
    # Lazy and type-only imports count: a circle through a TYPE_CHECKING block is still a circle.
    graph = grimp.build_graph("pipeline", exclude_type_checking_imports=False, cache_dir=None)
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                circles.append(" -> ".join((module,) + tuple(chain)))
    assert circles == []


def test_every_module_is_short_enough_to_read_at_once():
    long = {str(path.relative_to(PACKAGE.parent)): lines for path in PACKAGE.rglob("*.py")
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}
