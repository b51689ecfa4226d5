"""The `safehold` command as a user runs it, in a subprocess without a terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import sqlite3
import subprocess
import time
from pathlib import Path

from helpers import SAFEHOLD, Server, add_filler, run_cli, sqlite_content

from safehold.client import Progress
from safehold.client.progress import TerminalProgress


def test_backup_restore_info(sqlite_server: Server, sqlite_db: Path, tmp_path: Path) -> None:
    env = sqlite_server.client_env()
    original = sqlite_content(sqlite_db)
    out = tmp_path / "cli.sqlite"

    backup = run_cli("backup", "-o", str(out), env=env)
    assert backup.returncode == 0, backup.stderr
    assert out.exists() and f"saved to {out}" in backup.stdout

    with sqlite3.connect(sqlite_db) as db:
        db.execute("DELETE FROM games")
    restore = run_cli("restore", str(out), "--yes", env=env)
    assert restore.returncode == 0, restore.stderr
    assert "pre-restore" in restore.stdout
    assert sqlite_content(sqlite_db) == original

    info = run_cli("info", "--json", env=env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["engine"] == "SQLite"


def test_restore_without_yes_off_a_terminal_is_refused(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    env = sqlite_server.client_env()
    out = tmp_path / "b.sqlite"
    assert run_cli("backup", "-o", str(out), env=env).returncode == 0
    with sqlite3.connect(sqlite_db) as db:
        db.execute("DELETE FROM games")
    before = sqlite_content(sqlite_db)

    result = run_cli("restore", str(out), env=env)

    assert result.returncode == 1
    assert "--yes" in result.stderr and "unchanged" in result.stderr
    assert sqlite_content(sqlite_db) == before
    assert "restore started" not in sqlite_server.log()


def test_errors_are_one_line_and_say_what_happened(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    before = sqlite_content(sqlite_db)
    wrong = {**sqlite_server.client_env(), "SAFEHOLD_PASSWORD": "nope"}
    result = run_cli("info", env=wrong)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "[UNAUTHENTICATED]" in result.stderr

    truncated = tmp_path / "truncated.sqlite"
    truncated.write_bytes(sqlite_db.read_bytes()[:5000])
    result = run_cli("restore", str(truncated), "--yes", env=sqlite_server.client_env())
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "[NOT_A_BACKUP]" in result.stderr and "unchanged" in result.stderr
    request = re.search(r"\(request (\w+) in the server log\)", result.stderr)
    assert request and f"[{request.group(1)}]" in sqlite_server.log()

    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(3000))
    result = run_cli("restore", str(noise), "--yes", env=sqlite_server.client_env())
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "not a backup" in result.stderr and "unchanged" in result.stderr

    gone = {**sqlite_server.client_env(), "SAFEHOLD_TARGET": "127.0.0.1:1"}
    result = run_cli(
        "backup", "--connect-timeout", "0.5", "-o", str(tmp_path / "x.sqlite"), env=gone
    )
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.sqlite").exists()
    assert sqlite_content(sqlite_db) == before


def test_no_password_off_a_terminal(sqlite_server: Server) -> None:
    env = {k: v for k, v in sqlite_server.client_env().items() if k != "SAFEHOLD_PASSWORD"}
    result = run_cli("info", env=env)
    assert result.returncode == 1
    assert "SAFEHOLD_PASSWORD" in result.stderr


def test_progress_shows_on_a_terminal(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    """With stderr on a pseudo-terminal the CLI draws bytes, rate and ETA."""
    add_filler(sqlite_db, 60)
    main, replica = pty.openpty()
    try:
        result = subprocess.run(
            [SAFEHOLD, "restore", "--yes", str(_backup_for(sqlite_server, tmp_path))],
            env=sqlite_server.client_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=replica,
            timeout=60,
            check=False,
        )
        os.close(replica)
        drawn = b""
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:
                break
            if not data:
                break
            drawn += data
    finally:
        os.close(main)
    assert result.returncode == 0
    screen = drawn.decode()
    receiving = [line for line in screen.split("\n") if "receiving" in line]
    assert receiving and "\r" in receiving[0]
    assert "MiB/s" in receiving[0]
    assert re.search(r"receiving\s+(\d+\.\d) MiB / \1 MiB", receiving[0])  # ends full


def _backup_for(server: Server, tmp_path: Path) -> Path:
    out = tmp_path / "for-progress.sqlite"
    assert run_cli("backup", "-o", str(out), env=server.client_env()).returncode == 0
    return out


def test_progress_line_shows_rate_and_eta() -> None:
    out = io.StringIO()
    progress = TerminalProgress(out, min_interval=0)
    progress(Progress("RECEIVING", 0, 100 * 1024 * 1024))
    time.sleep(0.05)
    progress(Progress("RECEIVING", 50 * 1024 * 1024, 100 * 1024 * 1024))
    progress.finish()
    last = out.getvalue().split("\r")[-1]
    assert re.search(r"receiving\s+50\.0 MiB / 100\.0 MiB  ETA\s+\d+s\s+[\d.]+ MiB/s", last)
