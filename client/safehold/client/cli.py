"""The `safehold` command: serve, backup, restore, info; list, prune, verify.

Every failure ends with a non-zero exit and one line saying what happened and
whether the database was touched.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from safehold.client import output, repository_cli
from safehold.client.client import DEFAULT_TARGET, Client, TlsOptions, open_channel
from safehold.client.credentials import no_password, password_from
from safehold.client.diagnose import explain
from safehold.client.errors import SafeholdError
from safehold.client.progress import TerminalProgress
from safehold.client.terminal import printable, say
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
        return _run(args)
    except SafeholdError as err:
        say(f"safehold: {args.verb} failed: {_explain(err)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, OSError) as err:
        say(f"safehold: {args.verb} failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"safehold: {args.verb} interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    """Run a verb: the repository verbs (list, prune, verify) need no server."""
    offline: Callable[[argparse.Namespace], int] | None = getattr(args, "offline", None)
    if offline and not (args.verb == "list" and args.repository is None):
        return offline(args)
    with Client(
        args.target,
        _password(args.password_file),
        tls=_tls(args),
        connect_timeout=args.connect_timeout,
    ) as client:
        verb: Callable[[Client, argparse.Namespace], int] = args.run
        return verb(client, args)


def _backup(client: Client, args: argparse.Namespace) -> int:
    if args.now:
        return _backup_now(client)
    progress = _progress_display()
    if repository_cli.wants_repository(args):
        line = repository_cli.backup(client, args, progress)
        if progress:
            progress.finish()
        say(line)
        return 0
    destination = output.plan(args.output, force=args.force)
    result = client.backup(
        destination, compression_level=args.compression_level, on_progress=progress
    )
    if progress:
        progress.finish()
    # A backup streamed to stdout must not get this line mixed into it.
    say(
        f"backup of {result.database_name} ({result.engine} {result.engine_version}) "
        f"saved to {result.path}: {result.size_bytes} bytes, sha256 {result.sha256}",
        file=sys.stderr if destination.kind is output.Kind.STREAM else sys.stdout,
    )
    return 0


def _backup_now(client: Client) -> int:
    """The server takes a backup into its own repository, as a scheduled run does."""
    result = client.backup_now()
    m = result.manifest
    say(
        f"backup of {m.database_name} ({m.engine} {m.engine_version}) saved by the server "
        f"to {result.repository}/{m.name}: {m.size_bytes} bytes, sha256 {m.sha256}"
        f"{', age-encrypted' if m.encrypted else ''}; verified; "
        f"{result.backups_in_repository} backups in the repository, {result.pruned} pruned"
    )
    return 0


def _list_server(client: Client, args: argparse.Namespace) -> int:
    """`list` without a repository: the server's own, over the contract."""
    repository_cli.show_backups(
        client.repository_backups(args.database), as_json=args.json, line=say
    )
    return 0


def _restore(client: Client, args: argparse.Namespace) -> int:
    label, restore = repository_cli.restorer(args, client)
    if not args.yes and not _confirm(client, label):
        print("safehold: restore cancelled; the database is unchanged", file=sys.stderr)
        return EXIT_FAILED
    progress = _progress_display()

    def show_notice(reason: str, message: str) -> None:
        if progress:
            progress.finish()
        say(f"notice [{reason}]: {message}", file=sys.stderr)

    result = restore(
        client,
        allow_version_mismatch=args.allow_version_mismatch,
        terminate_blocking_sessions=args.terminate_blocking_sessions,
        allow_schema_downgrade=args.allow_schema_downgrade,
        on_progress=progress,
        on_notice=show_notice,
    )
    if progress:
        progress.finish()
    say(
        f"restored {result.bytes_restored} bytes into the {result.engine} database in "
        f"{result.duration.total_seconds():.1f}s; the previous content is saved at "
        f"{result.pre_restore_backup_path}"
    )
    return 0


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.server_info()
    if args.json:
        print(json.dumps(asdict(info), indent=2))  # JSON escapes control characters itself
        return 0
    say(f"engine:        {info.engine} {info.engine_version}")
    say(f"database:      {info.database_name} ({info.database_size_bytes} bytes)")
    say(f"location:      {info.database_location}")
    for blocker in info.restore_blockers:
        say(f"restore:       BLOCKED: {blocker}")
    for tool, tool_version in sorted(info.tool_versions.items()):
        say(f"{tool + ':':<14} {tool_version}")
    say(f"schema:        {info.schema_version or 'unknown'}")
    say(f"safehold:      {info.safehold_version}")
    limit = str(info.max_upload_bytes) + " bytes" if info.max_upload_bytes else "none"
    print(f"upload limit:  {limit}")
    for warning in info.warnings:
        say(f"warning:       {warning}")
    say(f"pre-restore:   {info.pre_restore_directory}")
    say(f"newest:        {info.newest_pre_restore_backup or 'none yet'}")
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING; needs no password (for HEALTHCHECK).

    Run inside the server's container it finds TLS where the server does: with
    no client TLS setting, a server configured by SAFEHOLD_TLS_CERT is checked
    over TLS, trusting that certificate file (or SAFEHOLD_TLS_CA), except on the
    server's own health port (SAFEHOLD_HEALTH_LISTEN), which is always plaintext."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or os.environ.get("SAFEHOLD_TARGET") or DEFAULT_TARGET
    health_port = target == os.environ.get("SAFEHOLD_HEALTH_LISTEN")
    tls = _tls(args) or (None if health_port else _server_tls(os.environ))
    try:
        with open_channel(target, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.connect_timeout,
                wait_for_ready=True,
            )
    except grpc.RpcError as err:
        why = explain(target, tls)
        detail = f" within {args.connect_timeout:g}s" + (f": {why}" if why else "")
        print(f"safehold: {target} is not healthy: {err.code().name}{detail}", file=sys.stderr)
        return EXIT_FAILED
    except SafeholdError as err:
        print(f"safehold: health failed: {_explain(err)}", file=sys.stderr)
        return EXIT_FAILED
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}{' ' + args.service if args.service else ''}: {status}")
    return 0 if serving else EXIT_FAILED


def _server_tls(environ: Mapping[str, str]) -> TlsOptions | None:
    """TLS as the server in this environment serves it: trust its own certificate."""
    cert = environ.get("SAFEHOLD_TLS_CERT")
    if not cert:
        return None
    return TlsOptions(
        ca=Path(environ.get("SAFEHOLD_TLS_CA") or cert),
        server_name=environ.get("SAFEHOLD_TLS_SERVER_NAME") or None,
    )


def _confirm(client: Client, file: str) -> bool:
    if not sys.stdin.isatty():
        raise ValueError(
            "restore replaces the whole database: pass --yes to confirm "
            "when not on a terminal; the database is unchanged"
        )
    info = client.server_info()
    try:
        answer = input(
            printable(
                f"Replace the whole {info.engine} database {info.database_name!r} on "
                f"{client.target} with {file}? [y/N] "
            )
        )
    except EOFError:  # Ctrl-D, or the input ended: no is the only safe answer
        print(file=sys.stderr)
        return False
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


def _password(file: Path | None) -> str:
    """From --password-file, the environment, or a prompt, but only on a terminal:
    a cron job must fail at once, the same way every night."""
    password = password_from(file)
    if password:
        return password
    if sys.stdin.isatty():
        try:
            return getpass.getpass("database password: ")
        except EOFError:
            print(file=sys.stderr)
            raise no_password(" (none was typed)") from None
    raise no_password(" (it is never taken as a flag, and there is no terminal to ask on)")


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    """The client's TLS from its flags, each falling back to its environment variable."""
    env = os.environ

    def path(flag: Path | None, name: str) -> Path | None:
        return flag or (Path(env[name]) if env.get(name) else None)

    ca = path(args.tls_ca, "SAFEHOLD_TLS_CA")
    cert = path(args.tls_cert, "SAFEHOLD_TLS_CLIENT_CERT")
    key = path(args.tls_key, "SAFEHOLD_TLS_CLIENT_KEY")
    name = args.tls_server_name or env.get("SAFEHOLD_TLS_SERVER_NAME") or None
    wanted = args.tls or env.get("SAFEHOLD_TLS", "").lower() in ("1", "true", "yes")
    if not (wanted or ca or cert or key):
        return None
    return TlsOptions(ca=ca, cert=cert, key=key, server_name=name)


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
        "--tls",
        action="store_true",
        help="use TLS, trusting the system's CAs (env SAFEHOLD_TLS=1)",
    )
    client_options.add_argument(
        "--tls-ca", type=Path, help="CA that signed the server's cert (env SAFEHOLD_TLS_CA)"
    )
    client_options.add_argument(
        "--tls-cert", type=Path, help="client certificate (env SAFEHOLD_TLS_CLIENT_CERT)"
    )
    client_options.add_argument(
        "--tls-key", type=Path, help="client certificate's key (env SAFEHOLD_TLS_CLIENT_KEY)"
    )
    client_options.add_argument(
        "--tls-server-name",
        help="the name the server's certificate carries, when --target is another "
        "(env SAFEHOLD_TLS_SERVER_NAME)",
    )
    client_options.add_argument(
        "--password-file",
        type=Path,
        help="file holding the database password (else $SAFEHOLD_PASSWORD, "
        "$SAFEHOLD_PASSWORD_FILE, or a prompt on a terminal)",
    )

    backup = verbs.add_parser(
        "backup", parents=[client_options], allow_abbrev=False, help="save a backup"
    )
    backup.add_argument(
        "-o",
        "--output",
        default=".",
        help="a directory (ends in / or exists; created when missing) to save the server's "
        "suggested name in, never replacing a file; s3://bucket/prefix/ (a repository); "
        "a file name; or - for stdout. Default: the current directory",
    )
    backup.add_argument(
        "--force", action="store_true", help="replace the file -o names if it exists"
    )
    repository_cli.add_backup_options(backup)
    backup.add_argument(
        "--now",
        action="store_true",
        help="have the server take a backup into its own repository (serve --repository) "
        "now, encrypted, verified and pruned as its scheduled runs are; -o does not apply",
    )
    backup.add_argument(
        "--compression-level",
        type=int,
        choices=range(10),
        metavar="0-9",
        help="pg_dump gzip level (PostgreSQL only; default: zstd 1 with pg_dump 16+, else gzip 1)",
    )
    backup.set_defaults(run=_backup)

    restore = verbs.add_parser(
        "restore",
        parents=[client_options],
        allow_abbrev=False,
        help="replace the database with a backup",
    )
    restore.add_argument("file", help="a backup FILE, REPOSITORY/NAME, or REPOSITORY --latest")
    repository_cli.add_restore_options(restore)
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

    repository_cli.add_verbs(verbs, [client_options])
    verbs.choices["list"].set_defaults(run=_list_server)

    info = verbs.add_parser(
        "info", parents=[client_options], allow_abbrev=False, help="describe the server"
    )
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    health = verbs.add_parser(
        "health",
        parents=[client_options],
        allow_abbrev=False,
        help="check that the server is serving (needs no password)",
    )
    health.add_argument(
        "--service",
        default="",
        help="ask about one service, e.g. safehold.v1.BackupService (NOT_SERVING while "
        "its database cannot be reached); default: the whole server",
    )
    return parser
