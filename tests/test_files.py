"""Complete-or-absent files on a real file system: the private temp file, and
the clean-up of partial files a killed process left beside a destination."""

from __future__ import annotations

import stat
from pathlib import Path

from safehold.files import atomic_path, private_temp_file, remove_partials


def test_private_temp_file_makes_its_directories_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    path = private_temp_file(directory, "x-")
    assert path.parent == directory and path.name.startswith("x-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_partials_left_by_a_killed_writer_are_removed_and_named(tmp_path: Path) -> None:
    dest = tmp_path / "pre-restore.sqlite"
    dest.write_bytes(b"the complete previous one")
    unrelated = tmp_path / ".other.sqlite.partial-1"
    unrelated.write_bytes(b"")
    partials = [private_temp_file(tmp_path, f".{dest.name}.partial-") for _ in range(2)]

    assert sorted(remove_partials(dest)) == sorted(partials)
    assert not any(p.exists() for p in partials)
    assert dest.read_bytes() == b"the complete previous one" and unrelated.exists()
    assert remove_partials(tmp_path / "missing" / "x.sqlite") == []


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    dest = tmp_path / "backup.sqlite"
    try:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer died")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [dest]
