"""Where the client finds the database password, and a check of its TLS files.

A cron job has no terminal: the password comes from SAFEHOLD_PASSWORD or from
the file SAFEHOLD_PASSWORD_FILE (or --password-file) names, and an error says
which of them were looked at, so a scheduled run fails the way a manual try does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safehold import tlsfiles
from safehold.client.errors import NoPassword, TlsConfigError

PASSWORD_VARIABLE = "SAFEHOLD_PASSWORD"  # noqa: S105 - a variable's name, not a secret
PASSWORD_FILE_VARIABLE = "SAFEHOLD_PASSWORD_FILE"  # noqa: S105 - a variable's name


def password_from(file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The password from file, else SAFEHOLD_PASSWORD, else SAFEHOLD_PASSWORD_FILE's file.

    A named file that cannot be read, or is empty, is an error rather than a
    fall-through: the operator meant that file.
    """
    if file is None and environ.get(PASSWORD_VARIABLE):
        return environ[PASSWORD_VARIABLE]
    named = file or (
        Path(environ[PASSWORD_FILE_VARIABLE]) if environ.get(PASSWORD_FILE_VARIABLE) else None
    )
    if named is None:
        return None
    try:
        password = named.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise NoPassword(f"cannot read the password file {named}: {reason}") from None
    if not password:
        raise NoPassword(f"the password file {named} is empty")
    return password


def no_password(hint: str = "") -> NoPassword:
    """The error for a password found nowhere, naming every place looked at."""
    return NoPassword(
        f"no password: set {PASSWORD_VARIABLE}, or {PASSWORD_FILE_VARIABLE} to a file "
        f"holding it{hint}"
    )


def check_tls(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Refuse TLS files gRPC would crash on or misreport, before it sees them."""
    try:
        tlsfiles.check_pair(cert, key, "client")
        tlsfiles.check_ca(ca, "--tls-ca")
    except tlsfiles.TlsFileError as exc:
        raise TlsConfigError(str(exc)) from None
