"""The manifest of one backup in a repository, stored beside it as `<name>.manifest.json`.

It is the same sidecar `safehold backup -o DIR/` writes, with what a repository adds
(the stored object's size and SHA-256, and its encryption). A sidecar written without
them describes an unencrypted file, whose stored bytes are the engine's artefact.
Written last: a backup object without a manifest is incomplete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
ENCRYPTION_NONE = "none"
ENCRYPTION_AGE = "age"
AGE_SUFFIX = ".age"


@dataclass(frozen=True)
class Manifest:
    """What one backup is: the engine artefact, and the object that stores it."""

    name: str
    """The stored object's name inside its repository."""
    engine: str
    engine_version: str
    dump_format: str
    database_name: str
    created_at: datetime
    """When the server took the snapshot, timezone-aware UTC."""
    safehold_version: str
    size_bytes: int
    """Size of the engine artefact (the plaintext)."""
    sha256: str
    """SHA-256 of the engine artefact, hex."""
    stored_size_bytes: int
    stored_sha256: str
    encryption: str = ENCRYPTION_NONE
    schema_version: str | None = None
    """The application's schema version, when the server knows it."""

    @property
    def encrypted(self) -> bool:
        return self.encryption != ENCRYPTION_NONE

    def to_json(self) -> bytes:
        fields = asdict(self)
        del fields["name"]
        fields["created_at"] = self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        fields["manifest_version"] = MANIFEST_VERSION
        return (json.dumps(fields, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> Manifest:
        """Parse a manifest; a plain sidecar without stored_* describes an unencrypted file."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a manifest is a JSON object")
        created = datetime.fromisoformat(str(raw["created_at"]).replace("Z", "+00:00"))
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return cls(
            name=name,
            engine=str(raw["engine"]),
            engine_version=str(raw.get("engine_version", "")),
            dump_format=str(raw.get("dump_format", "")),
            database_name=str(raw["database_name"]),
            created_at=created.astimezone(UTC),
            safehold_version=str(raw.get("safehold_version", "")),
            size_bytes=int(raw["size_bytes"]),
            sha256=str(raw["sha256"]),
            stored_size_bytes=int(raw.get("stored_size_bytes") or raw["size_bytes"]),
            stored_sha256=str(raw.get("stored_sha256") or raw["sha256"]),
            encryption=str(raw.get("encryption", ENCRYPTION_NONE)),
            schema_version=raw.get("schema_version"),
        )


def manifest_name(name: str) -> str:
    return name + MANIFEST_SUFFIX
