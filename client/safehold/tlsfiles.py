"""Checks of TLS files before gRPC sees them, shared by the server and the client.

gRPC's core aborts the whole process (SIGABRT, no exception) on a certificate
without its key, and reports a key that does not match its certificate as a
port it cannot bind. Python's ssl module reads the same PEM files and says
what is wrong in words, so every TLS file is loaded here first.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsFileError(Exception):
    """A TLS file is missing, unreadable, or does not fit its partner; one line says which."""


def check_pair(cert: Path | None, key: Path | None, what: str) -> None:
    """A certificate and its private key: both or neither, readable, and matching."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        given, missing = ("certificate", "key") if key is None else ("key", "certificate")
        raise TlsFileError(
            f"the {what} {given} is given without its {missing}: pass both or neither"
        )
    for path in (cert, key):
        _readable(path, what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsFileError(
                f"the {what} key {key} does not belong to the certificate {cert}"
            ) from None
        raise TlsFileError(
            f"cannot load the {what} certificate {cert} with key {key}: {exc.reason or exc}"
        ) from None


def check_ca(ca: Path | None, what: str) -> None:
    """A CA bundle that holds at least one certificate."""
    if ca is None:
        return
    _readable(ca, what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise TlsFileError(
            f"the {what} {ca} holds no usable certificate: {exc.reason or exc}"
        ) from None


def _readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsFileError(f"cannot read the {what} file {path}: {exc.strerror}") from None
