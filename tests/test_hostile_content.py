"""Hostile content: what an uploaded dump can make safehold's tools do.

The threat model (DESIGN.md): whoever holds the password may replace the
database's content with any content, and read a backup of it; nothing more.
So an upload is data, never a command. What a hostile uploader could try, and
what stops it:

- psql meta-commands (`\\!` shell, `\\o`/`\\w`/`\\copy` files, `\\i` reads,
  `\\setenv`, `\\connect` other databases, `\\set ON_ERROR_STOP off`): the lexer
  (script_guard.py) refuses them at inspection, and psql runs restricted with a
  key the upload cannot know, so one that slipped past the lexer fails the
  restore instead of running;
- transaction control (COMMIT, END, ROLLBACK, ABORT, PREPARE TRANSACTION, SAVEPOINT,
  in any case, indentation, comment or position, in plain scripts and inside an
  archive's table of contents): refused at inspection; one that slips past is
  seen in psql's command tags, the pre-restore backup goes back and the caller
  is told RESTORED_FROM_PRE_RESTORE_BACKUP, never UNCHANGED;
- broken headers: NOT_A_BACKUP, never INTERNAL;
- floods of output (notices, one enormous line): bounded memory.

Every row asserts status, reason, database_state, and that the database holds
exactly what that state says; rows with a side effect check that it did not
happen.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, PgDatabase, new_pg_database
from helpers import Server, error_reason, frames, raw_restore, run_cli, start_server
from pg import Cluster
from test_postgres import fingerprint

from safehold.client import Client
from safehold.server.engines.postgres.tools import supports_restrict
from safehold.v1 import backup_service_pb2 as pb

HEADER = "--\n-- PostgreSQL database dump\n--\n\nSET standard_conforming_strings = on;\n"
NEW_CONTENT = "CREATE TABLE public.replaced (x int);\nINSERT INTO public.replaced VALUES (1);\n"
# psql's lexer follows standard_conforming_strings as the server reports it; a
# set_config() call is a function, not a SET the lexer can see. With it off, psql
# reads 'x\' as an unfinished string where the lexer sees a finished one: what
# follows is hidden from the lexer but run by psql. Only psql's restriction and
# the command-tag watcher stand behind that.
PAST_THE_LEXER = (
    "SELECT pg_catalog.set_config('standard_conforming_strings', 'off', false);\n"
    "SELECT 'x\\';\n"
    "SELECT ' ; {hidden} SELECT 1; --';\n"
)


@pytest.fixture
def victim(pg_db: PgDatabase) -> PgDatabase:
    pg_db.execute(
        "CREATE TABLE public.precious (id int PRIMARY KEY, v text);"
        "INSERT INTO public.precious SELECT i, md5(i::text) FROM generate_series(1, 50) i;"
        "CREATE SCHEMA keep; CREATE TABLE keep.more (x int); INSERT INTO keep.more VALUES (7);"
    )
    return pg_db


@pytest.fixture
def bystander(pg_cluster: Cluster, victim: PgDatabase) -> PgDatabase:
    """Another database the same role owns: no upload may reach it."""
    other = new_pg_database(pg_cluster)
    with pg_cluster.connect(other.name) as db:
        db.execute(f'GRANT ALL ON SCHEMA public TO "{victim.role}"')
    with pg_cluster.connect(other.name, victim.role, victim.password) as db:
        db.execute("CREATE TABLE bystander (x int); INSERT INTO bystander VALUES (1)")
    return other


def upload(server: Server, data: bytes) -> tuple[list[pb.RestoreResponse], grpc.RpcError | None]:
    return raw_restore(server, frames(data, engine=pb.ENGINE_POSTGRESQL))


def assert_refused_unchanged(server: Server, db: PgDatabase, data: bytes) -> str:
    """The upload is refused as not a backup and the database is exactly as before."""
    before = fingerprint(db)
    _, err = upload(server, data)
    assert err is not None
    assert error_reason(err) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_A_BACKUP",
        "UNCHANGED",
    ), err.details()
    assert fingerprint(db) == before
    return str(err.details())


@dataclass(frozen=True)
class MetaCase:
    name: str
    script: str
    """With {marker} for a file that must never appear and {other} for the bystander."""


META_CASES = [
    MetaCase("shell", "\\! touch {marker}\n"),
    MetaCase("shell mid-line", "SELECT 1; \\! touch {marker}\n"),
    MetaCase("output to file", "\\o {marker}\nSELECT 1;\n"),
    MetaCase("query buffer to file", "SELECT 1\n\\w {marker}\n"),
    MetaCase("\\g to file", "SELECT 1 \\g {marker}\n"),
    MetaCase("\\copy to file", "\\copy (SELECT 1) TO '{marker}'\n"),
    MetaCase("include a file", "\\i {marker}\n"),
    MetaCase("environment", "\\setenv PGPASSWORD stolen\n"),
    MetaCase("another database", "\\connect {other}\nDROP TABLE bystander;\n"),
    MetaCase("errors off", "\\set ON_ERROR_STOP off\nSELECT 1/0;\n"),
    MetaCase("indented", "   \\! touch {marker}\n"),
]


@pytest.mark.parametrize("case", META_CASES, ids=[c.name for c in META_CASES])
def test_meta_commands_in_a_plain_script_never_run(
    case: MetaCase, pg_server: Server, victim: PgDatabase, bystander: PgDatabase, tmp_path: Path
) -> None:
    marker = tmp_path / "owned.txt"
    script = case.script.format(marker=marker, other=bystander.name)
    data = (HEADER + NEW_CONTENT + script + NEW_CONTENT.replace("replaced", "after")).encode()

    details = assert_refused_unchanged(pg_server, victim, data)

    assert "meta-command" in details
    assert not marker.exists()
    with bystander.cluster.connect(bystander.name) as db:
        assert db.execute("SELECT count(*) FROM bystander").fetchone() == (1,)


TRANSACTION_CASES = {
    "commit": "COMMIT;",
    "indented lower case": "    commit;",
    "after a statement on its line": "SELECT 1; COMMIT;",
    "after a comment": "/* innocent */ COMMIT;",
    "keyword and semicolon apart": "Commit\n\n;",
    "end": "END;",
    "rollback": "ROLLBACK;",
    "abort": "ABORT;",
    "commit and chain": "COMMIT AND CHAIN;",
    "prepare transaction": "PREPARE TRANSACTION 'x';",
    "savepoint": "SAVEPOINT s;",
    "start transaction": "START TRANSACTION;",
    "rollback prepared": "ROLLBACK PREPARED 'x';",
    "unpaired commit after a pair": "BEGIN;\nCOMMIT;\nCOMMIT;",
    "begin with options": "BEGIN ISOLATION LEVEL SERIALIZABLE;\nCOMMIT;",
    "E-string continued on the next line": "SELECT E'a'\n'\\' ; SELECT '; COMMIT; --';",
    "a number then a quote": "SELECT 1e'\\'; COMMIT; --';",
    "after COPY data's end on its line": "COPY public.replaced FROM stdin; COMMIT;\n1\n\\.",
    "after a BEGIN ATOMIC body": (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT;"
    ),
    "standard strings off": "SET standard_conforming_strings = off;",
}


@pytest.mark.parametrize("sql", TRANSACTION_CASES.values(), ids=TRANSACTION_CASES.keys())
def test_transaction_control_in_a_plain_script_is_refused(
    sql: str, pg_server: Server, victim: PgDatabase
) -> None:
    data = (HEADER + NEW_CONTENT + sql + "\n" + NEW_CONTENT.replace("replaced", "z")).encode()
    assert_refused_unchanged(pg_server, victim, data)


@pytest.mark.parametrize(
    "tail",
    [
        # psql reaches safehold's end check, whose transaction id differs from the start's
        pytest.param("CREATE TABLE public.late (x int);\n", id="then completes"),
        # psql stops before it: only the command tags it printed tell what happened
        pytest.param("SELECT 1/0;\n", id="then fails"),
    ],
)
def test_a_commit_past_the_lexer_is_caught_and_the_database_put_back(
    tail: str, pg_server: Server, victim: PgDatabase
) -> None:
    before = fingerprint(victim)
    hidden = PAST_THE_LEXER.format(hidden="COMMIT;")
    data = (HEADER + NEW_CONTENT + hidden + tail).encode()

    _, err = upload(pg_server, data)

    assert err is not None
    assert error_reason(err) == (
        grpc.StatusCode.ABORTED,
        "RESTORE_FAILED",
        "RESTORED_FROM_PRE_RESTORE_BACKUP",
    ), err.details()
    assert "COMMIT" in str(err.details())
    assert fingerprint(victim) == before


def test_a_meta_command_past_the_lexer_does_not_run(
    pg_server: Server, victim: PgDatabase, tmp_path: Path
) -> None:
    marker = tmp_path / "owned.txt"
    before = fingerprint(victim)
    hidden = PAST_THE_LEXER.format(hidden=f"\\! touch {marker}\n")
    data = (HEADER + NEW_CONTENT + hidden).encode()

    _, err = upload(pg_server, data)

    assert err is not None
    assert error_reason(err) == (grpc.StatusCode.ABORTED, "RESTORE_FAILED", "UNCHANGED")
    assert "restricted" in str(err.details())
    assert not marker.exists()
    assert fingerprint(victim) == before


def crafted_archive(
    cluster: Cluster, db: PgDatabase, tmp_path: Path, fmt: str, payload: str
) -> bytes:
    """A real pg_dump archive whose table-of-contents entry for a comment carries
    payload where the comment's text was: what a stranger can write into an archive."""
    filler = "X" * 200
    db.execute(f"CREATE TABLE public.tagged (x int); COMMENT ON TABLE public.tagged IS '{filler}'")
    data = cluster.dump(db.name, tmp_path / f"crafted.{fmt}", f"-F{fmt}").read_bytes()
    db.execute("DROP TABLE public.tagged")
    assert len(payload) <= len(filler)
    patched = data.replace(filler.encode(), payload.ljust(len(filler)).encode())
    assert patched != data
    return patched


@pytest.mark.parametrize("fmt", ["c", "t"])
@pytest.mark.parametrize("attack", ["commit", "meta-command"])
def test_archive_toc_entries_are_data_too(
    fmt: str, attack: str, pg_server: Server, victim: PgDatabase, tmp_path: Path
) -> None:
    marker = tmp_path / "owned.txt"
    payload = {
        "commit": "'; COMMIT; SELECT '",
        "meta-command": f"'; \\! touch {marker}\nSELECT '",
    }[attack]
    data = crafted_archive(victim.cluster, victim, tmp_path, fmt, payload)

    assert_refused_unchanged(pg_server, victim, data)
    assert not marker.exists()


def test_dumps_with_and_without_restrict_lines_restore(
    pg_server: Server, victim: PgDatabase, tmp_path: Path
) -> None:
    """pg_dump 13.22/14.19/15.14/16.10/17.6 and later write \\restrict lines; older
    ones do not. Both are legitimate plain dumps, large objects included (pg_dump
    wraps them in their own BEGIN ... COMMIT)."""
    victim.execute("SELECT lo_from_bytea(4242, 'large object');")
    expected = fingerprint(victim)
    modern = victim.cluster.dump(victim.name, tmp_path / "modern.sql").read_bytes()
    assert re.search(rb"^\\restrict \w+$", modern, re.MULTILINE)
    assert b"\nBEGIN;\n" in modern
    old = re.sub(rb"^\\(un)?restrict \w+\n", b"", modern, flags=re.MULTILINE)

    for data in (modern, old):
        victim.execute("DROP TABLE public.precious; CREATE TABLE public.noise (x int);")
        _, err = upload(pg_server, data)
        assert err is None, err.details()
        assert fingerprint(victim) == expected
        with victim.connect() as db:
            assert db.execute("SELECT lo_get(4242)").fetchone() == (b"large object",)


@pytest.mark.parametrize(
    ("flags", "old", "new"),
    [
        pytest.param((), b"database version 15", b"database version x5", id="plain"),
        pytest.param(("-Fc",), b"15.", b"xx.", id="custom"),
    ],
)
def test_broken_version_in_a_header_is_not_a_backup(
    flags: tuple[str, ...],
    old: bytes,
    new: bytes,
    pg_server: Server,
    victim: PgDatabase,
    tmp_path: Path,
) -> None:
    data = victim.cluster.dump(victim.name, tmp_path / "x", *flags).read_bytes()
    broken = data.replace(old, new, 1)
    assert broken != data
    assert_refused_unchanged(pg_server, victim, broken)


def test_floods_of_output_keep_memory_and_notices_bounded(
    pg_server: Server, victim: PgDatabase
) -> None:
    warnings = "DO $$ BEGIN RAISE WARNING 'flood'; END $$;\n" * 3000
    huge_line = "SELECT '" + "y" * (48 * 1024 * 1024) + "' IS NOT NULL;\n"
    data = (HEADER + NEW_CONTENT + warnings + huge_line).encode()

    responses, err = upload(pg_server, data)

    assert err is None, err.details()
    notices = [r.notice for r in responses if r.WhichOneof("frame") == "notice"]
    assert 0 < len(notices) <= 250
    with victim.connect() as db:
        assert db.execute("SELECT x FROM public.replaced").fetchone() == (1,)
    peak_kib = _peak_rss_kib(pg_server)
    assert peak_kib < 160 * 1024, f"server peak RSS {peak_kib} KiB for a 48 MiB line"


def _peak_rss_kib(server: Server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match
    return int(match.group(1))


def test_children_never_see_the_servers_secrets(victim: PgDatabase, tmp_path: Path) -> None:
    """pg_restore, psql and pg_dump get an environment built from nothing: a wrapper
    first on PATH records what each one saw."""
    record = tmp_path / "environments"
    record.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore", "psql"):
        real = shutil.which(tool)
        assert real
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nenv > {record}/{tool}-$$\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    secrets = {"DB_PASSWORD": "gamevault-secret", "AWS_SECRET_ACCESS_KEY": "cloud-secret"}
    path = f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"
    server = start_server(tmp_path, victim.url, victim.password, env={"PATH": path, **secrets})
    try:
        archive = victim.cluster.dump(victim.name, tmp_path / "a.dump", "-Fc").read_bytes()
        _, err = upload(server, archive)
        assert err is None, err.details()
    finally:
        server.stop()

    seen = {p.name: p.read_text() for p in record.iterdir()}
    for name, text in seen.items():
        for secret in (*secrets.values(), "SAFEHOLD_PASSWORD"):
            assert secret not in text, (name, secret)
    offline = [text for name, text in seen.items() if name.startswith("pg_restore-")]
    assert len(offline) >= 2
    assert all(victim.password not in text for text in offline)
    assert any(f"PGPASSWORD={victim.password}" in t for n, t in seen.items() if "psql" in n)


def test_the_compose_init_script_makes_a_role_without_warnings(
    pg_cluster: Cluster, tmp_path: Path
) -> None:
    """README's compose example runs examples/compose/initdb/ as the postgres image does."""
    script = Path(__file__).parent.parent / "examples/compose/initdb/10-gamevault-role.sh"
    env = {
        **pg_cluster.env(),
        "POSTGRES_USER": "postgres",
        "DB_USERNAME": "gamevault_compose",
        "DB_PASSWORD": PASSWORD,
        "DB_DATABASE": "gamevault_compose",
    }
    subprocess.run([str(script)], env=env, check=True, capture_output=True)
    url = f"postgresql://gamevault_compose@127.0.0.1:{pg_cluster.port}/gamevault_compose"
    server = start_server(tmp_path, url, PASSWORD)
    try:
        with Client(server.target, PASSWORD) as client:
            assert client.server_info().warnings == []
    finally:
        server.stop()


@pytest.mark.parametrize("power", ["SUPERUSER", "CREATEROLE", "pg_read_server_files"])
def test_a_role_with_rights_beyond_its_database_is_warned_about(
    power: str, pg_cluster: Cluster, tmp_path: Path
) -> None:
    db = new_pg_database(pg_cluster)
    with pg_cluster.connect() as admin:
        grant = "GRANT {} TO {}" if power.startswith("pg_") else "ALTER ROLE {1} {0}"
        admin.execute(grant.format(power, db.role))
    server = start_server(tmp_path, db.url, db.password)
    try:
        with Client(server.target, db.password) as client:
            warnings = client.server_info().warnings
        assert len(warnings) == 1 and power in warnings[0] and "COPY" in warnings[0]
        assert power in server.log()
        run = run_cli("info", env=server.client_env())
        assert "warning:" in run.stdout and power in run.stdout
    finally:
        server.stop()


def test_a_psql_without_restrict_is_never_run(pg_db: PgDatabase, tmp_path: Path) -> None:
    """psql 15.13 cannot \\restrict: an upload's meta-commands would have only the lexer
    in their way. First on PATH, it is passed over for an installed psql that can; with
    none that can, safehold refuses to run (test_no_psql_with_restrict_is_refused)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        (bin_dir / tool).symlink_to(str(shutil.which(tool)))
    fake = bin_dir / "psql"
    fake.write_text("#!/bin/sh\necho 'psql (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)'\n")
    fake.chmod(0o755)
    server = start_server(
        tmp_path, pg_db.url, pg_db.password, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}
    )
    try:
        info = run_cli("info", "--json", env=server.client_env())
    finally:
        server.stop()
    assert info.returncode == 0, info.stderr
    tools = json.loads(info.stdout)["tool_versions"]
    assert tools["psql path"] != str(fake) and tools["psql"] != "15.13"
    assert supports_restrict(tools["psql"])


def test_a_dump_that_sleeps_cannot_hold_the_database(victim: PgDatabase, tmp_path: Path) -> None:
    """The content is the uploader's to choose, but not how long it holds the
    database's locks: past --restore-timeout psql is ended and nothing commits."""
    before = fingerprint(victim)
    server = start_server(tmp_path, victim.url, victim.password, "--restore-timeout", "3")
    try:
        data = (HEADER + NEW_CONTENT + "SELECT pg_catalog.pg_sleep(600);\n").encode()
        _, err = upload(server, data)
        assert err is not None
        assert error_reason(err) == (grpc.StatusCode.ABORTED, "RESTORE_FAILED", "UNCHANGED")
        assert "--restore-timeout" in str(err.details())
        assert fingerprint(victim) == before
        with victim.connect() as db:  # the application gets its tables back at once
            db.execute("SET lock_timeout = '5s'; ALTER TABLE public.precious ADD COLUMN n int")
    finally:
        server.stop()
