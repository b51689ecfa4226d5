"""The errors a safehold call can end with, as a hierarchy to catch by kind.

Each carries the server's ErrorInfo reason and what happened to the database,
so a caller can branch on `reason` and tell an operator whether anything
changed without parsing text.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from safehold.contract import (
    DATABASE_STATE_KEY,
    PRE_RESTORE_PATH_KEY,
    REQUEST_ID_KEY,
    DatabaseState,
    Reason,
)


class SafeholdError(Exception):
    """Base of every error the client raises."""

    def __init__(
        self,
        message: str,
        *,
        reason: str = Reason.INTERNAL,
        code: grpc.StatusCode | None = None,
        database_state: DatabaseState | None = None,
        pre_restore_path: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.code = code
        self.database_state = database_state
        self.pre_restore_path = pre_restore_path
        self.request_id = request_id
        """The server's id for the call: every server log line of it carries this id."""


class ConnectionFailed(SafeholdError):
    """The server could not be reached, or went away; check --target and that it runs.

    `retryable` is False once a restore has sent data: re-sending it silently
    could run a restore twice, so the caller decides.
    """

    retryable = True


class AuthenticationFailed(SafeholdError):
    """The password was missing or wrong."""


class EngineMismatch(SafeholdError):
    """The backup is for another engine than the server's database."""


class VersionMismatch(SafeholdError):
    """The backup's engine version cannot, or should not, be restored here."""


class SchemaNewer(SafeholdError):
    """The backup comes from a newer version of the application than the database:
    the application would not understand it. Upgrade the application first, or
    restore with allow_schema_downgrade."""


class SettingsMismatch(SafeholdError):
    """The backup was made with a database setting the live database cannot take
    in place (e.g. another SQLite text encoding); the message says what to do."""


class InvalidBackup(SafeholdError):
    """The upload is not a backup, or is incomplete, or its frames are out of order."""


class IntegrityError(SafeholdError):
    """Bytes were lost or changed in transit: size or SHA-256 do not match."""


class Busy(SafeholdError):
    """Another restore is running, or the database is locked: retry later."""


class DatabaseUnavailable(SafeholdError):
    """The server cannot connect to its database (down, or wrong password in its
    configuration): retrying does not help until the operator fixes that."""


class InsufficientPrivilege(SafeholdError):
    """The server's database role lacks a right a restore needs; the message names it."""


class BadLocalFile(SafeholdError):
    """A file given to the client is missing or unreadable; nothing was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message, reason=Reason.FILE_NOT_READABLE, database_state=DatabaseState.UNCHANGED
        )


class TlsConfigError(SafeholdError):
    """The client's TLS files are incomplete, unreadable or do not fit together."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=Reason.TLS_MISCONFIGURED)


class NoPassword(SafeholdError):
    """No password was given, and none was found where the client looks for one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=Reason.NO_PASSWORD)


class LimitExceeded(SafeholdError):
    """The upload is over the server's limit, or the server ran out of space."""


class RestoreFailed(SafeholdError):
    """The engine could not apply the backup; database_state says what is left."""


class BackupFailed(SafeholdError):
    """The server could not produce a backup; nothing was written to the destination."""


class IncompleteBackup(SafeholdError):
    """The backup stream ended without a valid trailer; the partial file was deleted."""


_BY_REASON: dict[str, type[SafeholdError]] = {
    Reason.UNAUTHENTICATED: AuthenticationFailed,
    Reason.ENGINE_MISMATCH: EngineMismatch,
    Reason.VERSION_MISMATCH: VersionMismatch,
    Reason.SCHEMA_NEWER: SchemaNewer,
    Reason.SETTINGS_MISMATCH: SettingsMismatch,
    Reason.NOT_A_BACKUP: InvalidBackup,
    Reason.TRUNCATED_UPLOAD: InvalidBackup,
    Reason.BAD_FRAME: InvalidBackup,
    Reason.INVALID_REQUEST: InvalidBackup,
    Reason.SIZE_MISMATCH: IntegrityError,
    Reason.CHECKSUM_MISMATCH: IntegrityError,
    Reason.RESTORE_IN_PROGRESS: Busy,
    Reason.DATABASE_BUSY: Busy,
    Reason.DATABASE_UNAVAILABLE: DatabaseUnavailable,
    Reason.INSUFFICIENT_PRIVILEGE: InsufficientPrivilege,
    Reason.UPLOAD_TOO_LARGE: LimitExceeded,
    Reason.TOO_MANY_BACKUPS: Busy,
    Reason.TOO_MANY_ATTEMPTS: AuthenticationFailed,
    Reason.SERVER_BUSY: Busy,
    Reason.SPOOL_FAILED: LimitExceeded,
    Reason.RESTORE_FAILED: RestoreFailed,
    Reason.ROLLBACK_FAILED: RestoreFailed,
    Reason.BACKUP_FAILED: BackupFailed,
    Reason.SHUTTING_DOWN: ConnectionFailed,
}

_BY_CODE: dict[grpc.StatusCode, type[SafeholdError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
    grpc.StatusCode.DEADLINE_EXCEEDED: ConnectionFailed,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
}


def _state(value: str | None) -> DatabaseState | None:
    return next((state for state in DatabaseState if state.value == value), None)


def from_rpc_error(error: grpc.RpcError) -> SafeholdError:
    """The SafeholdError for a failed call, read from its google.rpc.Status details."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    request_id = _request_id(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            state = info.metadata.get(DATABASE_STATE_KEY)
            return _BY_REASON.get(info.reason, SafeholdError)(
                message,
                reason=info.reason,
                code=code,
                database_state=_state(state),
                pre_restore_path=info.metadata.get(PRE_RESTORE_PATH_KEY),
                request_id=request_id,
            )
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach the safehold server: {message}"
    return _BY_CODE.get(code, SafeholdError)(
        message, reason=code.name, code=code, request_id=request_id
    )


def _request_id(error: grpc.RpcError) -> str | None:
    """The id the server sent back in the call's initial metadata, if it got that far."""
    initial = getattr(error, "initial_metadata", None)
    for key, value in (initial() if initial else None) or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return None


class RepositoryError(SafeholdError):
    """A repository (directory or s3://) could not be read or written as asked."""

    def __init__(self, message: str, *, reason: str = "REPOSITORY_ERROR") -> None:
        super().__init__(message, reason=reason, database_state=DatabaseState.UNCHANGED)


class BackupNotFound(RepositoryError):
    """No complete backup by that name (or none at all for --latest) in the repository."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="BACKUP_NOT_FOUND")


class VerificationFailed(RepositoryError):
    """A stored backup's size or SHA-256 differs from its manifest: it is damaged."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="VERIFICATION_FAILED")


class EncryptionKeyError(RepositoryError):
    """An age recipient or identity could not be read, or does not open this backup."""

    def __init__(self, message: str, *, reason: str = "BAD_KEY") -> None:
        super().__init__(message, reason=reason)
