"""The application's schema version: which query reads it, how two versions
compare, and what a restore does when they differ.

An application migrates an older database forward when it starts, but breaks on
a database from a newer version of itself. So a restore reads the schema version
of the upload itself (never what the client claims) and of the database it
replaces, refuses a newer one unless asked, and says when it is older.

With no query configured, safehold looks for the migration tables whose versions
order: TypeORM's `migrations` (a millisecond timestamp per migration), the
`schema_migrations` of golang-migrate and Rails (a number or a numeric
timestamp), and Flyway's `flyway_schema_history` (dotted versions, applied in
order). Alembic's `alembic_version` is left out on purpose: its ids are random
hashes, and only the migration scripts know which comes first; so is Django's
`django_migrations`, whose names order only within one app.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from safehold.server.config import TYPEORM_SCHEMA_QUERY
from safehold.server.engines import Notice
from safehold.server.errors import SchemaNewer

VALUE_LIMIT = 200
"""A version longer than this is not a version: it is cut, and then unknown."""


@dataclass(frozen=True)
class VersionQuery:
    """SQL that works on both engines, and what it reads, for messages."""

    label: str
    sql: str


DETECTED = (
    VersionQuery("TypeORM's migrations table", TYPEORM_SCHEMA_QUERY),
    VersionQuery(
        "the schema_migrations table (golang-migrate, Rails)",
        "SELECT max(CAST(version AS bigint)) FROM schema_migrations",
    ),
    VersionQuery(
        "Flyway's flyway_schema_history",
        "SELECT version FROM flyway_schema_history WHERE success AND version IS NOT NULL "
        "ORDER BY installed_rank DESC LIMIT 1",
    ),
)
"""Tried in this order; the first whose table (and columns) exist gives the version."""


def queries(configured: str | None) -> tuple[VersionQuery, ...]:
    """The configured query alone, or the detection list."""
    if configured:
        return (VersionQuery("the schema version query", configured),)
    return DETECTED


@dataclass(frozen=True)
class SchemaVersion:
    """A database's schema version, or why it is not known."""

    value: str | None
    source: str
    """Which query gave it, or why there is none."""

    def __str__(self) -> str:
        return self.value if self.value is not None else f"unknown ({self.source})"


def read(
    run: Callable[[str], Sequence[Sequence[Any]]],
    candidates: Sequence[VersionQuery],
    error: type[Exception] | tuple[type[Exception], ...],
) -> SchemaVersion:
    """The version the first candidate that runs gives. run executes one query
    read-only and returns its rows; error is what it raises when the query fails
    (a missing table: try the next candidate)."""
    failures: list[str] = []
    for query in candidates:
        try:
            rows = run(query.sql)
        except error as exc:
            failures.append(str(exc).strip().splitlines()[0] if str(exc).strip() else "failed")
            continue
        return from_rows(rows, query.label)
    if len(candidates) == 1:
        return SchemaVersion(None, f"{candidates[0].label} failed: {failures[0]}")
    return SchemaVersion(None, "no migration table safehold knows is there")


def from_rows(rows: Sequence[Sequence[Any]], label: str) -> SchemaVersion:
    """One row with one value that is a number or text; anything else is unknown."""
    if len(rows) != 1 or len(rows[0]) != 1:
        shape = f"{len(rows)} rows" if len(rows) != 1 else f"{len(rows[0])} values"
        return SchemaVersion(None, f"{label} gave {shape}, not one row with one value")
    return from_value(rows[0][0], label)


def from_value(value: object, label: str) -> SchemaVersion:
    if value is None:
        return SchemaVersion(None, f"{label} gave no value (no migration recorded)")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return SchemaVersion(None, f"{label} gave a {type(value).__name__}, not a number or text")
    text = str(value)
    if not text or len(text) > VALUE_LIMIT or not text.isprintable():
        return SchemaVersion(None, f"{label} gave a value that is no version")
    return SchemaVersion(text, label)


_DOTTED = re.compile(r"\d+(?:\.\d+)*")


def compare(a: str, b: str) -> int | None:
    """-1, 0 or 1 as a orders before, with or after b; None when they do not
    compare. Numbers, dotted ones included (Flyway's 1.10 after 1.9), compare
    as numbers; text with text."""
    a_numeric, b_numeric = bool(_DOTTED.fullmatch(a)), bool(_DOTTED.fullmatch(b))
    if a_numeric != b_numeric:
        return None
    if a_numeric:
        left: tuple[int, ...] | str = tuple(int(p) for p in a.split("."))
        right: tuple[int, ...] | str = tuple(int(p) for p in b.split("."))
    else:
        left, right = a, b
    return (left > right) - (left < right)  # type: ignore[operator]


def judge(upload: SchemaVersion, live: SchemaVersion, allow_downgrade: bool) -> list[Notice]:
    """What a restore of upload over live should tell; raises SchemaNewer when
    the upload is newer and the caller did not allow it."""
    if upload.value is None or live.value is None:
        return [
            Notice(
                "SCHEMA_UNKNOWN",
                f"the application's schema version is not known, so it was not compared: "
                f"the backup's is {upload}, the database's {live}",
            )
        ]
    order = compare(upload.value, live.value)
    versions = (
        f"the backup's application schema version {upload.value} ({upload.source}) "
        f"is {{}} the database's {live.value}"
    )
    if order is None:
        return [Notice("SCHEMA_UNKNOWN", versions.format("not comparable with"))]
    if order > 0:
        message = versions.format("newer than")
        if not allow_downgrade:
            raise SchemaNewer(
                f"{message}: this version of the application would not understand it. "
                "Upgrade the application first, or set allow_schema_downgrade "
                "(--allow-schema-downgrade) to restore it anyway"
            )
        return [Notice("SCHEMA_NEWER", f"{message}; restored anyway, as asked")]
    if order < 0:
        return [
            Notice(
                "SCHEMA_OLDER",
                f"{versions.format('older than')}: the application will migrate it "
                "forward on its next start",
            )
        ]
    return []
