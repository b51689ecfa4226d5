"""Which owners and grantees of an archive can be restored on this server.

An archive names the roles that owned its objects and were granted rights
on them. A role that does not exist here, or that the restoring role is not a
member of, would fail the whole restore; safehold leaves owners or privileges
out instead, and says so. The archive's table of contents is read as a
stream, so a huge one costs time, not memory.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from safehold.files import private_temp_file
from safehold.server.engines import Notice, Notify
from safehold.server.engines.postgres.tools import Tools, offline_env
from safehold.server.engines.processes import child
from safehold.server.errors import RestoreFailed

_MAX_ROLES = 10_000
"""More distinct role names than this in one archive: leave them all out."""
_GRANTEE = re.compile(r"^(?:GRANT|REVOKE) .* (?:TO|FROM) (\"(?:[^\"]|\"\")+\"|[^\s;,]+)")

Connect = Callable[[], psycopg.Connection[tuple[Any, ...]]]


def ownership_flags(tools: Tools, path: Path, connect: Connect, notify: Notify) -> list[str]:
    """pg_restore flags that leave out what this server cannot take, with a notice each."""
    owners: set[str] = set()
    has_acl = False
    acl_file = private_temp_file(path.parent, "safehold-acl-")
    try:
        with open(acl_file, "w") as acl:
            for line in _lines(tools, "--list", str(path)):
                fields = line.split()
                if not line or line.startswith(";") or len(fields) < 2:
                    continue
                if len(owners) <= _MAX_ROLES:
                    owners.add(fields[-1])
                if " ACL " in line:
                    acl.write(line + "\n")
                    has_acl = True
        grantees: set[str] = set()
        if has_acl:
            for line in _lines(tools, "--file=-", f"--use-list={acl_file}", str(path)):
                match = _GRANTEE.match(line)
                if match and len(grantees) <= _MAX_ROLES:
                    grantees.add(_unquote(match.group(1)))
    finally:
        acl_file.unlink(missing_ok=True)
    owners.discard("-")
    grantees.discard("PUBLIC")
    with connect() as db:
        user = str(_one(db, "SELECT current_user", ()))
        unusable = sorted(role for role in owners if not _member(db, role))
        missing = sorted(role for role in grantees if _one(db, _EXISTS, (role,)) is None)
    flags = []
    if unusable:
        flags.append("--no-owner")
        notify(
            Notice(
                "OWNERSHIP_SKIPPED",
                f"restored without the backup's owners ({_names(unusable)} do not exist here "
                f"or are not roles of {user}): every object is owned by {user}",
            )
        )
    if missing:
        flags.append("--no-privileges")
        notify(
            Notice(
                "PRIVILEGES_SKIPPED",
                f"restored without the backup's privileges: the roles {_names(missing)} do not "
                "exist here",
            )
        )
    return flags


_EXISTS = "SELECT 1 FROM pg_roles WHERE rolname = %s"
_MEMBER = "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s"


def _lines(tools: Tools, *args: str) -> Iterator[str]:
    """pg_restore's output for a local file, line by line, each line capped."""
    with child(tools.argv("pg_restore", *args), offline_env(), stdout=subprocess.PIPE) as run:
        while raw := run.stdout.readline(64 * 1024):
            yield raw.decode("utf-8", "replace").rstrip("\n")
        code = run.wait()
        if code != 0:
            detail = "; ".join(run.stderr_lines()[-3:])
            raise RestoreFailed(f"pg_restore cannot read the archive: {detail}")


def _member(db: psycopg.Connection[tuple[Any, ...]], role: str) -> bool:
    row = _one(
        db,
        "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s",
        (role,),
    )
    return bool(row)


def _one(db: psycopg.Connection[tuple[Any, ...]], query: str, args: tuple[str, ...]) -> Any:
    row = db.execute(query, args).fetchone()
    return None if row is None else row[0]


def _names(roles: list[str]) -> str:
    shown = ", ".join(roles[:20])
    return shown + (f" and {len(roles) - 20} more" if len(roles) > 20 else "")


def _unquote(role: str) -> str:
    return role[1:-1].replace('""', '"') if role.startswith('"') else role
