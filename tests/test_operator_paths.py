"""What a new operator meets following the docs: GameVault's environment, the
password in a file for cron, the client's own refusals, and a PostgreSQL whose
`public` schema the role does not own. Each runs the CLI in a subprocess."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest
from conftest import PgDatabase
from helpers import SAFEHOLD, Server, run_cli, sqlite_content
from pg import Cluster


def test_cron_reads_the_password_from_a_file(sqlite_server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "db_password"
    secret.write_text(sqlite_server.password + "\n")
    env = {k: v for k, v in sqlite_server.client_env().items() if k != "SAFEHOLD_PASSWORD"}
    from_env = run_cli(
        "backup",
        "-o",
        str(tmp_path / "a.sqlite"),
        env={**env, "SAFEHOLD_PASSWORD_FILE": str(secret)},
    )
    assert from_env.returncode == 0, from_env.stderr
    from_flag = run_cli(
        "backup", "--password-file", str(secret), "-o", str(tmp_path / "b.sqlite"), env=env
    )
    assert from_flag.returncode == 0, from_flag.stderr
    nowhere = run_cli("info", env=env)
    assert nowhere.returncode == 1
    assert "SAFEHOLD_PASSWORD" in nowhere.stderr and "SAFEHOLD_PASSWORD_FILE" in nowhere.stderr
    assert "[NO_PASSWORD]" in nowhere.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    refused = run_cli("info", env={**env, "SAFEHOLD_PASSWORD_FILE": str(empty)})
    assert refused.returncode == 1 and f"password file {empty} is empty" in refused.stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"PGDMP\x01\x0e\x00", "ENGINE_MISMATCH"), (b"hello, I am text\n", "NOT_A_BACKUP")],
)
def test_client_refusals_carry_readmes_reasons(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path, content: bytes, reason: str
) -> None:
    before = sqlite_content(sqlite_db)
    upload = tmp_path / "upload"
    upload.write_bytes(content + bytes(4096))
    result = run_cli("restore", "--yes", str(upload), env=sqlite_server.client_env())
    assert result.returncode == 1
    assert f"[{reason}]" in result.stderr and "unchanged" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sqlite_content(sqlite_db) == before


def test_a_missing_file_is_one_line(sqlite_server: Server, tmp_path: Path) -> None:
    result = run_cli(
        "restore", "--yes", str(tmp_path / "nope.sqlite"), env=sqlite_server.client_env()
    )
    assert result.returncode == 1
    assert result.stderr.startswith("safehold: restore failed: cannot read")
    assert "[FILE_NOT_READABLE]" in result.stderr and "Traceback" not in result.stderr


def _on_a_terminal(
    args: list[str], env: dict[str, str], keys: bytes
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with stdin on a pseudo-terminal that has keys typed into it."""
    main, replica = pty.openpty()
    try:
        os.write(main, keys)
        return subprocess.run(
            [SAFEHOLD, *args],
            env=env,
            stdin=replica,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(replica)
        os.close(main)


def test_the_prompt_comes_after_the_file_is_checked_and_eof_cancels(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    env = sqlite_server.client_env()
    text = tmp_path / "notes.txt"
    text.write_text("not a backup\n")
    refused = _on_a_terminal(["restore", str(text)], env, b"y\n")
    assert refused.returncode == 1 and "[NOT_A_BACKUP]" in refused.stderr
    assert "Replace the whole" not in refused.stdout

    backup = tmp_path / "b.sqlite"
    assert run_cli("backup", "-o", str(backup), env=env).returncode == 0
    with __import__("sqlite3").connect(sqlite_db) as db:
        db.execute("DELETE FROM games")
    before = sqlite_content(sqlite_db)
    cancelled = _on_a_terminal(["restore", str(backup)], env, b"\x04")
    assert cancelled.returncode == 1
    assert "Replace the whole" in cancelled.stdout
    assert cancelled.stderr.strip().splitlines() == [
        "safehold: restore cancelled; the database is unchanged"
    ], cancelled.stderr
    assert sqlite_content(sqlite_db) == before


def test_public_not_owned_by_pg_database_owner_is_named_before_a_restore(
    pg_db: PgDatabase, pg_cluster: Cluster, pg_server: Server, tmp_path: Path
) -> None:
    """PostgreSQL before 15 gives `public` to the bootstrap superuser; here it is made so."""
    pg_db.execute("CREATE TABLE games (title text); INSERT INTO games VALUES ('Hades');")
    env = pg_server.client_env()
    backup = tmp_path / "before.dump"
    assert run_cli("backup", "-o", str(backup), env=env).returncode == 0
    with pg_cluster.connect(pg_db.name) as db:
        db.execute("ALTER SCHEMA public OWNER TO postgres")
    pg_db.execute("INSERT INTO games VALUES ('Celeste')")

    info = run_cli("info", env=env)
    assert info.returncode == 0
    assert "restore:       BLOCKED: the schema public belongs to postgres" in info.stdout
    assert "ALTER SCHEMA public OWNER TO pg_database_owner" in info.stdout
    refused = run_cli("restore", "--yes", str(backup), env=env)
    assert refused.returncode == 1 and "[INSUFFICIENT_PRIVILEGE]" in refused.stderr
    with pg_db.connect() as db:
        assert db.execute("SELECT count(*) FROM games").fetchone() == (2,)

    with pg_cluster.connect(pg_db.name) as db:
        db.execute("ALTER SCHEMA public OWNER TO pg_database_owner")
    assert "BLOCKED" not in run_cli("info", env=env).stdout
    assert run_cli("restore", "--yes", str(backup), env=env).returncode == 0
    with pg_db.connect() as db:
        assert db.execute("SELECT count(*) FROM games").fetchone() == (1,)
