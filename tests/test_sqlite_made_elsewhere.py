"""SQLite files made elsewhere restore into the live database, whatever its mode,
under the application's open connections: another page size, journal mode,
auto-vacuum, the sqlite3 shell's `.backup`, `VACUUM INTO`, a plain file copy.
Another text encoding, which open connections cannot follow, is refused before
anything is touched."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, make_sqlite_db
from helpers import sqlite_content, start_server

from safehold.client import Client, SettingsMismatch
from safehold.contract import DatabaseState, Reason

CONTENT = """
CREATE TABLE games (id INTEGER PRIMARY KEY, title TEXT NOT NULL, cover BLOB);
CREATE INDEX games_title ON games(title);
CREATE TABLE made_elsewhere (how TEXT);
"""


def _made(tmp: Path, how: str, *pragmas: str) -> Path:
    """A database made outside safehold, with pragmas set before its first table."""
    source = tmp / f"source-{how}.sqlite"
    db = sqlite3.connect(source, isolation_level=None)
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}")
    db.executescript(CONTENT)
    db.executemany(
        "INSERT INTO games (title, cover) VALUES (?, ?)",
        [(f"{how} {i} ✓", bytes(range(256)) * 8) for i in range(300)],
    )
    db.execute("INSERT INTO made_elsewhere VALUES (?)", (how,))
    db.close()
    return source


def _copy_of(how: str, make: Callable[[Path, Path], object]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        source, dest = _made(tmp, how, "journal_mode = WAL"), tmp / f"{how}.sqlite"
        make(source, dest)
        return dest

    return build


def _vacuum_into(source: Path, dest: Path) -> None:
    with sqlite3.connect(source) as db:
        db.execute("VACUUM INTO ?", (str(dest),))


def _shell_backup(source: Path, dest: Path) -> None:
    subprocess.run(["sqlite3", str(source), f".backup {dest}"], check=True, timeout=30)


UPLOADS: dict[str, Callable[[Path], Path]] = {
    "page-size-1024": lambda tmp: _made(tmp, "page-1024", "page_size = 1024"),
    "page-size-65536": lambda tmp: _made(tmp, "page-65536", "page_size = 65536"),
    "journal-wal": lambda tmp: _made(tmp, "wal", "journal_mode = WAL"),
    "journal-truncate": lambda tmp: _made(tmp, "truncate", "journal_mode = TRUNCATE"),
    "auto-vacuum-full": lambda tmp: _made(tmp, "av-full", "auto_vacuum = FULL"),
    "auto-vacuum-incremental": lambda tmp: _made(tmp, "av-incr", "auto_vacuum = INCREMENTAL"),
    "wal-page-size-8192": lambda tmp: _made(
        tmp, "wal-8192", "page_size = 8192", "journal_mode = WAL"
    ),
    "sqlite3-shell-backup": _copy_of("shell", _shell_backup),
    "vacuum-into": _copy_of("vacuum-into", _vacuum_into),
    "file-copy": _copy_of("copy", shutil.copy),
}


@pytest.mark.parametrize("upload", UPLOADS)
@pytest.mark.parametrize("wal", [False, True], ids=["live-rollback-journal", "live-wal"])
def test_restores_under_an_open_connection(tmp_path: Path, wal: bool, upload: str) -> None:
    backup = UPLOADS[upload](tmp_path)
    expected = sqlite_content(backup)
    live = make_sqlite_db(tmp_path / "live.sqlite", wal=wal)
    with sqlite3.connect(live) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    server = start_server(tmp_path, f"sqlite:///{live}", PASSWORD)
    held = sqlite3.connect(live)
    try:
        assert held.execute("SELECT count(*) FROM games").fetchone() == (200,)
        with Client(server.target, PASSWORD) as client:
            result = client.restore(backup)

        # The connection the application kept open reads the restored content...
        assert held.execute("SELECT how FROM made_elsewhere").fetchall() != []
        assert held.execute("SELECT count(*) FROM games").fetchone() == (300,)
        assert held.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        held.close()
        # ...and the file is the upload's content, in the live database's journal mode.
        assert sqlite_content(live) == expected
        with sqlite3.connect(live) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == ("wal" if wal else "delete")
            restored_page_size = db.execute("PRAGMA page_size").fetchone()[0]
        with sqlite3.connect(backup) as db:
            upload_page_size = db.execute("PRAGMA page_size").fetchone()[0]
        converted = [m for r, m in result.notices if r == "PAGE_SIZE_CONVERTED"]
        if wal and upload_page_size != page_size:
            assert restored_page_size == page_size and len(converted) == 1
        else:
            assert restored_page_size == upload_page_size and converted == []
    finally:
        held.close()
        server.stop()


@pytest.mark.parametrize("encoding", ["UTF-16le", "UTF-16be"])
@pytest.mark.parametrize("wal", [False, True], ids=["live-rollback-journal", "live-wal"])
def test_another_text_encoding_is_refused_before_anything_is_touched(
    tmp_path: Path, wal: bool, encoding: str
) -> None:
    backup = _made(tmp_path, encoding, f'encoding = "{encoding}"')
    live = make_sqlite_db(tmp_path / "live.sqlite", wal=wal)
    before = sqlite_content(live)
    server = start_server(tmp_path, f"sqlite:///{live}", PASSWORD)
    held = sqlite3.connect(live)
    try:
        held.execute("SELECT count(*) FROM games").fetchone()
        with Client(server.target, PASSWORD) as client, pytest.raises(SettingsMismatch) as refused:
            client.restore(backup)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == Reason.SETTINGS_MISMATCH
        assert refused.value.database_state == DatabaseState.UNCHANGED
        assert encoding in refused.value.message and ".dump" in refused.value.message
        assert held.execute("SELECT count(*) FROM games").fetchone() == (200,)
        assert sqlite_content(live) == before
        assert not (server.data_dir / "pre-restore").exists() or not any(
            (server.data_dir / "pre-restore").iterdir()
        )

        # What the message (and README) says to do works: `sqlite3 B .dump | sqlite3 C`.
        converted = tmp_path / "converted.sqlite"
        dump = subprocess.run(["sqlite3", str(backup), ".dump"], capture_output=True, check=True)
        subprocess.run(["sqlite3", str(converted)], input=dump.stdout, check=True)
        with Client(server.target, PASSWORD) as client:
            client.restore(converted)
        assert held.execute("SELECT how FROM made_elsewhere").fetchone() == (encoding,)
        assert sqlite_content(live) == sqlite_content(backup)
    finally:
        held.close()
        server.stop()
