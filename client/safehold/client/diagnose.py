"""Why a server could not be reached, in words an operator can act on.

gRPC reports a TLS client against a plaintext server, a plaintext client
against a TLS server and a missing client certificate all as one timeout.
After such a timeout the client asks the address itself, once and briefly,
with Python's ssl module: is anything listening, does it speak TLS, does it
trust us, does it want a client certificate.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Protocol

PROBE_SECONDS = 2.0
"""The longest a diagnosis adds to a failed connection."""

_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_WANTS_CLIENT_CERT = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE")
_REJECTS_CLIENT_CERT = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")
"""TLS alerts a server sends about the client's certificate, or its absence."""


class TlsFiles(Protocol):
    """The client's TLS settings (safehold.client.TlsOptions)."""

    @property
    def ca(self) -> Path | None: ...
    @property
    def cert(self) -> Path | None: ...
    @property
    def key(self) -> Path | None: ...


def explain(target: str, tls: TlsFiles | None) -> str | None:
    """What is wrong with reaching target over plaintext (tls None) or TLS, or None
    when the probe finds nothing wrong."""
    address = _host_port(target)
    if address is None:
        return None
    host, port = address
    try:
        sock = socket.create_connection(address, timeout=PROBE_SECONDS)
    except ConnectionRefusedError:
        return f"nothing listens on {host}:{port}: check the address and that the server runs"
    except OSError as exc:
        return f"cannot open a connection to {host}:{port}: {exc.strerror or exc}"
    with sock:
        if tls:
            return _tls_problem(sock, host, tls.ca, tls.cert, tls.key)
        return _speaks_tls(sock, host)


def _speaks_tls(sock: socket.socket, host: str) -> str | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except (ssl.SSLError, OSError):
        return None
    return (
        "the server speaks TLS and this client does not: pass --tls-ca with the CA "
        "that signed its certificate (or --tls for the system's CAs)"
    )


def _tls_problem(
    sock: socket.socket, host: str, ca: Path | None, cert: Path | None, key: Path | None
) -> str | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # gRPC checks the name; the probe asks about trust
    context.set_alpn_protocols(["h2"])
    if ca:
        context.load_verify_locations(cafile=ca)
    else:
        context.load_default_certs()
    if cert and key:
        context.load_cert_chain(cert, key)
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            # TLS 1.3 tells a client without a certificate only after the handshake.
            tls.sendall(_HTTP2_PREFACE)
            answered = bool(tls.recv(1))
    except ssl.SSLCertVerificationError as exc:
        return f"the server's certificate is not trusted: {exc.verify_message} (check --tls-ca)"
    except ssl.SSLError as exc:
        text = str(exc).upper()
        if any(alert in text for alert in (*_WANTS_CLIENT_CERT, *_REJECTS_CLIENT_CERT)):
            return _certificate_refused(cert)
        return (
            "the server does not speak TLS (is it plaintext?): drop --tls and --tls-ca, "
            f"or give the server --tls-cert and --tls-key ({exc.reason or exc})"
        )
    except OSError:
        answered = False
    # A gRPC server that wants a certificate closes the connection without an alert.
    return None if answered else _certificate_refused(cert)


def _certificate_refused(cert: Path | None) -> str:
    if not cert:
        return "the server requires a client certificate: pass --tls-cert and --tls-key"
    return "the server does not accept this client certificate (check its CA)"


def _host_port(target: str) -> tuple[str, int] | None:
    """host and port of a plain host:port or [v6]:port target; None for other forms."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)
