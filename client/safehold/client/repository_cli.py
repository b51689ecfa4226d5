"""The repository side of the `safehold` command: list, prune, verify, and the hooks
that let backup and restore take `s3://bucket/prefix`, a repository directory,
--latest and age keys. list, prune and verify need no server and no password.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safehold.client.client import Client, ProgressCallback, RestoreResult
from safehold.client.errors import EngineMismatch, VerificationFailed
from safehold.contract import DatabaseState, Reason
from safehold.repository import (
    Manifest,
    Policy,
    Repository,
    crypto,
    deep,
    open_repository,
    split_backup,
)
from safehold.repository.location import is_remote
from safehold.repository.manifest import MANIFEST_SUFFIX

Restorer = Callable[..., RestoreResult]
EXIT_FAILED = 1


def wants_repository(args: argparse.Namespace) -> bool:
    """backup -o goes through a repository when it is s3:// or the backup is encrypted."""
    return is_remote(args.output) or bool(args.recipient or args.recipients_file)


def backup(client: Client, args: argparse.Namespace, progress: ProgressCallback | None) -> str:
    """Back up into the repository args.output names; the line to print."""
    recipients = crypto.load_recipients(args.recipient, args.recipients_file)
    if not is_remote(args.output):
        if Path(args.output).is_file():
            raise ValueError(f"{args.output} is a file: an encrypted backup goes into a directory")
        Path(args.output).mkdir(parents=True, exist_ok=True, mode=0o700)
    repository = open_repository(args.output)
    manifest = client.backup_to(
        repository,
        recipients=recipients,
        compression_level=args.compression_level,
        on_progress=progress,
    )
    encrypted = f", age-encrypted ({manifest.stored_size_bytes} bytes stored)"
    return (
        f"backup of {manifest.database_name} ({manifest.engine} {manifest.engine_version}) "
        f"saved to {repository.location}/{manifest.name}: {manifest.size_bytes} "
        f"bytes, sha256 {manifest.sha256}{encrypted if manifest.encrypted else ''}"
    )


def restorer(args: argparse.Namespace, client: Client) -> tuple[str, Restorer]:
    """What `restore` will send, as (a name for it, a call that restores it),
    checked against the server before anyone is asked to confirm.

    A file without a manifest beside it is restored as a plain file, as before
    repositories; anything else goes through its repository, checked against its
    manifest and decrypted with -i.
    """
    identities = crypto.load_identities(args.identity)
    if args.latest:
        repository = open_repository(args.file)
        manifest = repository.latest(args.database)
    elif is_remote(args.file) or Path(args.file + MANIFEST_SUFFIX).is_file():
        repository, name = split_backup(args.file)
        manifest = repository.get(name)
    else:
        path = Path(args.file)
        client.check_backup_file(path)
        return str(path), lambda client, **options: client.restore(path, **options)
    label = f"{repository.location}/{manifest.name}"
    server = client.server_info().engine
    if manifest.engine != server:
        raise EngineMismatch(
            f"{label} is a {manifest.engine} backup but the server's database is {server}; "
            "nothing was sent",
            reason=Reason.ENGINE_MISMATCH,
            database_state=DatabaseState.UNCHANGED,
        )

    def restore(client: Client, **options: Any) -> RestoreResult:
        return client.restore_backup(repository, manifest, identities=identities, **options)

    return label, restore


def list_backups(args: argparse.Namespace) -> int:
    repository = open_repository(args.repository)
    show_backups(repository.backups(args.database), as_json=args.json)
    return 0


def show_backups(
    backups: Iterable[Manifest], *, as_json: bool, line: Callable[[str], None] = print
) -> None:
    """One line per backup (line() may escape what a server sent), or a JSON list."""
    if as_json:
        print(json.dumps([_as_json(m) for m in backups], indent=2))
        return
    for m in backups:
        line(
            f"{m.created_at:%Y-%m-%d %H:%M:%S}Z  {m.database_name:<16} {m.engine:<10} "
            f"{m.size_bytes:>12}  {'age ' if m.encrypted else '    '} {m.name}"
        )


def _as_json(manifest: Manifest) -> dict[str, object]:
    fields = asdict(manifest)
    fields["created_at"] = manifest.created_at.isoformat().replace("+00:00", "Z")
    return fields


def prune(args: argparse.Namespace) -> int:
    repository = open_repository(args.repository)
    policy = Policy(
        last=args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
    )
    plan = repository.plan_prune(policy)
    for decision in plan.decisions:
        m = decision.manifest
        verdict = "keep  " if decision.keep else "remove"
        why = f"  ({', '.join(decision.reasons)})" if decision.keep else ""
        print(f"{verdict} {m.created_at:%Y-%m-%d %H:%M:%S}Z  {m.name}{why}")
    for name in plan.incomplete:
        print(f"remove {name}  (incomplete: no manifest)")
    for name in plan.in_progress:
        print(f"keep   {name}  (no manifest yet, under an hour old: may be a backup in progress)")
    if args.dry_run:
        print(f"dry run: nothing removed from {repository.location}")
        return 0
    repository.prune(plan)
    print(f"removed {len(plan.remove)} backups and {len(plan.incomplete)} incomplete objects")
    return 0


def verify(args: argparse.Namespace) -> int:
    identities = crypto.load_identities(args.identity)
    if args.all:
        repository = open_repository(args.target)
        targets = [(repository, m) for m in repository.backups()]
    else:
        repository, name = split_backup(args.target)
        targets = [(repository, repository.get(name))]
    failed = 0
    for repo, manifest in targets:
        try:
            how = _verify_one(repo, manifest, args.deep, identities)
        except VerificationFailed as err:
            failed += 1
            print(f"DAMAGED {manifest.name}: {err.message}", file=sys.stderr)
            continue
        print(f"ok {manifest.name}: {manifest.stored_size_bytes} bytes, sha256 matches{how}")
    if failed:
        print(f"safehold: verify failed: {failed} of {len(targets)} damaged", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _verify_one(
    repository: Repository, manifest: Manifest, deep_check: bool, identities: list[Any]
) -> str:
    repository.verify(manifest)
    if not deep_check:
        return ""
    how = deep.check(manifest, lambda: repository.open_plaintext(manifest, identities))
    return f"; {how} passed"


def add_verbs(verbs: Any, client_options: Sequence[argparse.ArgumentParser] = ()) -> None:
    """list, prune and verify, which talk to no server; the repository options of
    backup and restore are in add_backup_options and add_restore_options."""
    listing = verbs.add_parser(
        "list",
        parents=list(client_options),
        allow_abbrev=False,
        help="list a repository's backups, or the server's own repository's",
    )
    listing.add_argument(
        "repository",
        nargs="?",
        help="a directory or s3://bucket/prefix; without it, the server's own repository "
        "(serve --repository), asked over --target",
    )
    listing.add_argument("--database", help="only this database's backups")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(offline=list_backups)

    pruning = verbs.add_parser(
        "prune",
        allow_abbrev=False,
        help="remove backups a retention policy does not keep (restic's forget rules)",
    )
    pruning.add_argument("repository", help="a directory or s3://bucket/prefix")
    periods = {"hourly": "hours", "daily": "days", "weekly": "ISO weeks"}
    periods |= {"monthly": "months", "yearly": "years"}
    pruning.add_argument("--keep-last", type=int, default=0, metavar="N", help="the N newest")
    for rule, period in periods.items():
        pruning.add_argument(
            f"--keep-{rule}",
            type=int,
            default=0,
            metavar="N",
            help=f"the newest backup of each of the last N {period} that have one (UTC)",
        )
    pruning.add_argument("--dry-run", action="store_true", help="print the plan, remove nothing")
    pruning.set_defaults(offline=prune)

    verifying = verbs.add_parser(
        "verify",
        allow_abbrev=False,
        help="re-read backups and check them against their manifests",
    )
    verifying.add_argument("target", help="REPOSITORY/NAME, a backup FILE, or REPOSITORY --all")
    verifying.add_argument("--all", action="store_true", help="every backup in the repository")
    verifying.add_argument(
        "--deep", action="store_true", help="also decrypt and have the engine read it whole"
    )
    add_identity_option(verifying)
    verifying.set_defaults(offline=verify)


def add_identity_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-i",
        "--identity",
        type=Path,
        action="append",
        default=[],
        help="age identity file or SSH private key to decrypt with (repeatable)",
    )


def add_backup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipient",
        "-r",
        action="append",
        default=[],
        help="encrypt to this age (age1...) or SSH public key (repeatable)",
    )
    parser.add_argument(
        "--recipients-file",
        "-R",
        type=Path,
        action="append",
        default=[],
        help="encrypt to every recipient listed in this file (repeatable)",
    )


def add_restore_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--latest", action="store_true", help="FILE is a repository: restore its newest backup"
    )
    parser.add_argument("--database", help="with --latest: the newest backup of this database")
    add_identity_option(parser)
