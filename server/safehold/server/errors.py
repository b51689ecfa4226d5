"""The errors the service reports, each with its gRPC code and ErrorInfo reason.

Raise a SafeholdError anywhere below the servicer; the servicer turns it into a
google.rpc.Status whose ErrorInfo says the reason and what happened to the
database, so every failure a caller sees is one of these, never a traceback.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from safehold.contract import (
    DATABASE_STATE_KEY,
    ERROR_DOMAIN,
    PRE_RESTORE_PATH_KEY,
    DatabaseState,
    Reason,
)


class SafeholdError(Exception):
    """A failure with a defined status code, reason and database state."""

    code = grpc.StatusCode.INTERNAL
    reason = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        database: DatabaseState = DatabaseState.UNCHANGED,
        pre_restore_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.database = database
        self.pre_restore_path = pre_restore_path

    def to_status(self) -> grpc.Status:
        """The rich status to end the call with."""
        metadata = {DATABASE_STATE_KEY: self.database.value}
        if self.pre_restore_path:
            metadata[PRE_RESTORE_PATH_KEY] = self.pre_restore_path
        info = error_details_pb2.ErrorInfo(
            reason=self.reason.value, domain=ERROR_DOMAIN, metadata=metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        code: int = self.code.value[0]
        return rpc_status.to_status(
            status_pb2.Status(code=code, message=self.describe(), details=[detail])
        )

    def describe(self) -> str:
        """The message with what happened to the database, for humans."""
        state = {
            DatabaseState.UNCHANGED: "the database is unchanged",
            DatabaseState.RESTORED_FROM_PRE_RESTORE_BACKUP: (
                f"the database was put back from the pre-restore backup {self.pre_restore_path}"
            ),
            DatabaseState.UNKNOWN: (
                f"the database state is UNKNOWN; the pre-restore backup is {self.pre_restore_path}"
            ),
        }[self.database]
        if self.database == DatabaseState.UNCHANGED and self.pre_restore_path:
            state += f"; its pre-restore backup is {self.pre_restore_path}"
        return f"{self.message} ({state})"


class Unauthenticated(SafeholdError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


class EngineMismatch(SafeholdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.ENGINE_MISMATCH


class VersionMismatch(SafeholdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.VERSION_MISMATCH


class SchemaNewer(SafeholdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.SCHEMA_NEWER


class SettingsMismatch(SafeholdError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.SETTINGS_MISMATCH


class InsufficientPrivilege(SafeholdError):
    """The database role lacks a right the restore needs; the message names it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.INSUFFICIENT_PRIVILEGE


class NotABackup(SafeholdError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.NOT_A_BACKUP


class TruncatedUpload(SafeholdError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.TRUNCATED_UPLOAD


class BadFrame(SafeholdError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.BAD_FRAME


class InvalidRequest(SafeholdError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_REQUEST


class SizeMismatch(SafeholdError):
    code = grpc.StatusCode.DATA_LOSS
    reason = Reason.SIZE_MISMATCH


class ChecksumMismatch(SafeholdError):
    code = grpc.StatusCode.DATA_LOSS
    reason = Reason.CHECKSUM_MISMATCH


class RestoreInProgress(SafeholdError):
    code = grpc.StatusCode.ABORTED
    reason = Reason.RESTORE_IN_PROGRESS


class UploadTooLarge(SafeholdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.UPLOAD_TOO_LARGE


class TooManyBackups(SafeholdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.TOO_MANY_BACKUPS


class TooManyAttempts(SafeholdError):
    """An address over its budget of password checks; its password was not compared."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.TOO_MANY_ATTEMPTS


class ResourceBusy(SafeholdError):
    """Every place of a kind of call is taken (see capacity.py)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.SERVER_BUSY


class SpoolFailed(SafeholdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.SPOOL_FAILED


class DatabaseBusy(SafeholdError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.DATABASE_BUSY


class DatabaseUnavailable(SafeholdError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.DATABASE_UNAVAILABLE


class RestoreFailed(SafeholdError):
    """The engine could not apply the backup; see `database` for the outcome."""

    code = grpc.StatusCode.ABORTED
    reason = Reason.RESTORE_FAILED


class RollbackFailed(SafeholdError):
    code = grpc.StatusCode.INTERNAL
    reason = Reason.ROLLBACK_FAILED


class BackupFailed(SafeholdError):
    code = grpc.StatusCode.INTERNAL
    reason = Reason.BACKUP_FAILED


class Cancelled(SafeholdError):
    code = grpc.StatusCode.CANCELLED
    reason = Reason.CANCELLED


class ShuttingDown(SafeholdError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.SHUTTING_DOWN
