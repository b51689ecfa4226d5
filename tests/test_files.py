"""The client's new files: named only once complete, never over an existing
name unless told, and nothing left by a killed writer, with O_TMPFILE and with
the partial-name fallback for filesystems that lack it."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.files import (
    PartialFile,
    UnnamedFile,
    atomic_path,
    new_file,
    private_temp_file,
    remove_stale_partials,
)

KINDS = [UnnamedFile, PartialFile]


@pytest.mark.parametrize("kind", KINDS)
def test_link_never_replaces_unless_told(kind: type[UnnamedFile], tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"earlier")
    with kind(tmp_path, "taken") as new:
        new.file.write(b"new")
        assert not new.link("taken")
        assert new.link("free")
    assert (tmp_path / "taken").read_bytes() == b"earlier"
    assert (tmp_path / "free").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "free").stat().st_mode) == 0o600
    with kind(tmp_path, "taken") as new:
        new.file.write(b"forced")
        assert new.link("taken", replace=True)
    assert (tmp_path / "taken").read_bytes() == b"forced"
    with kind(tmp_path, "never") as new:
        new.file.write(b"abandoned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free", "taken"]


WRITER = """
import sys, time
from pathlib import Path
from safehold.files import {kind}
with {kind}(Path(sys.argv[1]), "app.sqlite") as f:
    f.file.write(b"half a backup")
    f.file.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", KINDS)
def test_killed_writer_leaves_nothing_after_the_next_run(
    kind: type[UnnamedFile], tmp_path: Path
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(kind=kind.__name__), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        assert remove_stale_partials(tmp_path) == []  # its writer still holds it
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        writer.kill()
    remove_stale_partials(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_new_file_is_unnamed_where_the_filesystem_can(tmp_path: Path) -> None:
    with new_file(tmp_path, "x") as new:
        assert type(new) is UnnamedFile
        assert list(tmp_path.iterdir()) == []


def test_private_temp_file_makes_its_directories_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    path = private_temp_file(directory, "x-")
    assert path.parent == directory and path.name.startswith("x-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


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
