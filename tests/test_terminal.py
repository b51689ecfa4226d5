"""The CLI never writes a control character that came from the server: here a
database file and a pre-restore path whose names carry escape sequences."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from conftest import PASSWORD, make_sqlite_db
from helpers import run_cli, start_server

from safehold.client.terminal import printable

HOSTILE = "app\x1b[2J\x1b]0;owned\x07\u202e"
"""Clear screen, set the window title, bell, right-to-left override."""


def test_server_text_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    db = make_sqlite_db(tmp_path / f"{HOSTILE}.sqlite")
    pre_restore = tmp_path / f"pre-{HOSTILE}"  # the pre-restore backups' directory
    server = start_server(
        tmp_path,
        f"sqlite://{quote(str(db))}",
        PASSWORD,
        "--pre-restore-path",
        str(pre_restore),
    )
    try:
        env = server.client_env()
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        runs = [
            run_cli("info", env=env),
            run_cli("backup", "-o", f"{out_dir}/", env=env),
        ]
        (saved,) = [p for p in out_dir.iterdir() if not p.name.endswith(".json")]
        runs.append(run_cli("restore", str(saved), "--yes", env=env))
        for run in runs:
            assert run.returncode == 0, run.stderr
            shown = run.stdout + run.stderr
            assert not any(ch in shown for ch in "\x1b\x07\u202e"), shown
        info, backup, restore = (run.stdout + run.stderr for run in runs)
        escaped = printable(HOSTILE)
        assert escaped == "app\\x1b[2J\\x1b]0;owned\\x07\\u202e"
        assert f"database:      {escaped} (" in info
        assert escaped in backup
        assert "notice [PRE_RESTORE_BACKUP]: " in restore and escaped in restore
    finally:
        server.stop()


def test_printable_leaves_ordinary_text_alone() -> None:
    assert printable("Grüße, 日本語, tab-free text") == "Grüße, 日本語, tab-free text"
    assert printable("a\tb\nc\x7f\x9b") == "a\\x09b\\x0ac\\x7f\\x9b"
