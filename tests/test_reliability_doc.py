"""docs/reliability.md: every test its table names exists (file and function), every
row names at least one, and the "Not yet proven" list names none."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
_TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/reliability.md has no '## {title}' section"
    return match.group(1)


def _table_rows(section: str) -> list[list[str]]:
    """Cells of each body row of the first markdown table in ``section``."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert len(lines) > 2, "the Proven section has no table"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Fault", "What happens", "Test"], header
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_every_row_names_existing_tests():
    rows = _table_rows(_section(DOC.read_text(encoding="utf-8"), "Proven"))
    assert len(rows) >= 20
    missing = []
    for fault, happens, tests in rows:
        refs = _TEST_REF.findall(tests)
        assert fault and happens and refs, f"row without a fault, outcome or test: {fault!r}"
        assert len(refs) == tests.count("::"), f"malformed test reference in {tests!r}"
        for file, name in refs:
            path = ROOT / file
            if not path.is_file() or not name.startswith("test_") or name not in _functions(path):
                missing.append(f"{file}::{name}")
    assert missing == [], f"docs/reliability.md names tests that do not exist: {missing}"


def test_not_yet_proven_names_no_tests():
    section = _section(DOC.read_text(encoding="utf-8"), "Not yet proven")
    items = [line for line in section.splitlines() if line.startswith("- ")]
    assert items, "the Not yet proven list is empty"
    assert "::" not in section and "tests/" not in section


def test_the_checker_notices_a_missing_test(tmp_path):
    """A reference to a function that is not there is caught by _functions."""
    fake = tmp_path / "test_x.py"
    fake.write_text("def test_present():\n    pass\n")
    assert "test_present" in _functions(fake) and "test_absent" not in _functions(fake)
