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

import glob
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safehold.server.config import PostgresTarget

NAMES = ("pg_dump", "pg_restore", "psql")
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}
"""The first minor release of each major whose psql has \\restrict; 18 and later all do."""
MINIMUM_PSQL = ", ".join(f"{major}.{minor}" for major, minor in RESTRICT_SINCE.items()) + ", 18"
_VERSION = re.compile(r"\) (\d+(?:\.\d+)*)")
DEBIAN_GLOB = "/usr/lib/postgresql/*/bin"
_KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR")


@dataclass(frozen=True)
class Candidate:
    """One installed copy of a tool (on PATH or in /usr/lib/postgresql/N/bin)."""

    path: str
    version: str

    @property
    def major(self) -> int:
        return _key(self.version)[0]


class Tools:
    """Which installed client tools to run, and their versions.

    Every copy of each tool on PATH and in Debian's /usr/lib/postgresql/*/bin is a
    candidate. For a server of major N (select_for), each tool is the newest copy of
    major N when there is one (a newer pg_dump's output may use settings an older
    server lacks, e.g. 17's transaction_timeout), else the newest copy, which can dump
    and read any older server; among equal versions PATH comes first. psql must also
    support \\restrict: a copy without it is never run, and with none that has it
    safehold refuses to start, so that nothing but a lexer would stand between an
    upload's meta-commands and this host.
    """

    def __init__(self, directories: Iterable[str] | None = None) -> None:
        searched = list(_candidates() if directories is None else directories)
        self.found = {name: _discover(name, searched) for name in NAMES}
        missing = [name for name, copies in self.found.items() if not copies]
        if missing:
            raise OSError(
                "PostgreSQL client tools not found on PATH or in /usr/lib/postgresql/*/bin: "
                + ", ".join(missing)
            )
        restricting = [c for c in self.found["psql"] if supports_restrict(c.version)]
        if not restricting:
            versions = ", ".join(sorted({c.version for c in self.found["psql"]}))
            raise OSError(
                f"psql {versions} cannot restrict meta-commands (\\restrict), so an uploaded "
                f"dump could run commands on this host; install psql {MINIMUM_PSQL} or newer"
            )
        self.found["psql"] = restricting
        self.paths: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.select_for(None)

    def select_for(self, server_version: str | None) -> bool:
        """Use the copies that fit a server of server_version (see the class); whether
        pg_dump changed (what it supports, e.g. its compression methods, may differ)."""
        major = _key(server_version)[0] if server_version else None
        dump_before = self.paths.get("pg_dump")
        for name, copies in self.found.items():
            same = [c for c in copies if c.major == major]
            chosen = max(same or copies, key=lambda c: _key(c.version))
            self.paths[name] = chosen.path
            self.versions[name] = chosen.version
        return self.paths["pg_dump"] != dump_before

    def describe(self) -> dict[str, str]:
        """Each tool's version and where it was found, for `safehold info`."""
        return {
            **self.versions,
            **{f"{name} path": path for name, path in self.paths.items()},
        }

    def argv(self, name: str, *args: str) -> list[str]:
        return [self.paths[name], *args]


def _candidates() -> list[str]:
    on_path = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    debian = sorted(glob.glob(DEBIAN_GLOB), key=lambda d: _key(Path(d).parent.name))
    return [*on_path, *reversed(debian)]


def _discover(name: str, directories: Iterable[str]) -> list[Candidate]:
    """Every executable copy of name in directories, in their order."""
    copies = []
    for directory in dict.fromkeys(directories):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            copies.append(Candidate(path, _version(path)))
    return copies


def _version(path: str) -> str:
    text = subprocess.run(
        [path, "--version"],
        env=offline_env(),
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout.decode("utf-8", "replace")
    match = _VERSION.search(text)
    if not match:
        raise OSError(f"cannot tell the version of {path}: {text!r}")
    return match.group(1)


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2]) or (0,)


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
