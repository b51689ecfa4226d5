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
class Installation:
    """One directory of client tools (a PATH entry or /usr/lib/postgresql/N/bin)."""

    directory: str
    versions: dict[str, str]
    """Version of each of NAMES found there."""

    def major(self, name: str) -> int:
        return _major(self.versions[name])


class Tools:
    """Which installed client tools to run, and their versions.

    Every directory on PATH that holds pg_dump, and Debian's /usr/lib/postgresql/*/bin,
    are candidates. pg_dump and pg_restore come from one installation: the newest
    minor of the server's own major when there is one (a newer pg_dump's output may
    use settings an older server lacks, e.g. 17's transaction_timeout), else the newest
    installed, which can dump any older server (select_for). psql must support
    \\restrict: the one beside them when it does, else the newest that does; none
    at all is refused, so that nothing but a lexer stands between an upload's
    meta-commands and this host.
    """

    def __init__(self, directories: Iterable[str] | None = None) -> None:
        self.installations = _discover(_candidates() if directories is None else directories)
        dumpers = [i for i in self.installations if {"pg_dump", "pg_restore"} <= i.versions.keys()]
        if not dumpers:
            raise OSError(
                "PostgreSQL client tools not found on PATH or in /usr/lib/postgresql/*/bin: "
                "pg_dump, pg_restore, psql"
            )
        self._dumpers = sorted(dumpers, key=lambda i: _key(i.versions["pg_dump"]), reverse=True)
        self._psqls = sorted(
            (i for i in self.installations if supports_restrict(i.versions.get("psql", "0"))),
            key=lambda i: _key(i.versions["psql"]),
            reverse=True,
        )
        if not self._psqls:
            found = [i.versions["psql"] for i in self.installations if "psql" in i.versions]
            raise OSError(
                f"psql {', '.join(found) or '(none found)'} cannot restrict meta-commands "
                "(\\restrict), so an uploaded dump could run commands on this host; install "
                f"psql {MINIMUM_PSQL} or newer"
            )
        self.paths: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self._use(self._dumpers[0])

    def select_for(self, server_version: str) -> None:
        """Use the tools that fit a server of server_version (see the class)."""
        major = _major(server_version)
        same = [i for i in self._dumpers if i.major("pg_dump") == major]
        self._use(same[0] if same else self._dumpers[0])

    def describe(self) -> dict[str, str]:
        """Each tool's version and where it was found, for `safehold info`."""
        return {
            **self.versions,
            **{f"{name} path": path for name, path in self.paths.items()},
        }

    def _use(self, dumper: Installation) -> None:
        psql = dumper if dumper in self._psqls else self._psqls[0]
        chosen = {"pg_dump": dumper, "pg_restore": dumper, "psql": psql}
        self.paths = {n: os.path.join(i.directory, n) for n, i in chosen.items()}
        self.versions = {n: i.versions[n] for n, i in chosen.items()}

    def argv(self, name: str, *args: str) -> list[str]:
        return [self.paths[name], *args]


def _candidates() -> list[str]:
    on_path = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    debian = sorted(glob.glob(DEBIAN_GLOB), key=lambda d: _key(Path(d).parent.name))
    return [*on_path, *reversed(debian)]


def _discover(directories: Iterable[str]) -> list[Installation]:
    """The installations among directories, each version once (PATH's first)."""
    found: list[Installation] = []
    seen: set[tuple[str, ...]] = set()
    for directory in directories:
        if not os.path.isfile(os.path.join(directory, "pg_dump")):
            continue
        versions = {
            name: _version(path)
            for name in NAMES
            if os.access(path := os.path.join(directory, name), os.X_OK)
        }
        signature = tuple(versions.get(name, "") for name in NAMES)
        if signature not in seen:
            seen.add(signature)
            found.append(Installation(directory, versions))
    return found


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


def _major(version: str) -> int:
    return _key(version)[0]


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
