"""The lexer in front of psql (engines/postgres/script_guard.py), on its own and
against psql itself.

A hostile uploader would look for a place where the lexer and psql disagree
about where a statement, string or comment ends: a COMMIT the lexer reads as
inside a string but psql runs. The differential test feeds scripts built from
the tricky pieces of psql's lexer; whatever the guard lets through is run by a
real, restricted psql inside a transaction, and psql's command tags must show
that the transaction was never left.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from conftest import PgDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.server.config import PostgresTarget
from safehold.server.engines.postgres.script_guard import ScriptGuard, UnsafeScript
from safehold.server.engines.postgres.session import Replay
from safehold.server.engines.postgres.tools import connection_env
from safehold.server.engines.processes import child

PIECES = [
    "SELECT 1",
    "SELECT x",
    ";",
    "\n",
    " ",
    "'",
    "''",
    "E'",
    "e'",
    "\\",
    "\\'",
    "$$",
    "$a$",
    "$1",
    "a$b",
    "--",
    "/*",
    "*/",
    "COMMIT",
    "commit",
    "ROLLBACK",
    "BEGIN",
    "END",
    "ABORT",
    '"',
    "(",
    ")",
    "1e",
    "1.",
    ":",
    ":'x'",
    "U&'",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC",
    "CASE WHEN true THEN 1 END",
    "COPY t FROM stdin",
    "\\.",
    "\r",
    "\t",
    "x",
    "SAVEPOINT",
    "PREPARE",
    "TRANSACTION",
]
scripts = st.lists(st.sampled_from(PIECES), max_size=14).map("".join)


def guarded(script: bytes, split: int | None = None) -> bytes:
    guard = ScriptGuard(archive=False)
    if split is None:
        return guard.feed(script) + guard.finish()
    out = b"".join(guard.feed(script[i : i + split]) for i in range(0, len(script), split))
    return out + guard.finish()


@given(scripts, st.integers(min_value=1, max_value=7))
@settings(max_examples=400, deadline=None)
def test_the_decision_does_not_depend_on_how_the_input_is_cut(script: str, split: int) -> None:
    def outcome(cut: int | None) -> bytes | str:
        try:
            return guarded(script.encode(), cut)
        except UnsafeScript as exc:
            return str(exc)

    assert outcome(split) == outcome(None)


@pytest.fixture(scope="module")
def scratch(pg_cluster: object) -> Iterator[PgDatabase]:
    from conftest import new_pg_database

    yield new_pg_database(pg_cluster)  # type: ignore[arg-type]


@given(script=scripts)
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_what_the_guard_lets_through_never_leaves_the_transaction(
    script: str, scratch: PgDatabase
) -> None:
    try:
        guarded(script.encode())
    except UnsafeScript:
        return
    target = PostgresTarget("127.0.0.1", scratch.cluster.port, scratch.role, scratch.name)
    argv = ["psql", "-X", "--no-password", "-v", "ON_ERROR_STOP=1"]
    env = connection_env(target, scratch.password)
    with child(argv, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as psql:
        session = Replay(psql)
        try:
            session.open("CREATE TEMP TABLE t (x text);")
            session.replay([script.encode()], archive=False)
            session.commit()
        except BrokenPipeError:
            pass
        psql.wait()
        assert session.escaped() is None, script


LEGITIMATE = [
    "SELECT 'a''b'; SELECT $q$ it's $q$; SELECT E'\\\\'; SELECT \"x\"\"y\" FROM t;\n",
    "COPY t (a) FROM stdin;\nCOMMIT;\n\\.\nSELECT 1;\n",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;\n",
    "/* a /* nested */ comment; COMMIT; */ SELECT 1; -- and COMMIT; at the end",
]


@pytest.mark.parametrize("script", LEGITIMATE)
def test_legitimate_scripts_pass_unchanged(script: str) -> None:
    assert guarded(script.encode()) == script.encode()


def test_a_bare_begin_commit_pair_is_dropped_and_its_content_kept() -> None:
    script = b"\\restrict k1\nBEGIN;\nSELECT pg_catalog.lo_create(1);\nCOMMIT;\n\\unrestrict k1\n"
    assert guarded(script) == b"\nSELECT pg_catalog.lo_create(1);\n\n"
