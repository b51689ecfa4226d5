"""Server configuration from flags, SAFEHOLD_* variables and GameVault's DB_*.

A flag wins over its SAFEHOLD_* variable, which wins over GameVault's DB_*
variables, which win over the embedded default (a SQLite file in the data
dir). With a database URL given, no DB_* value is used at all; with any DB_*
variable set, the embedded default never is. The password is never a flag:
it would show in `ps`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

from safehold.server import schedule

log = logging.getLogger(__name__)
N = TypeVar("N", int, float)

DEFAULT_LISTEN = "127.0.0.1:50051"
EMBEDDED_SQLITE_NAME = "safehold.sqlite"
"""The database `safehold serve` creates in its data dir when none is configured."""
TYPEORM_SCHEMA_QUERY = 'SELECT max("timestamp") FROM migrations'
"""GameVault's schema version: TypeORM records each migration it ran in `migrations`
(id, timestamp bigint, name); the newest timestamp is the schema's version."""


class ConfigError(Exception):
    """The configuration cannot work; the message says what to change."""


@dataclass(frozen=True)
class PostgresTarget:
    """Where the PostgreSQL database is. Each value is passed to libpq as itself."""

    host: str
    port: int
    user: str
    dbname: str

    def describe(self) -> str:
        """Engine, role, host:port/name: exactly where the backups come from."""
        return f"postgresql {self.user}@{self.host}:{self.port}/{self.dbname}"


@dataclass(frozen=True)
class SqliteTarget:
    """Path of the live SQLite database file."""

    path: Path

    def describe(self) -> str:
        """Engine and file: exactly where the backups come from."""
        return f"sqlite {self.path}"


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate, and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None


@dataclass(frozen=True)
class Config:
    """Everything `safehold serve` needs; built by load()."""

    target: PostgresTarget | SqliteTarget
    password: str = field(repr=False)
    listen: str
    data_dir: Path
    spool_dir: Path
    pre_restore_path: Path | None
    keep_pre_restore: int
    max_upload_bytes: int
    tls: TlsConfig | None
    lock_timeout_seconds: float
    shutdown_grace_seconds: float
    stall_timeout_seconds: float
    inspect_timeout_seconds: float
    restore_timeout_seconds: float
    max_concurrent_backups: int
    log_json: bool
    metrics_listen: str | None
    schema_version_query: str | None = None
    """The application's schema version; None detects common migration tables."""
    reflection: bool = False
    health_listen: str | None = None
    health_interval_seconds: float = 10.0
    """How often BackupService's health probes the database."""
    repository: schedule.RepositorySettings | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; each falls back to the environment variable it names."""
    env = "(env %s)"
    parser.add_argument(
        "--database-url",
        help="postgresql://user@host:port/db or "
        "sqlite:///path/to/file.sqlite " + env % "SAFEHOLD_DATABASE_URL",
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        help="file holding the database password "
        + env % "SAFEHOLD_PASSWORD_FILE, or SAFEHOLD_PASSWORD itself",
    )
    parser.add_argument(
        "--listen",
        help=f"host:port to serve on, default {DEFAULT_LISTEN} " + env % "SAFEHOLD_LISTEN",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where safehold keeps its own files " + env % "SAFEHOLD_DATA_DIR",
    )
    parser.add_argument("--tls-cert", type=Path, help=env % "SAFEHOLD_TLS_CERT")
    parser.add_argument("--tls-key", type=Path, help=env % "SAFEHOLD_TLS_KEY")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        help="require client certificates from this CA " + env % "SAFEHOLD_TLS_CLIENT_CA",
    )
    parser.add_argument(
        "--spool-dir", type=Path, help="where uploads are spooled " + env % "SAFEHOLD_SPOOL_DIR"
    )
    parser.add_argument(
        "--pre-restore-path",
        type=Path,
        help="directory of the backups taken before each restore, default <data dir>/pre-restore "
        + env % "SAFEHOLD_PRE_RESTORE_PATH",
    )
    parser.add_argument(
        "--keep-pre-restore",
        type=int,
        help="how many pre-restore backups to keep, newest first, default 3 "
        + env % "SAFEHOLD_KEEP_PRE_RESTORE",
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        help="refuse larger uploads; 0 means no limit " + env % "SAFEHOLD_MAX_UPLOAD_BYTES",
    )
    parser.add_argument(
        "--lock-timeout",
        type=float,
        help="seconds to wait for the database's locks before a restore "
        "fails, default 30 " + env % "SAFEHOLD_LOCK_TIMEOUT",
    )
    parser.add_argument(
        "--max-concurrent-backups",
        type=int,
        help="backups beyond this many at once get RESOURCE_EXHAUSTED, default 8 "
        + env % "SAFEHOLD_MAX_CONCURRENT_BACKUPS",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        help="seconds running calls may go on after SIGTERM before they are cancelled, "
        "default 30 " + env % "SAFEHOLD_SHUTDOWN_GRACE",
    )
    parser.add_argument(
        "--stall-timeout",
        "--upload-idle-timeout",
        dest="stall_timeout",
        type=float,
        help="end a backup whose client receives nothing, or an upload that sends nothing, "
        "for this many seconds, default 60; 0 never "
        + env
        % "SAFEHOLD_STALL_TIMEOUT, or SAFEHOLD_UPLOAD_IDLE_TIMEOUT",
    )
    parser.add_argument(
        "--reflection",
        action="store_true",
        default=None,
        help="serve gRPC server reflection (no password needed), off by default "
        + env % "SAFEHOLD_REFLECTION",
    )
    parser.add_argument(
        "--health-listen",
        help="also serve health checks in plaintext on this loopback host:port, for a "
        "container HEALTHCHECK when TLS is on " + env % "SAFEHOLD_HEALTH_LISTEN",
    )
    parser.add_argument(
        "--inspect-timeout",
        type=float,
        help="refuse an upload whose checks (SQLite's integrity check) take longer, "
        "default 600 " + env % "SAFEHOLD_INSPECT_TIMEOUT",
    )
    parser.add_argument(
        "--schema-version-query",
        help="read-only SQL giving the application's schema version (one row, one value "
        "that orders); default with GameVault's DB_* variables: TypeORM's migrations table, "
        "otherwise common migration tables are detected " + env % "SAFEHOLD_SCHEMA_VERSION_QUERY",
    )
    parser.add_argument(
        "--restore-timeout",
        type=float,
        help="end a PostgreSQL replace that runs longer (rolled back), default 21600 (6 h); "
        "0 never " + env % "SAFEHOLD_RESTORE_TIMEOUT",
    )
    parser.add_argument(
        "--metrics-listen",
        help="serve Prometheus metrics on host:port, e.g. 127.0.0.1:9464; off by default "
        + env % "SAFEHOLD_METRICS_LISTEN",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        help="seconds between probes of the database for BackupService's health, "
        "default 10 " + env % "SAFEHOLD_HEALTH_INTERVAL",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log JSON lines " + env % "SAFEHOLD_LOG_JSON",
    )
    schedule.add_arguments(parser)


def load(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """Resolve the configuration; raise ConfigError saying what to fix."""

    def pick(flag: object, name: str) -> str | None:
        if flag is not None:
            return str(flag)
        return environ.get(f"SAFEHOLD_{name}") or None

    data_dir = Path(pick(args.data_dir, "DATA_DIR") or _default_data_dir(environ))
    if args.database_url and urlsplit(args.database_url).password is not None:
        raise ConfigError(
            "--database-url carries a password, which every user sees in `ps`: put the URL "
            "in SAFEHOLD_DATABASE_URL, or the password in SAFEHOLD_PASSWORD or --password-file"
        )
    url = pick(args.database_url, "DATABASE_URL")
    gamevault_url = None if url else _gamevault_url(environ)
    url = url or gamevault_url
    target, url_password = (
        parse_database_url(url) if url else (SqliteTarget(data_dir / EMBEDDED_SQLITE_NAME), None)
    )
    if gamevault_url and isinstance(target, PostgresTarget):
        url_password = environ.get("DB_PASSWORD") or GAMEVAULT_DEFAULTS["DB_PASSWORD"]
    password = _password(args, environ, url_password, target, data_dir)
    _check_metadata_safe(password)
    cert, key = pick(args.tls_cert, "TLS_CERT"), pick(args.tls_key, "TLS_KEY")
    client_ca = pick(args.tls_client_ca, "TLS_CLIENT_CA")
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if client_ca and not cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if key:
        _check_private(Path(key))
    health_listen = pick(args.health_listen, "HEALTH_LISTEN")
    if health_listen and not _loopback(health_listen):
        raise ConfigError(
            f"--health-listen {health_listen} must be a loopback address such as "
            "127.0.0.1:50052: it is served without TLS"
        )
    pre_restore = pick(args.pre_restore_path, "PRE_RESTORE_PATH")
    return Config(
        target=target,
        password=password,
        listen=pick(args.listen, "LISTEN") or DEFAULT_LISTEN,
        data_dir=data_dir,
        spool_dir=Path(pick(args.spool_dir, "SPOOL_DIR") or data_dir / "spool"),
        pre_restore_path=Path(pre_restore) if pre_restore else None,
        keep_pre_restore=_at_least_one(
            pick(args.keep_pre_restore, "KEEP_PRE_RESTORE") or "3", "keep pre-restore"
        ),
        max_upload_bytes=_non_negative(
            pick(args.max_upload_bytes, "MAX_UPLOAD_BYTES") or "0", "max upload bytes", int
        ),
        tls=TlsConfig(Path(cert), Path(key), Path(client_ca) if client_ca else None)
        if cert and key
        else None,
        lock_timeout_seconds=_non_negative(
            pick(args.lock_timeout, "LOCK_TIMEOUT") or "30", "lock timeout", float
        ),
        max_concurrent_backups=max(
            1,
            _non_negative(
                pick(args.max_concurrent_backups, "MAX_CONCURRENT_BACKUPS") or "8",
                "max concurrent backups",
                int,
            ),
        ),
        shutdown_grace_seconds=_non_negative(
            pick(args.shutdown_grace, "SHUTDOWN_GRACE") or "30", "shutdown grace", float
        ),
        stall_timeout_seconds=_non_negative(
            pick(args.stall_timeout, "STALL_TIMEOUT")
            or environ.get("SAFEHOLD_UPLOAD_IDLE_TIMEOUT")
            or "60",
            "stall timeout",
            float,
        ),
        inspect_timeout_seconds=_non_negative(
            pick(args.inspect_timeout, "INSPECT_TIMEOUT") or "600", "inspect timeout", float
        ),
        restore_timeout_seconds=_non_negative(
            pick(args.restore_timeout, "RESTORE_TIMEOUT") or "21600", "restore timeout", float
        ),
        log_json=_flag(pick(args.log_json, "LOG_JSON")),
        metrics_listen=pick(args.metrics_listen, "METRICS_LISTEN"),
        reflection=_flag(pick(args.reflection, "REFLECTION")),
        health_listen=health_listen,
        health_interval_seconds=_health_interval(pick(args.health_interval, "HEALTH_INTERVAL")),
        schema_version_query=pick(args.schema_version_query, "SCHEMA_VERSION_QUERY")
        or (TYPEORM_SCHEMA_QUERY if gamevault_url else None),
        repository=_repository_settings(args, environ),
    )


def _repository_settings(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> schedule.RepositorySettings | None:
    try:
        return schedule.load(args, environ)
    except schedule.ScheduleError as err:
        raise ConfigError(str(err)) from None


def parse_database_url(url: str) -> tuple[PostgresTarget | SqliteTarget, str | None]:
    """The target a URL names, and the password it carries, if any."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if not parts.path or parts.path == "/":
            raise ConfigError("a SQLite URL needs a path: sqlite:///path/to/file.sqlite")
        # sqlite:///abs/path and SQLAlchemy's sqlite:////abs/path name the same file.
        return SqliteTarget(Path("/" + unquote(parts.path).lstrip("/"))), None
    if parts.scheme in ("postgresql", "postgres"):
        dbname = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        user = unquote(parts.username or "")
        if not dbname or not user:
            raise ConfigError(
                "a PostgreSQL URL needs a user and a database: postgresql://user@host:port/dbname"
            )
        try:
            port = parts.port or 5432
        except ValueError as exc:
            raise ConfigError(f"bad port in database URL: {exc}") from None
        host = unquote(parts.hostname or "localhost")
        password = unquote(parts.password) if parts.password is not None else None
        return PostgresTarget(host=host, port=port, user=user, dbname=dbname), password
    raise ConfigError(
        f"unsupported database URL scheme {parts.scheme!r}: use postgresql:// or sqlite:///"
    )


GAMEVAULT_DEFAULTS = {
    "DB_SYSTEM": "POSTGRESQL",
    "DB_HOST": "localhost",
    "DB_PORT": "5432",
    "DB_USERNAME": "default",
    "DB_PASSWORD": "default",
    "DB_DATABASE": "gamevault",
    "VOLUMES_SQLITEDB": "/db",
}
"""GameVault's own defaults for its database variables, as its configuration docs list them."""

_GAMEVAULT_TRIGGERS = (
    "DB_SYSTEM",
    "DB_HOST",
    "DB_PORT",
    "DB_USERNAME",
    "DB_PASSWORD",
    "DB_DATABASE",
)


def _gamevault_url(environ: Mapping[str, str]) -> str | None:
    """A database URL from GameVault's DB_* variables, read the way GameVault reads
    them: any of them set means GameVault's configuration, and what is unset takes
    GameVault's default (DB_SYSTEM unset is POSTGRESQL), never safehold's own file."""
    if not any(name in environ for name in _GAMEVAULT_TRIGGERS):
        return None

    def value(name: str) -> str:
        return environ.get(name) or GAMEVAULT_DEFAULTS[name]

    system = value("DB_SYSTEM").upper()
    if system == "SQLITE":
        return f"sqlite:///{Path(value('VOLUMES_SQLITEDB')) / 'database.sqlite'}"
    if system in ("POSTGRESQL", "POSTGRES"):
        user = quote(value("DB_USERNAME"), safe="")
        db = quote(value("DB_DATABASE"), safe="")
        return f"postgresql://{user}@{value('DB_HOST')}:{value('DB_PORT')}/{db}"
    raise ConfigError(f"DB_SYSTEM must be POSTGRESQL or SQLITE, not {system!r}")


def _password(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    url_password: str | None,
    target: PostgresTarget | SqliteTarget,
    data_dir: Path,
) -> str:
    """The password callers must send, from the first source that has one."""
    file = args.password_file or environ.get("SAFEHOLD_PASSWORD_FILE")
    if file:
        try:
            password = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read password file {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"password file {file} is not UTF-8 text") from None
        if not password:
            raise ConfigError(f"password file {file} is empty: callers could not authenticate")
        return password
    for value in (environ.get("SAFEHOLD_PASSWORD"), url_password):
        if value:
            return value
    if isinstance(target, PostgresTarget):
        raise ConfigError("no database password: set SAFEHOLD_PASSWORD or --password-file")
    return _generated_password(data_dir)


def _generated_password(data_dir: Path) -> str:
    """The SQLite server's own password, created once and kept mode 0600."""
    path = data_dir / "password"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")
    log.info("generated a database password for callers; it is in %s", path)
    return password


def _check_metadata_safe(password: str) -> None:
    """gRPC metadata values are printable ASCII: a password with anything else
    could never be sent by a caller, so every call would be refused."""
    if not all(" " <= c <= "~" for c in password):
        raise ConfigError(
            "the password has characters gRPC metadata cannot carry (only printable ASCII "
            "can be sent in x-database-password): choose an ASCII password"
        )


def _check_private(key: Path) -> None:
    """A TLS key that other users can read is no longer the server's secret."""
    try:
        mode = key.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read TLS key {key}: {exc.strerror}") from None
    if mode & 0o004:
        raise ConfigError(
            f"TLS key {key} is readable by every user (mode {mode & 0o777:o}): run chmod 600 {key}"
        )


def _loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag(text: str | None) -> bool:
    return (text or "").lower() in ("1", "true", "yes")


def _default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "safehold"


def _health_interval(text: str | None) -> float:
    """At least a tenth of a second: a zero would probe the database in a busy loop."""
    value = _non_negative(text or "10", "health interval", float)
    if value < 0.1:
        raise ConfigError("health interval must be at least 0.1 seconds")
    return value


def _non_negative(text: str, what: str, kind: Callable[[str], N]) -> N:
    """text as a number of the given kind (int or float), refused when negative."""
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, not {text!r}") from None
    if value < 0:
        raise ConfigError(f"{what} must not be negative")
    return value


def _at_least_one(text: str, what: str) -> int:
    """A count that must not be zero: keeping no pre-restore backup would leave
    a restore with nothing to go back to."""
    value = _non_negative(text, what, int)
    if value < 1:
        raise ConfigError(f"{what} must be at least 1")
    return value
