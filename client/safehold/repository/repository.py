"""A repository of backups, written once above the Store interface.

    repo = open_repository("s3://bucket/prefix")   # or a directory
    for manifest in repo.backups(): ...
    repo.verify(repo.latest("app"))

Each backup is two objects: NAME (the engine's artefact, age-encrypted when
recipients are given) and NAME.manifest.json, written last. An object without its
manifest is an incomplete backup: never listed, removed by prune.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from safehold.client.errors import (
    BackupNotFound,
    EncryptionKeyError,
    RepositoryError,
    VerificationFailed,
)
from safehold.repository import crypto
from safehold.repository.manifest import (
    AGE_SUFFIX,
    ENCRYPTION_AGE,
    ENCRYPTION_NONE,
    MANIFEST_SUFFIX,
    Manifest,
    manifest_name,
)
from safehold.repository.policy import Decision, Policy, plan
from safehold.repository.store import Store
from safehold.streams import (
    COPY_CHUNK,
    HashingReader,
    HashingWriter,
    as_binary,
    expecting,
)

INCOMPLETE_GRACE = timedelta(hours=1)
"""How old an object without a manifest must be before prune takes it for an
interrupted backup rather than one being written."""


@dataclass(frozen=True)
class Artefact:
    """What the server said of a backup before its first byte (its BackupManifest)."""

    engine: str
    engine_version: str
    dump_format: str
    database_name: str
    created_at: datetime
    safehold_version: str
    suggested_name: str
    schema_version: str | None = None
    """The application's schema version the server read; None when unknown."""


@dataclass(frozen=True)
class PrunePlan:
    """What prune would keep and remove, and why."""

    decisions: list[Decision]
    incomplete: list[str] = field(default_factory=list)
    """Objects without a manifest, older than INCOMPLETE_GRACE: interrupted backups."""
    in_progress: list[str] = field(default_factory=list)
    """Objects without a manifest yet, younger than that: left alone."""

    @property
    def remove(self) -> list[Manifest]:
        return [d.manifest for d in self.decisions if not d.keep]


class Repository:
    """Many backups of one or more databases in one Store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.location = store.location.rstrip("/")
        """Where the repository is, for messages: NAME is at f"{location}/{NAME}"."""

    def backups(self, database: str | None = None) -> list[Manifest]:
        """Complete backups, newest first."""
        names = set(self.store.objects())
        found = []
        for name in names:
            base = name.removesuffix(MANIFEST_SUFFIX)
            if name.endswith(MANIFEST_SUFFIX) and base in names:
                manifest = self._read_manifest(base)
                if database is None or manifest.database_name == database:
                    found.append(manifest)
        return sorted(found, key=lambda m: (m.created_at, m.name), reverse=True)

    def incomplete(self) -> dict[str, datetime]:
        """Backup objects whose manifest was never written, and when they were written."""
        objects = self.store.objects()
        return {
            name: written
            for name, written in sorted(objects.items())
            if not name.endswith(MANIFEST_SUFFIX) and manifest_name(name) not in objects
        }

    def get(self, name: str) -> Manifest:
        if not (self.store.exists(name) and self.store.exists(manifest_name(name))):
            raise BackupNotFound(
                f"no complete backup {name!r} in {self.location} "
                "(`safehold list` shows them; `REPOSITORY --latest` picks the newest)"
            )
        return self._read_manifest(name)

    def latest(self, database: str | None = None) -> Manifest:
        backups = self.backups(database)
        if not backups:
            which = f" of {database!r}" if database else ""
            raise BackupNotFound(f"no complete backup{which} in {self.location}")
        if database is None and len({m.database_name for m in backups}) > 1:
            raise BackupNotFound(
                f"{self.location} holds backups of several databases: say which with --database"
            )
        return backups[0]

    def _read_manifest(self, name: str) -> Manifest:
        with self.store.open(manifest_name(name)) as f:
            data = f.read()
        try:
            return Manifest.from_json(name, data)
        except (KeyError, TypeError, ValueError) as err:
            raise RepositoryError(
                f"{self.location}/{manifest_name(name)} is not a readable manifest: {err!r}",
                reason="BAD_MANIFEST",
            ) from None

    def write(
        self,
        artefact: Artefact,
        source: BinaryIO,
        recipients: Sequence[crypto.Recipient] = (),
    ) -> Manifest:
        """Store source (read to its end) as a new backup, encrypted to recipients if any.

        If source raises (a trailer that does not match, a broken stream), the object
        is abandoned and nothing becomes visible.
        """
        name = self._free_name(artefact.suggested_name + (AGE_SUFFIX if recipients else ""))
        plain = HashingReader(source)
        with self.store.create(name) as raw_out:
            out = HashingWriter(raw_out)
            if recipients:
                crypto.encrypt(plain, out, recipients)  # type: ignore[arg-type]
            else:
                shutil.copyfileobj(plain, out, COPY_CHUNK)
        manifest = Manifest(
            name=name,
            engine=artefact.engine,
            engine_version=artefact.engine_version,
            dump_format=artefact.dump_format,
            database_name=artefact.database_name,
            created_at=artefact.created_at,
            safehold_version=artefact.safehold_version,
            size_bytes=plain.size,
            sha256=plain.sha256,
            stored_size_bytes=out.size,
            stored_sha256=out.sha256,
            encryption=ENCRYPTION_AGE if recipients else ENCRYPTION_NONE,
            schema_version=artefact.schema_version,
        )
        with self.store.create(manifest_name(name)) as f:
            f.write(manifest.to_json())
        return manifest

    def _free_name(self, wanted: str) -> str:
        """wanted, or wanted with -2, -3... before its extension if taken."""
        names = set(self.store.objects())
        stem, dot, ext = wanted.partition(".")
        candidate, n = wanted, 1
        while candidate in names or manifest_name(candidate) in names:
            n += 1
            candidate = f"{stem}-{n}{dot}{ext}"
        return candidate

    @contextlib.contextmanager
    def open_stored(self, manifest: Manifest) -> Iterator[BinaryIO]:
        """The stored object; its end raises VerificationFailed unless it matches."""
        check = expecting(
            manifest.stored_size_bytes,
            manifest.stored_sha256,
            lambda what: VerificationFailed(
                f"{self.location}/{manifest.name} is damaged: {what} (stored object)"
            ),
        )
        with self.store.open(manifest.name) as raw:
            yield as_binary(HashingReader(raw, check))

    @contextlib.contextmanager
    def open_plaintext(
        self, manifest: Manifest, identities: Sequence[crypto.Identity] = ()
    ) -> Iterator[BinaryIO]:
        """The engine artefact, decrypted if need be; its end raises VerificationFailed
        unless size and SHA-256 match the manifest, so a restore never sends the trailer
        of a damaged backup."""
        if manifest.encrypted and not identities:
            raise EncryptionKeyError(
                f"{manifest.name} is encrypted with age: pass -i/--identity FILE",
                reason="IDENTITY_REQUIRED",
            )
        check = expecting(
            manifest.size_bytes,
            manifest.sha256,
            lambda what: VerificationFailed(
                f"{self.location}/{manifest.name} is damaged: {what} (decrypted backup)"
            ),
        )
        with self.open_stored(manifest) as stored:
            if not manifest.encrypted:
                yield as_binary(HashingReader(stored, check))
                return
            decrypted = crypto.DecryptingReader(stored, identities, manifest.name)
            try:
                yield as_binary(HashingReader(as_binary(decrypted), check))
            finally:
                decrypted.close()

    def verify(self, manifest: Manifest) -> None:
        """Re-read the stored object and check its size and SHA-256 against the manifest."""
        with self.open_stored(manifest) as stored:
            while stored.read(COPY_CHUNK):
                pass

    def plan_prune(self, policy: Policy, now: datetime | None = None) -> PrunePlan:
        """What prune would do; touches nothing. An incomplete object younger than
        INCOMPLETE_GRACE may be a backup still being written: it is left alone."""
        cutoff = (now or datetime.now(UTC)) - INCOMPLETE_GRACE
        incomplete = self.incomplete()
        return PrunePlan(
            plan(self.backups(), policy),
            incomplete=[n for n, written in incomplete.items() if written < cutoff],
            in_progress=[n for n, written in incomplete.items() if written >= cutoff],
        )

    def prune(self, prune_plan: PrunePlan) -> None:
        """Delete what the plan removes: each manifest first, so that a prune that stops
        half-way leaves an incomplete object for the next prune, never a listed backup
        without its data."""
        for manifest in prune_plan.remove:
            self.store.delete(manifest_name(manifest.name))
            self.store.delete(manifest.name)
        for name in prune_plan.incomplete:
            self.store.delete(name)
