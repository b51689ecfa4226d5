"""The server's repository as the contract shows it: ListRepositoryBackups' pages and
the RepositoryBackup entry of a manifest (CreateRepositoryBackup returns one too).

A page token is the (created_at, name) of the previous page's last entry, so that
backups added or pruned between two pages shift nothing; a token is decoded, never
trusted: a forged one is INVALID_ARGUMENT or selects older backups, nothing else.
"""

from __future__ import annotations

import base64

from google.protobuf import timestamp_pb2

from safehold.client.errors import SafeholdError as ClientError
from safehold.repository import Manifest, Repository
from safehold.server.errors import InvalidRequest
from safehold.server.keeper import RepositoryFailed, iso
from safehold.v1 import backup_service_pb2 as pb

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_ENGINES = {"postgresql": pb.ENGINE_POSTGRESQL, "sqlite": pb.ENGINE_SQLITE}
_DUMP_FORMATS = dict(pb.DumpFormat.items())


def page(
    repository: Repository, request: pb.ListRepositoryBackupsRequest
) -> pb.ListRepositoryBackupsResponse:
    """One page of the repository's complete backups, newest first."""
    size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    try:
        backups = repository.backups(request.database_name or None)
    except (ClientError, OSError) as err:
        raise RepositoryFailed(f"{repository.location}: {err}") from None
    if request.page_token:
        after = _decode_token(request.page_token)
        backups = [m for m in backups if (iso(m.created_at), m.name) < after]
    shown = backups[:size]
    return pb.ListRepositoryBackupsResponse(
        backups=[entry(m) for m in shown],
        next_page_token=_encode_token(shown[-1]) if len(backups) > size else "",
        repository=repository.location,
    )


def entry(m: Manifest) -> pb.RepositoryBackup:
    """A manifest as the contract's RepositoryBackup."""
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(m.created_at)
    return pb.RepositoryBackup(
        name=m.name,
        engine=_ENGINES.get(m.engine.lower(), pb.ENGINE_UNSPECIFIED),
        engine_version=m.engine_version,
        dump_format=_DUMP_FORMATS.get(m.dump_format, pb.DUMP_FORMAT_UNSPECIFIED),
        database_name=m.database_name,
        created_at=created,
        safehold_version=m.safehold_version,
        artefact=pb.Digest(size_bytes=m.size_bytes, sha256=bytes.fromhex(m.sha256)),
        stored=pb.Digest(size_bytes=m.stored_size_bytes, sha256=bytes.fromhex(m.stored_sha256)),
        encryption=m.encryption,
        schema_version=m.schema_version or "",
    )


def _encode_token(m: Manifest) -> str:
    return base64.urlsafe_b64encode(f"{iso(m.created_at)}\n{m.name}".encode()).decode()


def _decode_token(token: str) -> tuple[str, str]:
    try:
        created, name = base64.urlsafe_b64decode(token.encode()).decode().split("\n", 1)
    except ValueError:
        raise InvalidRequest("page_token is not one this server gave") from None
    return created, name
