"""Which PostgreSQL client tools the server runs, with two client versions installed:
the system's (Debian's 15) and PostgreSQL 16's from the pgserver wheel, whose server
binaries also give a real PostgreSQL 16 to guard."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, PgDatabase, new_pg_database
from helpers import Server, run_cli, start_server
from pg import Cluster, cluster

from safehold.server.engines.postgres.tools import Tools, supports_restrict

_spec = importlib.util.find_spec("pgserver")  # not imported: only its binaries are used
assert _spec and _spec.submodule_search_locations, "pip install -e '.[dev]' brings pgserver"
PG16 = Path(_spec.submodule_search_locations[0]) / "pginstall" / "bin"
SYSTEM_PG_DUMP = shutil.which("pg_dump")
assert SYSTEM_PG_DUMP, "scripts/install-system-deps installs the system's client tools"
SYSTEM = str(Path(SYSTEM_PG_DUMP).parent)


@pytest.fixture(scope="module")
def pg16_cluster() -> Iterator[Cluster]:
    with cluster(PG16) as running:
        yield running


@pytest.fixture
def pg16_db(pg16_cluster: Cluster) -> PgDatabase:
    db = new_pg_database(pg16_cluster)
    with db.connect() as conn:
        conn.execute("CREATE TABLE games (id int PRIMARY KEY, title text)")
        conn.execute("INSERT INTO games SELECT i, 'game ' || i FROM generate_series(1, 100) i")
    return db


def test_the_servers_major_picks_pg_dump_and_a_restricting_psql() -> None:
    tools = Tools([str(PG16), SYSTEM])
    assert [c.major for c in tools.found["pg_dump"]] == [16, 15]
    system_version = tools.found["pg_dump"][1].version

    tools.select_for("16.4")
    assert tools.paths["pg_dump"] == str(PG16 / "pg_dump")
    assert tools.paths["pg_restore"] == str(PG16 / "pg_restore")
    # 16.2's psql has no \restrict: it is never a candidate; the system's runs restores.
    assert [c.path for c in tools.found["psql"]] == [os.path.join(SYSTEM, "psql")]
    assert tools.paths["psql"] == os.path.join(SYSTEM, "psql")
    assert tools.describe()["pg_dump path"] == str(PG16 / "pg_dump")

    tools.select_for(system_version)  # a server of the system's major: its own tools
    assert tools.paths["pg_dump"] == os.path.join(SYSTEM, "pg_dump")
    tools.select_for("14.9")  # no 14 installed: the newest dumps an older server
    assert tools.paths["pg_dump"] == str(PG16 / "pg_dump")


def test_no_psql_with_restrict_is_refused() -> None:
    with pytest.raises(OSError) as refused:
        Tools([str(PG16)])
    assert "psql 16.2 cannot restrict meta-commands" in str(refused.value)
    assert "install psql 13.22, 14.19, 15.14, 16.10, 17.6, 18 or newer" in str(refused.value)


def serve_with_path(tmp_path: Path, db: PgDatabase, path: str) -> Server:
    return start_server(tmp_path, db.url, PASSWORD, env={"PATH": path})


def test_a_16_server_is_dumped_and_restored_with_the_16_tools(
    tmp_path: Path, pg16_db: PgDatabase
) -> None:
    server = serve_with_path(tmp_path, pg16_db, f"{PG16}{os.pathsep}{os.environ['PATH']}")
    try:
        info = run_cli("info", "--json", env=server.client_env())
        assert info.returncode == 0, info.stderr
        tools = json.loads(info.stdout)["tool_versions"]
        assert tools["pg_dump"].startswith("16.") and tools["pg_dump path"] == str(PG16 / "pg_dump")
        assert supports_restrict(tools["psql"])

        dest = tmp_path / "app.dump"
        backup = run_cli("backup", "-o", str(dest), env=server.client_env())
        assert backup.returncode == 0, backup.stderr
        with pg16_db.connect() as conn:
            conn.execute("DELETE FROM games WHERE id > 10")
        restore = run_cli("restore", str(dest), "--yes", env=server.client_env())
        assert restore.returncode == 0, restore.stderr
        with pg16_db.connect() as conn:
            row = conn.execute("SELECT count(*), max(title) FROM games").fetchone()
        assert row == (100, "game 99")
    finally:
        server.stop()
    assert "backup of" in server.log() and "restore finished" in server.log()


def test_without_the_16_tools_a_16_server_is_not_dumped(
    tmp_path: Path, pg16_db: PgDatabase
) -> None:
    server = serve_with_path(tmp_path, pg16_db, os.environ["PATH"])
    try:
        backup = run_cli("backup", "-o", str(tmp_path / "never.dump"), env=server.client_env())
    finally:
        server.stop()
    assert backup.returncode == 1
    assert "older than the PostgreSQL server 16" in backup.stderr
    assert not (tmp_path / "never.dump").exists()


def test_a_15_server_with_16_tools_first_on_path_is_dumped_with_its_own(
    tmp_path: Path, pg_db: PgDatabase
) -> None:
    """The newest tools are not always the right ones: a server of the system's major
    is dumped by its own pg_dump, with a compression that pg_dump supports."""
    pg_db.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000);")
    server = serve_with_path(tmp_path, pg_db, f"{PG16}{os.pathsep}{os.environ['PATH']}")
    try:
        info = run_cli("info", "--json", env=server.client_env())
        dest = tmp_path / "app.dump"
        backup = run_cli("backup", "-o", str(dest), env=server.client_env())
    finally:
        server.stop()
    assert info.returncode == 0 and backup.returncode == 0, info.stderr + backup.stderr
    tools = json.loads(info.stdout)["tool_versions"]
    assert tools["pg_dump"].split(".")[0] == json.loads(info.stdout)["engine_version"][:2]
    assert not tools["pg_dump path"].startswith(str(PG16))
    assert dest.read_bytes().startswith(b"PGDMP")
