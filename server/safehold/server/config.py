"""Server configuration from flags, SAFEHOLD_* variables and GameVault's DB_*.

A flag wins over its SAFEHOLD_* variable, which wins over GameVault's DB_*
variables, which win over the embedded default (a SQLite file in the data
dir). The password is never a flag: it would show in `ps`.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

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


@dataclass(frozen=True)
class SqliteTarget:
    """Path of the live SQLite database file."""

    path: Path


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
    upload_idle_timeout_seconds: float
    inspect_timeout_seconds: float
    max_concurrent_backups: int
    log_json: bool
    metrics_listen: str | None
    schema_version_query: str | None = None
    """The application's schema version; None detects common migration tables."""


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
        "--upload-idle-timeout",
        type=float,
        help="end an upload that sends nothing for this many seconds, default 60; 0 never "
        + env % "SAFEHOLD_UPLOAD_IDLE_TIMEOUT",
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
        "--metrics-listen",
        help="serve Prometheus metrics on host:port, e.g. 127.0.0.1:9464; off by default "
        + env % "SAFEHOLD_METRICS_LISTEN",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log JSON lines " + env % "SAFEHOLD_LOG_JSON",
    )


def load(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """Resolve the configuration; raise ConfigError saying what to fix."""

    def pick(flag: object, name: str) -> str | None:
        if flag is not None:
            return str(flag)
        return environ.get(f"SAFEHOLD_{name}") or None

    data_dir = Path(pick(args.data_dir, "DATA_DIR") or _default_data_dir(environ))
    url = pick(args.database_url, "DATABASE_URL") or _gamevault_url(environ)
    target, url_password = (
        parse_database_url(url) if url else (SqliteTarget(data_dir / EMBEDDED_SQLITE_NAME), None)
    )
    password = _password(args, environ, url_password, target, data_dir)
    cert, key = pick(args.tls_cert, "TLS_CERT"), pick(args.tls_key, "TLS_KEY")
    client_ca = pick(args.tls_client_ca, "TLS_CLIENT_CA")
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if client_ca and not cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
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
        upload_idle_timeout_seconds=_non_negative(
            pick(args.upload_idle_timeout, "UPLOAD_IDLE_TIMEOUT") or "60",
            "upload idle timeout",
            float,
        ),
        inspect_timeout_seconds=_non_negative(
            pick(args.inspect_timeout, "INSPECT_TIMEOUT") or "600", "inspect timeout", float
        ),
        log_json=(pick(args.log_json, "LOG_JSON") or "").lower() in ("1", "true", "yes"),
        metrics_listen=pick(args.metrics_listen, "METRICS_LISTEN"),
        schema_version_query=pick(args.schema_version_query, "SCHEMA_VERSION_QUERY")
        or (TYPEORM_SCHEMA_QUERY if url and url == _gamevault_url(environ) else None),
    )


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


def _gamevault_url(environ: Mapping[str, str]) -> str | None:
    """A database URL from GameVault's DB_* variables, so safehold can share its env."""
    system = environ.get("DB_SYSTEM", "").upper()
    if system == "SQLITE":
        volume = environ.get("VOLUMES_SQLITEDB", "/db")
        return f"sqlite:///{Path(volume) / 'database.sqlite'}"
    if system in ("POSTGRESQL", "POSTGRES"):
        user = quote(environ.get("DB_USERNAME", "default"), safe="")
        host = environ.get("DB_HOST", "localhost")
        port = environ.get("DB_PORT", "5432")
        db = quote(environ.get("DB_DATABASE", "gamevault"), safe="")
        return f"postgresql://{user}@{host}:{port}/{db}"
    return None


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
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read password file {file}: {exc.strerror}") from None
    for value in (environ.get("SAFEHOLD_PASSWORD"), url_password, environ.get("DB_PASSWORD")):
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


def _default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "safehold"


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
