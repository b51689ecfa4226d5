"""The `safehold` command: serve, backup, restore, info.

Every failure ends with a non-zero exit and one line saying what happened and
whether the database was touched.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safehold.client import output
from safehold.client.client import DEFAULT_TARGET, Client, TlsOptions, open_channel
from safehold.client.errors import SafeholdError
from safehold.client.progress import TerminalProgress
from safehold.contract import DatabaseState

EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb == "serve":
        from safehold.server import app

        return app.run(args)
    if args.verb == "health":
        return _health(args)
    try:
        with Client(
            args.target, _password(), tls=_tls(args), connect_timeout=args.connect_timeout
        ) as client:
            verb: Callable[[Client, argparse.Namespace], int] = args.run
            return verb(client, args)
    except SafeholdError as err:
        print(f"safehold: {args.verb} failed: {_explain(err)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as err:
        print(f"safehold: {args.verb} failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"safehold: {args.verb} interrupted", file=sys.stderr)
        return 130


def _backup(client: Client, args: argparse.Namespace) -> int:
    progress = _progress_display()
    destination = output.plan(args.output, force=args.force)
    result = client.backup(
        destination, compression_level=args.compression_level, on_progress=progress
    )
    if progress:
        progress.finish()
    # A backup streamed to stdout must not get this line mixed into it.
    print(
        f"backup of {result.database_name} ({result.engine} {result.engine_version}) "
        f"saved to {result.path}: {result.size_bytes} bytes, sha256 {result.sha256}",
        file=sys.stderr if destination.kind is output.Kind.STREAM else sys.stdout,
    )
    return 0


def _restore(client: Client, args: argparse.Namespace) -> int:
    if not args.yes and not _confirm(client, args.file):
        print("safehold: restore cancelled; the database is unchanged", file=sys.stderr)
        return EXIT_FAILED
    progress = _progress_display()

    def show_notice(reason: str, message: str) -> None:
        if progress:
            progress.finish()
        print(f"notice [{reason}]: {message}", file=sys.stderr)

    result = client.restore(
        args.file,
        allow_version_mismatch=args.allow_version_mismatch,
        terminate_blocking_sessions=args.terminate_blocking_sessions,
        allow_schema_downgrade=args.allow_schema_downgrade,
        on_progress=progress,
        on_notice=show_notice,
    )
    if progress:
        progress.finish()
    print(
        f"restored {result.bytes_restored} bytes into the {result.engine} database in "
        f"{result.duration.total_seconds():.1f}s; the previous content is saved at "
        f"{result.pre_restore_backup_path}"
    )
    return 0


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.server_info()
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    print(f"engine:        {info.engine} {info.engine_version}")
    print(f"database:      {info.database_name} ({info.database_size_bytes} bytes)")
    for tool, tool_version in sorted(info.tool_versions.items()):
        print(f"{tool + ':':<14} {tool_version}")
    print(f"schema:        {info.schema_version or 'unknown'}")
    print(f"safehold:      {info.safehold_version}")
    limit = str(info.max_upload_bytes) + " bytes" if info.max_upload_bytes else "none"
    print(f"upload limit:  {limit}")
    for warning in info.warnings:
        print(f"warning:       {warning}")
    print(f"pre-restore:   {info.pre_restore_directory}")
    print(f"newest:        {info.newest_pre_restore_backup or 'none yet'}")
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING; needs no password (for HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or os.environ.get("SAFEHOLD_TARGET") or DEFAULT_TARGET
    with open_channel(target, _tls(args)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.connect_timeout
            )
        except grpc.RpcError as err:
            print(f"safehold: {target} is not healthy: {err.code().name}", file=sys.stderr)
            return EXIT_FAILED
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else EXIT_FAILED


def _confirm(client: Client, file: Path) -> bool:
    if not sys.stdin.isatty():
        raise ValueError(
            "restore replaces the whole database: pass --yes to confirm "
            "when not on a terminal; the database is unchanged"
        )
    info = client.server_info()
    answer = input(
        f"Replace the whole {info.engine} database {info.database_name!r} on "
        f"{client.target} with {file}? [y/N] "
    )
    return answer.strip().lower() in ("y", "yes")


def _explain(err: SafeholdError) -> str:
    state = {
        DatabaseState.UNCHANGED: "the database is unchanged",
        DatabaseState.RESTORED_FROM_PRE_RESTORE_BACKUP: "the database was put back as it was",
        DatabaseState.UNKNOWN: "the database state is UNKNOWN",
        None: "",
    }[err.database_state]
    text = err.message
    if state and state not in text:
        text += f" ({state})"
    request = f" (request {err.request_id} in the server log)" if err.request_id else ""
    return f"{text} [{err.reason}]{request}"


def _password() -> str:
    password = os.environ.get("SAFEHOLD_PASSWORD")
    if password:
        return password
    if sys.stdin.isatty():
        return getpass.getpass("database password: ")
    raise ValueError("no password: set SAFEHOLD_PASSWORD (it is never taken as a flag)")


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return TlsOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _progress_display() -> TerminalProgress | None:
    return TerminalProgress(sys.stderr) if sys.stderr.isatty() else None


def _parser() -> argparse.ArgumentParser:
    from safehold.server import app

    # No abbreviations: `--password x` must never be read as `--password-file x`.
    parser = argparse.ArgumentParser(
        prog="safehold",
        allow_abbrev=False,
        description="Back up and restore a PostgreSQL or SQLite database over gRPC.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    app.add_arguments(verbs.add_parser("serve", help="run the server", allow_abbrev=False))

    client_options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    client_options.add_argument(
        "--target",
        default=None,
        help=f"server address, default $SAFEHOLD_TARGET or {DEFAULT_TARGET}",
    )
    client_options.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the server, default 10",
    )
    client_options.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CAs"
    )
    client_options.add_argument("--tls-ca", type=Path, help="CA that signed the server's cert")
    client_options.add_argument("--tls-cert", type=Path, help="client certificate")
    client_options.add_argument("--tls-key", type=Path, help="client certificate's key")

    backup = verbs.add_parser(
        "backup", parents=[client_options], allow_abbrev=False, help="save a backup"
    )
    backup.add_argument(
        "-o",
        "--output",
        default=".",
        help="a directory (ends in / or exists; created when missing) to save the server's "
        "suggested name in, never replacing a file; a file name; or - for stdout. "
        "Default: the current directory",
    )
    backup.add_argument(
        "--force", action="store_true", help="replace the file -o names if it exists"
    )
    backup.add_argument(
        "--compression-level",
        type=int,
        choices=range(10),
        metavar="0-9",
        help="pg_dump compression level (PostgreSQL only)",
    )
    backup.set_defaults(run=_backup)

    restore = verbs.add_parser(
        "restore",
        parents=[client_options],
        allow_abbrev=False,
        help="replace the database with a backup",
    )
    restore.add_argument("file", type=Path)
    restore.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    restore.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="restore a backup from another engine major version",
    )
    restore.add_argument(
        "--terminate-blocking-sessions",
        action="store_true",
        help="PostgreSQL: end sessions that hold locks instead of failing",
    )
    restore.add_argument(
        "--allow-schema-downgrade",
        action="store_true",
        help="restore a backup whose application schema version is newer than the database's",
    )
    restore.set_defaults(run=_restore)

    info = verbs.add_parser(
        "info", parents=[client_options], allow_abbrev=False, help="describe the server"
    )
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    verbs.add_parser(
        "health",
        parents=[client_options],
        allow_abbrev=False,
        help="check that the server is serving (needs no password)",
    )
    return parser
