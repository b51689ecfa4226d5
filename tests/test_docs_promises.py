"""The documents' promises point at tests: every reason and database_state in
README's status table is asserted by some test, and every test that
docs/reliability.md cites exists. (That each cited test fails when its row is
false was shown by breaking the code by hand; docs/reliability.md says how.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import assert_secret_not_in, secret_forms

ROOT = Path(__file__).resolve().parent.parent
TESTS = sorted((ROOT / "tests").glob("*.py"))


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else None]


def _status_table_names() -> list[str]:
    rows = [
        line
        for line in _section(ROOT / "README.md", "## Status codes").splitlines()
        if line.startswith("| ")
    ][2:]
    names = set()
    for row in rows:
        reasons = row.split("|")[3]
        names.update(re.findall(r"`(?:database_state=)?([A-Z][A-Z_]+)`", reasons))
    return sorted(names)


@pytest.mark.parametrize("name", _status_table_names())
def test_every_status_in_readme_is_asserted_by_a_test(name: str) -> None:
    quoted = re.compile(rf"""["']{name}["']|\.{name}\b|\[{name}\]""")
    assert any(quoted.search(p.read_text()) for p in TESTS), f"no test asserts {name}"


def _cited_tests() -> list[str]:
    matrix = _section(ROOT / "docs" / "reliability.md", "## The matrix")
    cited = set()
    for row in matrix.splitlines():
        if row.startswith("| ") and "not yet shown" not in row.split("|")[-2]:
            for token in re.findall(r"`([^`]*test_[^`]*)`", row.split("|")[-2]):
                cited.add(token.split("::")[-1].split("[")[0])
    return sorted(cited)


@pytest.mark.parametrize("name", _cited_tests())
def test_every_test_reliability_cites_exists(name: str) -> None:
    if name.endswith(".py"):
        assert (ROOT / "tests" / name).exists(), f"no test file {name}"
        return
    pattern = re.compile(r"def " + re.escape(name).replace(r"\*", r"\w*") + r"\(")
    assert any(pattern.search(p.read_text()) for p in TESTS), f"no test named {name}"


@pytest.mark.parametrize(
    "password", ["correct horse 'battery' \"staple\" $HOME ; & | \\", "pä/ß?w=1&x"]
)
def test_the_log_check_finds_every_spelling_of_the_password(password: str) -> None:
    """The check every test server's log goes through when it stops."""
    forms = secret_forms(password)
    assert len(forms) >= 4  # raw, JSON, repr and URL spellings all differ for these
    for form in forms:
        with pytest.raises(AssertionError) as found:
            assert_secret_not_in(password, f'{{"message": "connect with {form}"}}')
        assert password not in str(found.value)  # the failure does not print it either
    assert_secret_not_in(password, "a log that names no password")
