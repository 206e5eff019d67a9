"""The docs cite tests as evidence (the threat model: "checked by test_x.py::test_y"); a test
renamed or removed must not leave a claim standing on a citation of nothing.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [*sorted(REPO.glob("docs/*.md")), REPO / "README.md"]

#: ``test_x.py`` or ``tests/integration/test_x.py``, optionally ``::test_y`` or ``::Class``.
CITATION = re.compile(r"(tests/[\w/]+/)?(test_\w+\.py)(?:::(\w+))?")


@functools.cache
def _tests_by_file() -> dict[Path, set[str]]:
    """The test functions and classes each test file defines, read once for every doc."""
    return {path: defined_tests(path.read_text()) for path in REPO.glob("tests/**/test_*.py")}


#: A test named alone (``::test_y`` after a file, or `test_y` in a sentence).
BARE_NAME = re.compile(r"(?<![\w/.])(test_\w+)\b(?!\.py)")


def citations(text: str) -> list[tuple[str | None, str, str | None]]:
    return [(m.group(1), m.group(2), m.group(3)) for m in CITATION.finditer(text)]


def defined_tests(source: str) -> set[str]:
    return set(re.findall(r"^\s*(?:async def|def|class) (test_\w+)\b", source, re.MULTILINE))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_test_exists(doc: Path) -> None:
    tests = _tests_by_file()
    text = doc.read_text()
    missing = []
    for folder, name, function in citations(text):
        found = [
            defined for path, defined in tests.items()
            if path.name == name and (folder is None or path.parent == REPO / folder)
        ]
        if not found:
            missing.append(f"{folder or ''}{name}: no such test file")
        elif function and not any(function in defined for defined in found):
            missing.append(f"{name}::{function}: no such test in it")
    anywhere = set().union(*tests.values())
    missing += [f"{name}: no test of that name" for name in set(BARE_NAME.findall(text)) - anywhere]
    assert not missing, f"{doc.name} cites tests that do not exist: {missing}"


def test_the_docs_do_cite_tests() -> None:
    """The check above is worth something only if it finds the citations it checks."""
    threat_model = (REPO / "docs" / "threat-model.md").read_text()
    found = citations(threat_model)
    assert len(found) > 20 and any(function for _, _, function in found)
    assert len(set(BARE_NAME.findall(threat_model))) > 100
    assert BARE_NAME.findall("`a.py::test_b`, then ::test_c and test_d.py") == ["test_b", "test_c"]
    assert citations("see `tests/unit/test_a.py::test_b` and test_c.py") == [
        ("tests/unit/", "test_a.py", "test_b"), (None, "test_c.py", None)
    ]
    assert defined_tests("class X:\n    def test_b(self):\n") == {"test_b"}
    assert defined_tests("def test_bc():\n    test_b()\n") == {"test_bc"}
