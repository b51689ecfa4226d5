"""The PostgreSQL engine end to end against a real cluster, as a non-superuser
owner without CREATEDB, with a password full of shell metacharacters."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from conftest import PASSWORD, PgDatabase, new_pg_database
from helpers import (
    Server,
    children_named,
    error_reason,
    frames,
    raw_restore,
    run_cli,
    spool_leftovers,
    start_server,
)
from pg import Cluster

from safehold.client import BackupFailed, Busy, Client, RestoreFailed, VersionMismatch
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

RICH_SCHEMA = """
CREATE SCHEMA shop;
CREATE SCHEMA "Odd Schema";
CREATE TYPE shop.mood AS ENUM ('happy', 'sad', 'ünïcödé');
CREATE SEQUENCE shop.ticket START 1000 INCREMENT 7;
CREATE TABLE shop.customer (
    id serial PRIMARY KEY,
    name text NOT NULL,
    mood shop.mood,
    avatar bytea,
    ticket bigint DEFAULT nextval('shop.ticket')
);
CREATE TABLE shop.orders (
    id bigserial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES shop.customer(id),
    placed timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00'
);
CREATE TABLE "Odd Schema"."Mixed Case" ("Weird Column" text, n numeric(20, 5));
CREATE TABLE public.plain_table (id int PRIMARY KEY, payload jsonb);
CREATE INDEX customer_name ON shop.customer (lower(name));
CREATE VIEW shop.customer_orders AS
    SELECT c.name, count(o.id) AS orders FROM shop.customer c
    LEFT JOIN shop.orders o ON o.customer_id = c.id GROUP BY c.name;
CREATE FUNCTION shop.shout(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN upper(t) || '!';
END;
$$;
INSERT INTO shop.customer (name, mood, avatar)
    SELECT 'customer ' || i || ' 🦀 ✓', (ARRAY['happy','sad','ünïcödé'])[i % 3 + 1]::shop.mood,
           decode(md5(i::text), 'hex') || '\\x00ff00'::bytea
    FROM generate_series(1, 300) i;
INSERT INTO shop.orders (customer_id) SELECT (i % 300) + 1 FROM generate_series(1, 900) i;
INSERT INTO "Odd Schema"."Mixed Case" VALUES ('tab\there "quoted" ''single''', 12345.6789);
INSERT INTO public.plain_table VALUES (1, '{"a": [1, 2, {"b": null}]}');
"""


def fingerprint(db: PgDatabase) -> dict[str, Any]:
    """Everything that must survive a round trip: objects, rows, sequence positions."""
    with db.connect() as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_' "
            "ORDER BY 1"
        ).fetchall()
        rows = {
            name: conn.execute(f"SELECT t::text FROM {name} t ORDER BY 1").fetchall()
            for name, kind in tables
            if kind == "r"
        }
        sequences = {
            name: conn.execute(f"SELECT last_value, is_called FROM {name}").fetchone()
            for name, kind in tables
            if kind == "S"
        }
        functions = conn.execute(
            "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = 'shop'"
        ).fetchall()
        enums = conn.execute("SELECT enumlabel FROM pg_enum ORDER BY enumsortorder").fetchall()
        fks = conn.execute(
            "SELECT conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1"
        ).fetchall()
    return {
        "tables": tables,
        "rows": rows,
        "sequences": sequences,
        "functions": functions,
        "enums": enums,
        "fks": fks,
    }


@pytest.fixture
def rich_db(pg_db: PgDatabase) -> PgDatabase:
    pg_db.execute(RICH_SCHEMA)
    pg_db.execute("SELECT nextval('shop.ticket'); SELECT nextval('shop.ticket');")
    return pg_db


def test_round_trip_restores_everything_and_drops_the_rest(
    pg_client: Client, rich_db: PgDatabase, tmp_path: Path
) -> None:
    original = fingerprint(rich_db)
    backup = pg_client.backup(tmp_path / "rich.dump")
    assert backup.path.read_bytes().startswith(b"PGDMP")
    with rich_db.connect() as conn:
        expected_next = conn.execute("SELECT nextval('shop.ticket')").fetchone()
    rich_db.execute("""
        UPDATE shop.customer SET name = 'changed' WHERE id < 100;
        DELETE FROM shop.orders WHERE id > 500;
        CREATE TABLE public.added_later (x int);
        CREATE SCHEMA added_schema;
        DROP VIEW shop.customer_orders;
        ALTER TYPE shop.mood ADD VALUE 'angry';
    """)

    result = pg_client.restore(backup.path)

    assert fingerprint(rich_db) == original
    with rich_db.connect() as conn:
        assert conn.execute("SELECT to_regclass('public.added_later')").fetchone() == (None,)
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'added_schema'"
        ).fetchone() == (0,)
        assert conn.execute("SELECT nextval('shop.ticket')").fetchone() == expected_next
        assert conn.execute("SELECT shop.shout('hi')").fetchone() == ("HI!",)
    assert result.bytes_restored == backup.size_bytes


def test_backup_restores_by_hand_with_pg_restore(
    pg_client: Client, rich_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    backup = pg_client.backup(tmp_path / "by-hand.dump")
    target = new_pg_database(pg_cluster)
    as_owner = {**pg_cluster.env(), "PGUSER": target.role, "PGPASSWORD": target.password}
    subprocess.run(
        [
            "pg_restore",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "-d",
            target.name,
            str(backup.path),
        ],
        env=as_owner,
        check=True,
    )
    assert fingerprint(target)["rows"] == fingerprint(rich_db)["rows"]


@pytest.mark.parametrize("name", ["host=/nonexistent dbname=other", "-f/etc/passwd"])
def test_database_name_is_taken_literally(name: str, pg_cluster: Cluster, tmp_path: Path) -> None:
    decoy = new_pg_database(pg_cluster, f"other_{os.getpid()}_{len(name)}")
    decoy.execute("CREATE TABLE decoy (x int); INSERT INTO decoy VALUES (1);")
    db = new_pg_database(pg_cluster, name)
    db.execute("CREATE TABLE literal (x text); INSERT INTO literal VALUES ('original');")
    server = start_server(tmp_path, db.url, PASSWORD)
    try:
        with Client(server.target, PASSWORD) as client:
            assert client.server_info().database_name == name
            backup = client.backup(tmp_path / "literal.dump")
            db.execute("UPDATE literal SET x = 'changed'")
            client.restore(backup.path)
    finally:
        server.stop()
    with db.connect() as conn:
        assert conn.execute("SELECT x FROM literal").fetchall() == [("original",)]
    with decoy.connect() as conn:
        assert conn.execute("SELECT x FROM decoy").fetchall() == [(1,)]


def test_tar_archive_made_outside_restores(
    pg_client: Client, rich_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    original = fingerprint(rich_db)
    tar = pg_cluster.dump(rich_db.name, tmp_path / "gamevault-style.tar", "-F", "t")
    rich_db.execute("DROP SCHEMA shop CASCADE; CREATE TABLE public.junk (x int);")

    pg_client.restore(tar)

    assert fingerprint(rich_db) == original


def test_plain_sql_dump_restores(
    pg_client: Client, rich_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    original = fingerprint(rich_db)
    script = pg_cluster.dump(rich_db.name, tmp_path / "plain.sql", "-F", "p", "--no-owner")
    rich_db.execute("DELETE FROM shop.orders")
    pg_client.restore(script)
    assert fingerprint(rich_db) == original


def test_plain_dump_failing_on_its_last_statement_changes_nothing(
    pg_client: Client, rich_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    script = pg_cluster.dump(rich_db.name, tmp_path / "fails-last.sql", "-F", "p", "--no-owner")
    with open(script, "a") as f:
        f.write("\nSELECT 1 / 0;\n")
    rich_db.execute("UPDATE shop.customer SET name = 'current'; CREATE TABLE public.keep (x int);")
    before = fingerprint(rich_db)

    with pytest.raises(RestoreFailed) as info:
        pg_client.restore(script)

    assert info.value.database_state == "UNCHANGED"
    assert "division by zero" in info.value.message
    assert fingerprint(rich_db) == before


def test_plain_script_that_commits_on_its_own_is_refused(
    pg_server: Server, rich_db: PgDatabase
) -> None:
    before = fingerprint(rich_db)
    script = b"--\n-- PostgreSQL database dump\n--\nCREATE TABLE t (x int);\nCOMMIT;\n"
    _, err = raw_restore(pg_server, frames(script))
    assert err is not None
    assert error_reason(err) == (grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_BACKUP", "UNCHANGED")
    assert fingerprint(rich_db) == before


def test_sqlite_file_is_refused(pg_server: Server, rich_db: PgDatabase, tmp_path: Path) -> None:
    before = fingerprint(rich_db)
    sqlite_file = tmp_path / "x.sqlite"
    with sqlite3.connect(sqlite_file) as db:
        db.execute("CREATE TABLE t (x)")
    _, err = raw_restore(pg_server, frames(sqlite_file.read_bytes()))
    assert err is not None
    assert error_reason(err) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENGINE_MISMATCH",
        "UNCHANGED",
    )
    assert fingerprint(rich_db) == before


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:2000], "NOT_A_BACKUP"),
        (lambda data: data[:5] + b"\x01\x63" + data[7:], "VERSION_MISMATCH"),
        (lambda data: os.urandom(len(data)), "NOT_A_BACKUP"),
    ],
)
def test_damaged_archives_change_nothing(
    damage: Any,
    reason: str,
    pg_client: Client,
    pg_server: Server,
    rich_db: PgDatabase,
    tmp_path: Path,
) -> None:
    data = pg_client.backup(tmp_path / "x.dump").path.read_bytes()
    rich_db.execute("CREATE TABLE public.after_backup (x int)")
    before = fingerprint(rich_db)
    _, err = raw_restore(pg_server, frames(damage(data)))
    assert err is not None
    assert error_reason(err)[1:] == (reason, "UNCHANGED")
    assert fingerprint(rich_db) == before
    assert spool_leftovers(pg_server) == []


def test_other_server_version_needs_permission(
    pg_client: Client, rich_db: PgDatabase, tmp_path: Path
) -> None:
    backup = pg_client.backup(tmp_path / "x.dump")
    data = backup.path.read_bytes()
    major = pg_client.server_info().engine_version.split(".")[0].encode()
    older = str(int(major) - 1).encode()
    # Rewrite the source server version recorded in the header to the previous major.
    patched = data.replace(major + b".", older + b".", 1)
    assert patched != data
    forged = tmp_path / "older.dump"
    forged.write_bytes(patched)
    rich_db.execute("CREATE TABLE public.after_backup (x int)")
    before = fingerprint(rich_db)

    with pytest.raises(VersionMismatch) as info:
        pg_client.restore(forged)
    assert older.decode() in info.value.message and major.decode() in info.value.message
    assert fingerprint(rich_db) == before

    notices: list[str] = []
    pg_client.restore(
        forged, allow_version_mismatch=True, on_notice=lambda reason, _: notices.append(reason)
    )
    assert "VERSION_MISMATCH" in notices
    with rich_db.connect() as conn:
        assert conn.execute("SELECT to_regclass('public.after_backup')").fetchone() == (None,)


def test_pg_dump_older_than_server_first_on_path_is_passed_over(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    fake_bin = tmp_path / "old-tools"
    fake_bin.mkdir()
    for name in ("pg_dump", "pg_restore"):
        old = fake_bin / name
        old.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) 9.6.24'\n")
        old.chmod(0o755)
    server = start_server(
        tmp_path, pg_db.url, PASSWORD, env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    )
    try:
        with Client(server.target, PASSWORD) as client:
            info = client.server_info()
            result = client.backup(tmp_path / "app.dump")
        assert info.tool_versions["pg_dump"].split(".")[0] == info.engine_version.split(".")[0]
        assert not info.tool_versions["pg_dump path"].startswith(str(fake_bin))
        assert result.path.read_bytes().startswith(b"PGDMP")
    finally:
        server.stop()


def test_backup_cancelled_half_way_leaves_no_pg_dump(pg_server: Server, pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE big AS SELECT i, md5(i::text) || repeat('x', 500) AS t "
        "FROM generate_series(1, 200000) i"
    )
    with pg_server.channel() as channel:
        call = pb_grpc.BackupServiceStub(channel).Backup(
            pb.BackupRequest(compression_level=0), metadata=pg_server.metadata()
        )
        stream = iter(call)
        assert next(stream).WhichOneof("frame") == "manifest"
        assert next(stream).WhichOneof("frame") == "chunk"
        assert children_named(pg_server.process.pid, "pg_dump")
        call.cancel()  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 10
    while children_named(pg_server.process.pid, "pg_dump") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children_named(pg_server.process.pid, "pg_dump") == []


def test_backup_under_concurrent_writes_restores_consistently(
    pg_client: Client, pg_db: PgDatabase, tmp_path: Path
) -> None:
    pg_db.execute("""
        CREATE TABLE orders (id serial PRIMARY KEY, total int NOT NULL);
        CREATE TABLE lines (order_id int NOT NULL REFERENCES orders(id), amount int NOT NULL);
        CREATE TABLE counter (orders int NOT NULL, amount bigint NOT NULL);
        INSERT INTO counter VALUES (0, 0);
    """)
    stop = threading.Event()
    written = [0]

    def keep_writing() -> None:
        with pg_db.connect() as conn:
            conn.autocommit = False
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and written[0] < 50_000:
                with conn.transaction():
                    row = conn.execute(
                        "INSERT INTO orders (total) VALUES (30) RETURNING id"
                    ).fetchone()
                    assert row is not None
                    for amount in (5, 10, 15):
                        conn.execute("INSERT INTO lines VALUES (%s, %s)", (row[0], amount))
                    conn.execute("UPDATE counter SET orders = orders + 1, amount = amount + 30")
                written[0] += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        while written[0] < 100:
            time.sleep(0.01)
        backup = pg_client.backup(tmp_path / "busy.dump")
    finally:
        stop.set()
        writer.join()
    pg_client.restore(backup.path)
    with pg_db.connect() as conn:
        orders, lines, total = conn.execute(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM lines), "
            "(SELECT coalesce(sum(amount), 0) FROM lines)"
        ).fetchone()  # type: ignore[misc]
        assert conn.execute("SELECT orders, amount FROM counter").fetchone() == (orders, total)
        assert lines == 3 * orders and orders >= 100
        assert conn.execute(
            "SELECT count(*) FROM lines l LEFT JOIN orders o ON o.id = l.order_id "
            "WHERE o.id IS NULL"
        ).fetchone() == (0,)


def test_session_holding_locks_makes_restore_wait_then_fail(
    pg_client: Client, rich_db: PgDatabase, tmp_path: Path
) -> None:
    backup = pg_client.backup(tmp_path / "x.dump")
    rich_db.execute("CREATE TABLE public.after_backup (x int)")
    before = fingerprint(rich_db)
    with rich_db.connect() as holder:
        holder.autocommit = False
        holder.execute("SELECT count(*) FROM shop.customer")  # holds an ACCESS SHARE lock
        started = time.monotonic()
        with pytest.raises(Busy) as info:
            pg_client.restore(backup.path)
        waited = time.monotonic() - started
        holder.rollback()
    assert info.value.reason == "DATABASE_BUSY" and info.value.database_state == "UNCHANGED"
    assert 3 <= waited < 30
    assert fingerprint(rich_db) == before


def test_restore_can_terminate_blocking_sessions(
    pg_client: Client, rich_db: PgDatabase, tmp_path: Path
) -> None:
    original = fingerprint(rich_db)
    backup = pg_client.backup(tmp_path / "x.dump")
    rich_db.execute("CREATE TABLE public.after_backup (x int)")
    holder = rich_db.connect()
    holder.autocommit = False
    holder.execute("SELECT count(*) FROM shop.customer")
    # A superuser's idle session on the database: the owner role may not end it,
    # and it does not need to (it holds no lock); it must not fail the restore.
    admin = rich_db.cluster.connect(rich_db.name)
    notices: dict[str, str] = {}
    pg_client.restore(
        backup.path,
        terminate_blocking_sessions=True,
        on_notice=notices.__setitem__,
    )
    assert "1 session(s) of other roles were left alone" in notices["SESSIONS_TERMINATED"]
    assert fingerprint(rich_db) == original
    with pytest.raises(psycopg.OperationalError):
        holder.execute("SELECT 1")
    holder.close()
    assert admin.execute("SELECT 1").fetchone() == (1,)
    admin.close()


def test_owners_and_grantees_missing_here_are_skipped_with_a_notice(
    pg_client: Client, pg_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    source = new_pg_database(pg_cluster)
    with pg_cluster.connect(source.name) as admin:
        admin.execute("CREATE ROLE ghost_owner; CREATE ROLE ghost_reader")
        admin.execute("CREATE TABLE public.haunted (x int); INSERT INTO haunted VALUES (42)")
        admin.execute("ALTER TABLE public.haunted OWNER TO ghost_owner")
        admin.execute("GRANT SELECT ON public.haunted TO ghost_reader")
    archive = pg_cluster.dump(source.name, tmp_path / "foreign.dump", "-Fc")
    with pg_cluster.connect(source.name) as admin:
        admin.execute("DROP TABLE public.haunted; DROP ROLE ghost_owner; DROP ROLE ghost_reader")

    notices: list[str] = []
    pg_client.restore(archive, on_notice=lambda reason, _: notices.append(reason))

    assert {"OWNERSHIP_SKIPPED", "PRIVILEGES_SKIPPED"} <= set(notices)
    with pg_db.connect() as conn:
        assert conn.execute("SELECT x FROM public.haunted").fetchall() == [(42,)]
        assert conn.execute(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'haunted'"
        ).fetchone() == (pg_db.role,)


def test_info_names_versions_and_size(pg_client: Client, pg_db: PgDatabase) -> None:
    info = pg_client.server_info()
    assert info.engine == "PostgreSQL"
    assert info.database_name == pg_db.name
    assert info.database_size_bytes > 1_000_000
    tools = ("pg_dump", "pg_restore", "psql")
    assert set(info.tool_versions) == {*tools, *(f"{t} path" for t in tools), "psql (minimum)"}
    assert "15.14" in info.tool_versions["psql (minimum)"]
    assert info.warnings == []  # the owner role holds no rights beyond its database
    with pg_db.connect() as conn:
        version = conn.execute("SHOW server_version").fetchone()
    assert version is not None and str(version[0]).startswith(info.engine_version)


def test_dump_failing_half_way_ends_without_trailer(pg_db: PgDatabase, tmp_path: Path) -> None:
    fake_bin = tmp_path / "failing-tools"
    fake_bin.mkdir()
    failing = fake_bin / "pg_dump"
    failing.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) exec {shutil.which("pg_dump")} --version;; esac\n'
        "printf PGDMP; head -c 3000000 /dev/zero\n"
        "echo 'pg_dump: error: Dumping the contents of table \"t\" failed' >&2\n"
        "exit 1\n"
    )
    failing.chmod(0o755)
    server = start_server(
        tmp_path, pg_db.url, PASSWORD, env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    )
    try:
        with server.channel() as channel:
            frames_seen = []
            with pytest.raises(grpc.RpcError) as info:
                for response in pb_grpc.BackupServiceStub(channel).Backup(
                    pb.BackupRequest(), metadata=server.metadata()
                ):
                    frames_seen.append(response.WhichOneof("frame"))
        assert "chunk" in frames_seen and "trailer" not in frames_seen
        assert error_reason(info.value)[:2] == (grpc.StatusCode.INTERNAL, "BACKUP_FAILED")
        assert "Dumping the contents" in (info.value.details() or "")

        with Client(server.target, PASSWORD) as client, pytest.raises(BackupFailed):
            client.backup(tmp_path / "never.dump")
        assert list(tmp_path.glob("*never.dump*")) == []
    finally:
        server.stop()


def test_cli_round_trip(pg_server: Server, rich_db: PgDatabase, tmp_path: Path) -> None:
    original = fingerprint(rich_db)
    env = pg_server.client_env()
    out = tmp_path / "cli.dump"
    assert run_cli("backup", "-o", str(out), env=env).returncode == 0
    rich_db.execute("DROP SCHEMA shop CASCADE")
    result = run_cli("restore", str(out), "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert fingerprint(rich_db) == original
    info = run_cli("info", env=env)
    assert "PostgreSQL" in info.stdout and "pg_restore:" in info.stdout
