"""Fixtures: a real SQLite database and a real safehold server in front of it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Server, start_server
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
