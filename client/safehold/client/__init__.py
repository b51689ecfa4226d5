"""safehold.client: a small typed client for safehold.v1.BackupService."""

from safehold.client.client import (
    BackupResult,
    Client,
    Progress,
    RestoreResult,
    ServerInfo,
    TlsOptions,
)
from safehold.client.errors import (
    AuthenticationFailed,
    BackupFailed,
    Busy,
    ConnectionFailed,
    EngineMismatch,
    IncompleteBackup,
    IntegrityError,
    InvalidBackup,
    LimitExceeded,
    RestoreFailed,
    SafeholdError,
    SchemaNewer,
    SettingsMismatch,
    VersionMismatch,
)
from safehold.client.output import OutputRefused

__all__ = [
    "AuthenticationFailed",
    "BackupFailed",
    "BackupResult",
    "Busy",
    "Client",
    "ConnectionFailed",
    "EngineMismatch",
    "IncompleteBackup",
    "IntegrityError",
    "InvalidBackup",
    "LimitExceeded",
    "OutputRefused",
    "Progress",
    "RestoreFailed",
    "RestoreResult",
    "SafeholdError",
    "SchemaNewer",
    "ServerInfo",
    "SettingsMismatch",
    "TlsOptions",
    "VersionMismatch",
]
