"""Pre-restore backups are a history: no restore, failed or not, ever destroys an
earlier one, and "I restored the wrong file" can always be undone."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from helpers import Server, run_cli, sqlite_content, start_server
from pg import Cluster

from safehold.client import Client
from safehold.server import config
from safehold.server.pre_restore import PreRestoreHistory

SAVED_AT = re.compile(r"previous content is saved at (\S+)")
NAMED_IN_ERROR = re.compile(r"its pre-restore backup is (\S+?)\)")


def restore_cli(server: Server, file: Path) -> tuple[int, Path | None, str]:
    """Restore as a user would: exit code, the pre-restore file the output names, output."""
    done = run_cli("restore", str(file), "--yes", env=server.client_env())
    named = SAVED_AT.search(done.stdout) or NAMED_IN_ERROR.search(done.stderr)
    return done.returncode, Path(named.group(1)) if named else None, done.stdout + done.stderr


def test_sqlite_wrong_file_and_failed_undo_keep_the_original(tmp_path: Path) -> None:
    db = make_sqlite_db(tmp_path / "app.sqlite")
    original = sqlite_content(db)
    wrong = tmp_path / "wrong.sqlite"
    shutil.copy(db, wrong)
    with sqlite3.connect(wrong) as conn:
        conn.execute("DELETE FROM progress")
    server = start_server(tmp_path, f"sqlite:///{db}", PASSWORD, "--lock-timeout", "1")
    try:
        code, first_pre, out = restore_cli(server, wrong)
        assert code == 0 and first_pre is not None, out
        assert sqlite_content(db) == sqlite_content(wrong)
        assert sqlite_content(first_pre) == original

        # Undo, while the application holds a write transaction: fails after the
        # pre-restore phase, with its own pre-restore backup named.
        app = sqlite3.connect(db, isolation_level=None)
        app.execute("BEGIN IMMEDIATE")
        app.execute("INSERT INTO progress VALUES (1, 1)")
        code, failed_pre, out = restore_cli(server, first_pre)
        app.execute("ROLLBACK")
        app.close()
        assert code == 1 and "DATABASE_BUSY" in out and "unchanged" in out, out
        assert failed_pre is not None and failed_pre != first_pre, out
        assert sqlite_content(db) == sqlite_content(wrong)
        assert sqlite_content(failed_pre) == sqlite_content(wrong)
        assert sqlite_content(first_pre) == original  # the only copy survived
        assert str(failed_pre) in server.log()

        info = run_cli("info", env=server.client_env())
        assert f"newest:        {failed_pre}" in info.stdout, info.stdout
        assert f"pre-restore:   {first_pre.parent}" in info.stdout

        code, _, out = restore_cli(server, first_pre)
        assert code == 0, out
        assert sqlite_content(db) == original
    finally:
        server.stop()


def pg_rows(db: PgDatabase) -> list[str]:
    with db.connect() as conn:
        return [row[0] for row in conn.execute("SELECT name FROM items ORDER BY name")]


def test_postgres_wrong_file_and_failed_undo_keep_the_original(
    pg_server: Server, pg_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    pg_db.execute("CREATE TABLE items (name text); INSERT INTO items VALUES ('wrong');")
    wrong = pg_cluster.dump(pg_db.name, tmp_path / "wrong.dump", "-Fc")
    pg_db.execute("DELETE FROM items; INSERT INTO items VALUES ('original'), ('kept');")

    code, first_pre, out = restore_cli(pg_server, wrong)
    assert code == 0 and first_pre is not None, out
    assert pg_rows(pg_db) == ["wrong"]

    with pg_db.connect() as app:  # an uncommitted write holds its table's lock
        app.autocommit = False
        app.execute("INSERT INTO items VALUES ('uncommitted')")
        code, failed_pre, out = restore_cli(pg_server, first_pre)
        app.rollback()
    assert code == 1 and "DATABASE_BUSY" in out and "unchanged" in out, out
    assert failed_pre is not None and failed_pre != first_pre and failed_pre.exists(), out
    assert pg_rows(pg_db) == ["wrong"]

    code, _, out = restore_cli(pg_server, first_pre)
    assert code == 0, out
    assert pg_rows(pg_db) == ["kept", "original"]


def marker_db(path: Path, marker: int) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE marker (n INTEGER)")
        conn.execute("INSERT INTO marker VALUES (?)", (marker,))
    return path


def marker_of(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute("SELECT n FROM marker").fetchone()
    return int(n)


def test_ten_restores_keep_the_three_newest(tmp_path: Path) -> None:
    db = marker_db(tmp_path / "live.sqlite", 0)
    server = start_server(
        tmp_path, f"sqlite:///{db}", PASSWORD, env={"SAFEHOLD_KEEP_PRE_RESTORE": "3"}
    )
    try:
        with Client(server.target, server.password) as client:
            results = [client.restore(marker_db(tmp_path / f"{i}.sqlite", i)) for i in range(1, 11)]
    finally:
        server.stop()
    named = [Path(r.pre_restore_backup_path) for r in results]
    directory = server.data_dir / "pre-restore"
    assert sorted(directory.iterdir()) == named[-3:]
    assert [marker_of(p) for p in named[-3:]] == [7, 8, 9]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in named[-3:])
    assert marker_of(db) == 10


def test_names_stay_unique_and_ordered_within_one_microsecond(tmp_path: Path) -> None:
    history = PreRestoreHistory(tmp_path, ".sqlite", keep=2)
    now = datetime(2026, 11, 28, 7, 0, 0, 123456, tzinfo=UTC)
    made = []
    for when in (now, now, now, now.replace(second=0, microsecond=0)):  # the last: clock back
        path = history.new_path(when)
        assert not path.exists()
        path.write_bytes(b"x")
        made.append(path)
    assert len(set(made)) == 4 and history.files() == made
    foreign = [tmp_path / n for n in ("pre-restore.sqlite", "pre-restore-x.sqlite", "notes.txt")]
    other_engine = tmp_path / "pre-restore-20200101T000000.000000Z.dump"
    for path in [*foreign, other_engine]:
        path.write_bytes(b"keep me")
    assert history.prune() == made[:2]
    assert history.files() == made[2:]
    assert all(p.exists() for p in [*foreign, other_engine])


def test_old_single_file_setting_carries_over_to_its_directory(tmp_path: Path) -> None:
    old = tmp_path / "pre-restore.sqlite"
    old.write_bytes(b"the old pre-restore backup")
    history = PreRestoreHistory.from_setting(old, tmp_path / "data", ".sqlite", 3)
    assert history.directory == tmp_path
    not_yet = PreRestoreHistory.from_setting(tmp_path / "x.sqlite", tmp_path, ".sqlite", 3)
    assert not_yet.directory == tmp_path
    assert PreRestoreHistory.from_setting(tmp_path / "dir", tmp_path, ".sqlite", 3).directory == (
        tmp_path / "dir"
    )


def test_old_default_file_is_kept_by_a_restore(tmp_path: Path, sqlite_db: Path) -> None:
    pre_dir = tmp_path / "pre"
    pre_dir.mkdir()
    old = pre_dir / "pre-restore.sqlite"
    old.write_bytes(b"the old pre-restore backup")
    server = start_server(
        tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--pre-restore-path", str(old)
    )
    try:
        with Client(server.target, server.password) as client:
            result = client.restore(make_sqlite_db(tmp_path / "other.sqlite"))
    finally:
        server.stop()
    assert Path(result.pre_restore_backup_path).parent == pre_dir
    assert old.read_bytes() == b"the old pre-restore backup"
    assert "names a file; pre-restore backups are now a history" in server.log()


@pytest.mark.parametrize("value", ["0", "-1", "three"])
def test_keep_pre_restore_must_be_a_positive_count(value: str, tmp_path: Path) -> None:
    args = argparse.Namespace(**{a: None for a in config_arguments()})
    with pytest.raises(config.ConfigError, match="keep pre-restore"):
        config.load(args, {"SAFEHOLD_KEEP_PRE_RESTORE": value, "SAFEHOLD_DATA_DIR": str(tmp_path)})


def config_arguments() -> list[str]:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return [a.dest for a in parser._actions if a.dest != "help"]


def test_an_undeletable_old_file_does_not_fail_the_prune(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a file undeletable (chattr +i) needs root (CI runs as root)")
    history = PreRestoreHistory(tmp_path, ".sqlite", keep=1)
    old = history.new_path()
    old.write_bytes(b"old")
    new = history.new_path()
    new.write_bytes(b"new")
    subprocess.run(["chattr", "+i", str(old)], check=True)
    try:
        assert history.prune() == []
    finally:
        subprocess.run(["chattr", "-i", str(old)], check=True)
    assert old.exists() and "cannot remove old pre-restore backup" in caplog.text
