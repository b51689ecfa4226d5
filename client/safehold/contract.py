"""What the contract says beyond protos/: metadata keys and error reasons.

Errors travel as google.rpc.Status with an ErrorInfo; clients branch on its
reason and on `database_state`, never on message text. Server and client both
import these names so the two sides cannot drift apart.
"""

from __future__ import annotations

import enum

PASSWORD_METADATA_KEY = "x-database-password"  # noqa: S105 - a key name, not a secret
"""gRPC metadata key that carries the database password on every call."""

REQUEST_ID_KEY = "x-request-id"
"""Metadata key of a call's id: sent by the client if it likes, always sent back by
the server in the initial metadata, and on every server log line of that call."""

ERROR_DOMAIN = "safehold.v1"
"""ErrorInfo.domain of every error safehold raises."""

DATABASE_STATE_KEY = "database_state"
"""ErrorInfo.metadata key: a DatabaseState value."""

PRE_RESTORE_PATH_KEY = "pre_restore_backup_path"
"""ErrorInfo.metadata key: where the pre-restore backup is, when one was taken."""

SERVICE_NAME = "safehold.v1.BackupService"


class DatabaseState(enum.StrEnum):
    """What a failed call did to the database."""

    UNCHANGED = "UNCHANGED"
    """Nothing was written, or everything written was rolled back."""
    RESTORED_FROM_PRE_RESTORE_BACKUP = "RESTORED_FROM_PRE_RESTORE_BACKUP"
    """The restore failed half-way and the pre-restore backup was put back."""
    UNKNOWN = "UNKNOWN"
    """Rollback failed too: inspect the database; the pre-restore backup is named."""


class Reason(enum.StrEnum):
    """ErrorInfo.reason values."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    ENGINE_MISMATCH = "ENGINE_MISMATCH"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    INSUFFICIENT_PRIVILEGE = "INSUFFICIENT_PRIVILEGE"
    NOT_A_BACKUP = "NOT_A_BACKUP"
    TRUNCATED_UPLOAD = "TRUNCATED_UPLOAD"
    BAD_FRAME = "BAD_FRAME"
    INVALID_REQUEST = "INVALID_REQUEST"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    RESTORE_IN_PROGRESS = "RESTORE_IN_PROGRESS"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    TOO_MANY_BACKUPS = "TOO_MANY_BACKUPS"
    TOO_MANY_ATTEMPTS = "TOO_MANY_ATTEMPTS"
    SERVER_BUSY = "SERVER_BUSY"
    SPOOL_FAILED = "SPOOL_FAILED"
    DATABASE_BUSY = "DATABASE_BUSY"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    RESTORE_FAILED = "RESTORE_FAILED"
    ROLLBACK_FAILED = "ROLLBACK_FAILED"
    BACKUP_FAILED = "BACKUP_FAILED"
    CANCELLED = "CANCELLED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    SCHEMA_NEWER = "SCHEMA_NEWER"
    """The backup's application schema is newer than the database's; the header's
    allow_schema_downgrade restores it anyway."""
    SETTINGS_MISMATCH = "SETTINGS_MISMATCH"
    """The backup was made with a setting the live database cannot take in place
    (e.g. another SQLite text encoding); the message says which and what to do."""
    NO_REPOSITORY = "NO_REPOSITORY"
    REPOSITORY_FAILED = "REPOSITORY_FAILED"
    INTERNAL = "INTERNAL"
    # Raised by the client itself, before anything is sent:
    FILE_NOT_READABLE = "FILE_NOT_READABLE"
    TLS_MISCONFIGURED = "TLS_MISCONFIGURED"
    NO_PASSWORD = "NO_PASSWORD"  # noqa: S105 - a reason, not a secret
