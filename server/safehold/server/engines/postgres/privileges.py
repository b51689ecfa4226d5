"""What the database role needs for an owner-only restore, checked up front.

A restore drops the database's own schemas and recreates `public` owned by
`pg_database_owner`. That works for the database's owner without superuser
rights only where `public` belongs to `pg_database_owner`: the default from
PostgreSQL 15 on. Before 15 it belongs to the bootstrap superuser, and before
14 `pg_database_owner` does not exist. Saying so before a restore starts beats
failing half-way through its transaction.
"""

from __future__ import annotations

from typing import Any

import psycopg

SUPPORTED_MAJOR = 15
"""The oldest PostgreSQL whose defaults let the database's owner restore on its own."""

_ROLE_EXISTS_FROM = 140000
"""server_version_num from which the role pg_database_owner exists."""

_FOREIGN_SCHEMAS = """
SELECT n.nspname, pg_catalog.pg_get_userbyid(n.nspowner)
FROM pg_catalog.pg_namespace n
WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND NOT pg_catalog.pg_has_role(current_user, n.nspowner, 'MEMBER')
ORDER BY n.nspname
"""


def restore_blockers(db: psycopg.Connection[tuple[Any, ...]]) -> list[str]:
    """One sentence per thing that would stop a restore, each saying what to grant."""
    row = db.execute("SELECT current_setting('server_version_num')::int, current_user").fetchone()
    assert row is not None
    version_num, user = int(row[0]), str(row[1])
    if version_num < _ROLE_EXISTS_FROM:
        return [
            f"PostgreSQL {version_num // 10000} has no pg_database_owner role: restores need "
            f"PostgreSQL 14 or later ({SUPPORTED_MAJOR} or later without changes); "
            "backups work"
        ]
    return [
        f"the schema {schema} belongs to {owner}, not to {user}: a restore drops and "
        f"recreates it, so a superuser must run `ALTER SCHEMA {schema} OWNER TO "
        f"pg_database_owner` (the default from PostgreSQL {SUPPORTED_MAJOR} on)"
        for schema, owner in db.execute(_FOREIGN_SCHEMAS).fetchall()
    ]
