"""The application's schema version, on both engines: read from the database for
GetServerInfo and the manifest, read from the upload itself on restore, a newer
one refused unless allowed, an older one noted, an unknown one never refused."""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import PASSWORD, new_pg_database
from helpers import Server, run_cli, start_server

from safehold.client import Client, SchemaNewer
from safehold.contract import DatabaseState, Reason
from safehold.repository import open_repository
from safehold.server import config
from safehold.server.schema_version import SchemaVersion, compare, from_rows, judge

ENGINES = ["sqlite", "postgresql"]
TYPEORM = """
CREATE TABLE migrations (
    id integer PRIMARY KEY, "timestamp" bigint NOT NULL, name varchar NOT NULL
);
INSERT INTO migrations VALUES (1, 1700000000001, 'Init1700000000001'),
                              (2, 1700000000002, 'Games1700000000002');
CREATE TABLE games (id integer PRIMARY KEY, title varchar NOT NULL);
INSERT INTO games VALUES (1, 'Celeste'), (2, 'Hades');
"""
MIGRATION_3 = "INSERT INTO migrations VALUES (3, 1700000000003, 'Covers1700000000003')"


@dataclass
class Live:
    """A running server and a way to change and read its database behind its back."""

    server: Server
    execute: Callable[[str], None]
    query: Callable[[str], list[tuple[Any, ...]]]
    tables_query: str

    def client(self) -> Client:
        return Client(self.server.target, PASSWORD)

    def version(self) -> int:
        return int(self.query('SELECT max("timestamp") FROM migrations')[0][0])

    def tables(self) -> set[str]:
        return {str(row[0]) for row in self.query(self.tables_query)}


def _live(
    request: pytest.FixtureRequest, tmp_path: Path, *args: str, gamevault: bool
) -> Iterator[Live]:
    """A database of the engine request.param names, with a server started from
    GameVault's DB_* variables (gamevault) or from a plain URL and args."""
    if request.param == "sqlite":
        volume = tmp_path / "gamevault-db"
        volume.mkdir()
        path = volume / "database.sqlite"
        sqlite3.connect(path).close()

        def execute(statement: str) -> None:
            with sqlite3.connect(path) as db:
                db.executescript(statement)

        def query(statement: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as db:
                return db.execute(statement).fetchall()

        env = {"DB_SYSTEM": "SQLITE", "VOLUMES_SQLITEDB": str(volume)}
        tables = "SELECT name FROM sqlite_master WHERE type = 'table'"
        url = "" if gamevault else f"sqlite:///{path}"
    else:
        pg = new_pg_database(request.getfixturevalue("pg_cluster"))
        execute = pg.execute

        def query(statement: str) -> list[tuple[Any, ...]]:
            with pg.connect() as db:
                return db.execute(statement.encode()).fetchall()

        env = {
            "SAFEHOLD_PASSWORD": "",
            "DB_SYSTEM": "POSTGRESQL",
            "DB_HOST": "127.0.0.1",
            "DB_PORT": str(pg.cluster.port),
            "DB_USERNAME": pg.role,
            "DB_PASSWORD": PASSWORD,
            "DB_DATABASE": pg.name,
        }
        url = "" if gamevault else pg.url
        tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    server = start_server(tmp_path, url, PASSWORD, *args, env=env if gamevault else None)
    try:
        yield Live(server, execute, query, tables)
    finally:
        server.stop()


@pytest.fixture(params=ENGINES)
def gamevault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Live]:
    """A GameVault-shaped database (TypeORM's migrations table) next to safehold
    started from GameVault's environment."""
    for live in _live(request, tmp_path, gamevault=True):
        live.execute(TYPEORM)
        yield live


@pytest.fixture(params=ENGINES)
def plain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Live]:
    """An empty database behind a server with no schema version query: detection."""
    yield from _live(request, tmp_path, gamevault=False)


def test_info_manifest_and_sidecar_carry_the_schema_version(
    gamevault: Live, tmp_path: Path
) -> None:
    with gamevault.client() as client:
        assert client.server_info().schema_version == "1700000000002"
        result = client.backup(tmp_path / "out" / "")
        (tmp_path / "repository").mkdir()
        stored = client.backup_to(open_repository(str(tmp_path / "repository")))
    assert stored.schema_version == "1700000000002"
    assert result.schema_version == "1700000000002"
    sidecar = json.loads(result.path.with_name(result.path.name + ".manifest.json").read_text())
    assert sidecar["schema_version"] == "1700000000002"
    info = run_cli("info", "--json", env=gamevault.server.client_env())
    assert json.loads(info.stdout)["schema_version"] == "1700000000002"
    text = run_cli("info", env=gamevault.server.client_env()).stdout
    assert "schema:        1700000000002\n" in text


def test_newer_backup_is_refused_and_changes_nothing(gamevault: Live, tmp_path: Path) -> None:
    gamevault.execute(MIGRATION_3)
    with gamevault.client() as client:
        newer = client.backup(tmp_path / "newer.bak").path
        # The application is rolled back to the previous release, and its data goes on.
        gamevault.execute("DELETE FROM migrations WHERE id = 3; DELETE FROM games WHERE id = 1")
        with pytest.raises(SchemaNewer) as refused:
            client.restore(newer)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.reason == Reason.SCHEMA_NEWER
    assert refused.value.database_state == DatabaseState.UNCHANGED
    assert "1700000000003" in refused.value.message and "1700000000002" in refused.value.message
    assert gamevault.version() == 1700000000002
    assert gamevault.query("SELECT title FROM games") == [("Hades",)]


def test_newer_backup_with_the_override_is_restored_with_a_notice(
    gamevault: Live, tmp_path: Path
) -> None:
    gamevault.execute(MIGRATION_3)
    with gamevault.client() as client:
        newer = client.backup(tmp_path / "newer.bak").path
        gamevault.execute("DELETE FROM migrations WHERE id = 3; DELETE FROM games WHERE id = 1")
        result = client.restore(newer, allow_schema_downgrade=True)
    assert [reason for reason, _ in result.notices if reason.startswith("SCHEMA")] == [
        "SCHEMA_NEWER"
    ]
    assert gamevault.version() == 1700000000003
    assert gamevault.query("SELECT title FROM games ORDER BY id") == [("Celeste",), ("Hades",)]


def test_older_backup_is_restored_with_a_notice(gamevault: Live, tmp_path: Path) -> None:
    with gamevault.client() as client:
        older = client.backup(tmp_path / "older.bak").path
        gamevault.execute(MIGRATION_3)
        result = client.restore(older)
    notices = dict(result.notices)
    assert "next start" in notices["SCHEMA_OLDER"]
    assert "1700000000002" in notices["SCHEMA_OLDER"]
    assert gamevault.version() == 1700000000002


def test_cli_refuses_a_newer_backup_and_restores_it_when_allowed(
    gamevault: Live, tmp_path: Path
) -> None:
    env = gamevault.server.client_env()
    gamevault.execute(MIGRATION_3)
    backup = tmp_path / "newer.bak"
    assert run_cli("backup", "-o", str(backup), env=env).returncode == 0
    gamevault.execute("DELETE FROM migrations WHERE id = 3")

    refused = run_cli("restore", str(backup), "--yes", env=env)
    assert refused.returncode == 1
    assert "[SCHEMA_NEWER]" in refused.stderr and "--allow-schema-downgrade" in refused.stderr
    assert gamevault.version() == 1700000000002

    allowed = run_cli("restore", str(backup), "--yes", "--allow-schema-downgrade", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "notice [SCHEMA_NEWER]" in allowed.stderr
    assert gamevault.version() == 1700000000003


# Each migration table safehold detects, an upgrade of it, and the versions before
# and after; "none" is a database without any.
DETECTED = {
    "typeorm": (TYPEORM, MIGRATION_3, "1700000000002", "1700000000003"),
    "golang-migrate": (
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean "
        "NOT NULL); INSERT INTO schema_migrations VALUES (9, false);",
        "UPDATE schema_migrations SET version = 10",
        "9",
        "10",
    ),
    "rails": (
        "CREATE TABLE schema_migrations (version varchar NOT NULL PRIMARY KEY); "
        "INSERT INTO schema_migrations VALUES ('20230101120000'), ('20230202120000');",
        "INSERT INTO schema_migrations VALUES ('20230303120000')",
        "20230202120000",
        "20230303120000",
    ),
    "flyway": (
        "CREATE TABLE flyway_schema_history (installed_rank integer PRIMARY KEY, version "
        "varchar(50), description varchar(200), success boolean NOT NULL); "
        "INSERT INTO flyway_schema_history VALUES (1, '1', 'init', true), "
        "(2, '1.9', 'games', true), (3, NULL, 'views', true), (4, '1.10', 'failed', false);",
        "DELETE FROM flyway_schema_history WHERE installed_rank = 4; "
        "INSERT INTO flyway_schema_history VALUES (4, '1.10', 'covers', true)",
        "1.9",
        "1.10",
    ),
    "none": (
        "CREATE TABLE games (id integer PRIMARY KEY)",
        "CREATE TABLE covers (x integer)",
        "",
        "",
    ),
}


@pytest.mark.parametrize("kind", DETECTED)
def test_migration_tables_are_detected_on_both_sides(
    plain: Live, tmp_path: Path, kind: str
) -> None:
    create, upgrade, before, after = DETECTED[kind]
    plain.execute(create)
    with plain.client() as client:
        assert client.server_info().schema_version == before
        older = client.backup(tmp_path / "older.bak").path
        plain.execute(upgrade)
        assert client.server_info().schema_version == after
        notices = dict(client.restore(older).notices)
    if kind == "none":
        assert "not known" in notices["SCHEMA_UNKNOWN"] and "SCHEMA_OLDER" not in notices
        assert "covers" not in plain.tables()
    else:
        assert f"version {before} " in notices["SCHEMA_OLDER"]
        assert f"database's {after}:" in notices["SCHEMA_OLDER"]
    with plain.client() as client:
        assert client.server_info().schema_version == before


@pytest.fixture(params=ENGINES)
def custom(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Live]:
    """A server whose schema version query reads the application's own table."""
    query = "SELECT value FROM app_meta WHERE name = 'schema'"
    for live in _live(request, tmp_path, "--schema-version-query", query, gamevault=False):
        live.execute(
            "CREATE TABLE app_meta (name varchar PRIMARY KEY, value varchar); "
            "INSERT INTO app_meta VALUES ('schema', 'v-b'), ('other', 'v-z'); "
            # The detection would read this table; the configured query wins.
            + DETECTED["golang-migrate"][0]
        )
        yield live


def test_a_configured_query_gives_the_version(custom: Live, tmp_path: Path) -> None:
    with custom.client() as client:
        assert client.server_info().schema_version == "v-b"
        custom.execute("UPDATE app_meta SET value = 'v-c' WHERE name = 'schema'")
        newer = client.backup(tmp_path / "newer.bak").path
        custom.execute("UPDATE app_meta SET value = 'v-b' WHERE name = 'schema'")
        with pytest.raises(SchemaNewer, match="v-c"):
            client.restore(newer)
        assert custom.query("SELECT value FROM app_meta WHERE name = 'schema'") == [("v-b",)]
        # A query that stops giving one value makes the version unknown: never a refusal.
        custom.execute("DELETE FROM app_meta")
        assert client.server_info().schema_version == ""
        notices = dict(client.restore(newer).notices)
    assert "gave 0 rows" in notices["SCHEMA_UNKNOWN"]
    assert custom.query("SELECT value FROM app_meta WHERE name = 'schema'") == [("v-c",)]


def test_versions_order_as_numbers_dotted_numbers_or_text() -> None:
    assert compare("10", "9") == 1
    assert compare("1.10", "1.9") == 1
    assert compare("1700000000002", "1700000000002") == 0
    assert compare("2024_01", "2024_02") == -1
    assert compare("abc", "12") is None
    assert from_rows([("a", "b")], "q").value is None
    assert from_rows([(b"\x00",)], "q").value is None
    assert from_rows([(7,)], "q").value == "7"
    unknown = SchemaVersion(None, "no migration table")
    assert [n.reason for n in judge(unknown, SchemaVersion("1", "q"), False)] == ["SCHEMA_UNKNOWN"]
    assert [n.reason for n in judge(SchemaVersion("x", "q"), SchemaVersion("1", "q"), False)] == [
        "SCHEMA_UNKNOWN"
    ]


def test_gamevault_environment_defaults_to_typeorm_and_a_flag_wins(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    gamevault = {"SAFEHOLD_DATA_DIR": str(tmp_path), "DB_SYSTEM": "SQLITE"}
    assert config.load(parser.parse_args([]), gamevault).schema_version_query == (
        'SELECT max("timestamp") FROM migrations'
    )
    custom = ["--schema-version-query", "SELECT 1"]
    assert config.load(parser.parse_args(custom), gamevault).schema_version_query == "SELECT 1"
    environ = {**gamevault, "SAFEHOLD_SCHEMA_VERSION_QUERY": "SELECT 2"}
    assert config.load(parser.parse_args([]), environ).schema_version_query == "SELECT 2"
    plain = {"SAFEHOLD_DATA_DIR": str(tmp_path), "SAFEHOLD_DATABASE_URL": "sqlite:///x.sqlite"}
    assert config.load(parser.parse_args([]), plain).schema_version_query is None


HOSTILE_TAILS = {
    "a temporary table in front": (
        'CREATE TEMP TABLE migrations (id integer, "timestamp" bigint, name varchar);\n'
        "INSERT INTO migrations VALUES (1, 1, 'Fake1');\n"
    ),
    "catalog functions shadowed": (
        "SELECT pg_catalog.set_config('search_path', 'public', false);\n"
        "CREATE FUNCTION public.txid_current() RETURNS bigint LANGUAGE sql AS 'SELECT 1';\n"
        "CREATE FUNCTION public.current_setting(text, boolean) RETURNS text LANGUAGE sql\n"
        '    AS $$SELECT \'{"rows": "[{\\"v\\": 1}]"}\'$$;\n'
        "CREATE FUNCTION public.fake(text, bigint) RETURNS text LANGUAGE sql AS 'SELECT $1';\n"
        "CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = bigint, FUNCTION = public.fake);\n"
    ),
}


@pytest.mark.parametrize("tail", HOSTILE_TAILS)
def test_an_upload_cannot_hide_its_postgresql_schema_version(
    pg_cluster: object, tmp_path: Path, tail: str
) -> None:
    """The version is read from the upload's real migrations table with safehold's
    own catalog functions, whatever the upload defined to stand in for them."""
    pg = new_pg_database(pg_cluster)  # type: ignore[arg-type]
    pg.execute(TYPEORM)
    script = (
        "SET standard_conforming_strings = on;\n"
        + TYPEORM.replace("CREATE TABLE ", "CREATE TABLE public.").replace(
            "INSERT INTO ", "INSERT INTO public."
        )
        + MIGRATION_3.replace("INTO ", "INTO public.")
        + ";\n"
        + HOSTILE_TAILS[tail]
    )
    upload = tmp_path / "newer.sql"
    upload.write_text(script)
    server = start_server(tmp_path, pg.url, PASSWORD)
    try:
        with Client(server.target, PASSWORD) as client, pytest.raises(SchemaNewer) as refused:
            client.restore(upload)
    finally:
        server.stop()
    assert refused.value.database_state == DatabaseState.UNCHANGED
    assert "1700000000003" in refused.value.message
    with pg.connect() as db:
        assert db.execute('SELECT max("timestamp") FROM migrations').fetchone() == (1700000000002,)
        assert db.execute("SELECT count(*) FROM pg_proc WHERE proname = 'fake'").fetchone() == (0,)
