"""Fixtures: real SQLite files, a real PostgreSQL cluster, real safehold servers."""

from __future__ import annotations

import itertools
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from helpers import Server, start_server
from pg import Cluster, cluster

from safehold.client import Client

PASSWORD = "correct horse 'battery' \"staple\" $HOME ; & | \\"


def make_sqlite_db(path: Path, *, wal: bool = False) -> Path:
    """A small database with a schema worth restoring: tables, index, view, trigger."""
    with sqlite3.connect(path) as db:
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        db.executescript(
            """
            CREATE TABLE games (id INTEGER PRIMARY KEY, title TEXT NOT NULL, cover BLOB);
            CREATE INDEX games_title ON games(title);
            CREATE TABLE progress (game_id INTEGER REFERENCES games(id), minutes INTEGER);
            CREATE VIEW played AS SELECT title, minutes FROM games JOIN progress
                ON progress.game_id = games.id;
            CREATE TRIGGER no_negative BEFORE INSERT ON progress
                WHEN NEW.minutes < 0 BEGIN SELECT RAISE(ABORT, 'negative'); END;
            """
        )
        db.executemany(
            "INSERT INTO games (title, cover) VALUES (?, ?)",
            [(f"Game {i} ✓ ünïcödé", bytes(range(256)) * 4) for i in range(200)],
        )
        db.executemany("INSERT INTO progress VALUES (?, ?)", [(i, i * 7) for i in range(1, 201)])
    path.chmod(0o600)
    return path


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    return make_sqlite_db(tmp_path / "app.sqlite")


@pytest.fixture
def sqlite_server(tmp_path: Path, sqlite_db: Path) -> Iterator[Server]:
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    yield server
    server.stop()


@pytest.fixture
def client(sqlite_server: Server) -> Iterator[Client]:
    with Client(sqlite_server.target, sqlite_server.password) as c:
        yield c


@dataclass
class PgDatabase:
    """A database owned by a role with neither superuser nor CREATEDB rights."""

    cluster: Cluster
    name: str
    role: str
    password: str

    @property
    def url(self) -> str:
        return (
            f"postgresql://{quote(self.role, safe='')}@127.0.0.1:{self.cluster.port}/"
            f"{quote(self.name, safe='')}"
        )

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return self.cluster.connect(self.name, self.role, self.password)

    def execute(self, statement: str) -> None:
        with self.connect() as db:
            db.execute(statement.encode())


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    with cluster() as running:
        yield running


_names = itertools.count()


def new_pg_database(pg_cluster: Cluster, name: str | None = None) -> PgDatabase:
    n = next(_names)
    role = f"app_owner_{n}"
    pg_cluster.create_role(role, PASSWORD)
    db = PgDatabase(pg_cluster, name or f"app_{n}", role, PASSWORD)
    pg_cluster.create_database(db.name, role)
    return db


@pytest.fixture
def pg_db(pg_cluster: Cluster) -> PgDatabase:
    return new_pg_database(pg_cluster)


@pytest.fixture
def pg_server(tmp_path: Path, pg_db: PgDatabase) -> Iterator[Server]:
    server = start_server(tmp_path, pg_db.url, PASSWORD, "--lock-timeout", "3")
    yield server
    server.stop()


@pytest.fixture
def pg_client(pg_server: Server) -> Iterator[Client]:
    with Client(pg_server.target, pg_server.password) as c:
        yield c


@pytest.fixture
def metered(tmp_path: Path, sqlite_db: Path) -> Iterator[tuple[Server, str]]:
    """A SQLite server logging JSON and serving metrics; it and its /metrics URL."""
    server = start_server(
        tmp_path,
        f"sqlite:///{sqlite_db}",
        PASSWORD,
        "--log-json",
        "--metrics-listen",
        "127.0.0.1:0",
    )
    port = re.search(r"metrics on \S+ \(port (\d+)\)", server.log())
    assert port
    yield server, f"http://127.0.0.1:{port.group(1)}/metrics"
    server.stop()
