"""The PostgreSQL client tools safehold runs, their versions, and what each child may see.

psql must support `\\restrict` (CVE-2025-8714): without it, nothing but a
lexer would stand between an upload's meta-commands and safehold's host, so
safehold refuses to start with an older psql.

A child's environment is built from nothing, not copied from the server's:
safehold's own secrets (SAFEHOLD_PASSWORD, DB_PASSWORD, cloud keys) never
reach pg_dump, pg_restore or psql, and calls that read only a local file get
no password at all. Connection values reach libpq as environment variables,
which it takes literally: a database called `host=/x dbname=y` is just a name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from safehold.server.config import PostgresTarget

NAMES = ("pg_dump", "pg_restore", "psql")
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
"""The first minor release of each major whose psql has \\restrict; 18 and later all do."""
MINIMUM_PSQL = ", ".join(f"{major}.{minor}" for major, minor in RESTRICT_SINCE.items()) + ", 18"
_VERSION = re.compile(r"\) (\d+(?:\.\d+)*)")
_KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR")


class Tools:
    """Where the tools are and which versions they are; refuses a psql without \\restrict."""

    def __init__(self) -> None:
        found = {name: shutil.which(name) for name in NAMES}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise OSError(f"PostgreSQL client tools not found on PATH: {', '.join(missing)}")
        self.paths = {name: str(path) for name, path in found.items()}
        self.versions = {name: self._version(name) for name in NAMES}
        if not supports_restrict(self.versions["psql"]):
            raise OSError(
                f"psql {self.versions['psql']} cannot restrict meta-commands (\\restrict), so an "
                f"uploaded dump could run commands on this host; install psql {MINIMUM_PSQL} "
                "or newer"
            )

    def argv(self, name: str, *args: str) -> list[str]:
        return [self.paths[name], *args]

    def _version(self, name: str) -> str:
        text = subprocess.run(
            self.argv(name, "--version"),
            env=offline_env(),
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout.decode("utf-8", "replace")
        match = _VERSION.search(text)
        if not match:
            raise OSError(f"cannot tell the version of {name}: {text!r}")
        return match.group(1)


def supports_restrict(version: str) -> bool:
    parts = [int(p) for p in version.split(".")[:2]] + [0]
    major, minor = parts[0], parts[1]
    return major >= 18 or (major in RESTRICT_SINCE and minor >= RESTRICT_SINCE[major])


def offline_env() -> dict[str, str]:
    """For calls that read only a local file: no connection values, no secrets."""
    env = {name: os.environ[name] for name in _KEPT_VARIABLES if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(PGSYSCONFDIR="/nonexistent", PGSERVICEFILE="/nonexistent", PGPASSFILE="/dev/null")
    return env


def connection_env(target: PostgresTarget, password: str) -> dict[str, str]:
    """For calls that connect to the target, and only to it."""
    return {
        **offline_env(),
        "PGHOST": target.host,
        "PGPORT": str(target.port),
        "PGUSER": target.user,
        "PGDATABASE": target.dbname,
        "PGPASSWORD": password,
        "PGAPPNAME": "safehold",
        "PGCONNECT_TIMEOUT": "10",
    }
