"""TLS and mutual TLS, with certificates the test makes."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PASSWORD
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import run_cli, start_server
from pg import free_port

from safehold.client import AuthenticationFailed, Client, ConnectionFailed, TlsOptions


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    def write(
        name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)  # safehold refuses a key that others can read
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "safehold test CA")])
    ca_path, _ = write("ca", _issue("safehold test CA", ca_key, ca_name, ca_key, ca=True), ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, server_key_path = write(
        "server", _issue("localhost", server_key, ca_name, ca_key, server=True), server_key
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert, client_key_path = write(
        "client", _issue("operator", client_key, ca_name, ca_key), client_key
    )
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path)


def test_tls_server(pki: Pki, tmp_path: Path, sqlite_db: Path) -> None:
    server = start_server(
        tmp_path,
        f"sqlite:///{sqlite_db}",
        PASSWORD,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
    )
    try:
        with Client(server.target, PASSWORD, tls=TlsOptions(ca=pki.ca)) as client:
            assert client.server_info().engine == "SQLite"
        with (
            Client(server.target, PASSWORD, connect_timeout=2, attempts=1) as plaintext,
            pytest.raises(ConnectionFailed),
        ):
            plaintext.server_info()
        env = server.client_env()
        result = run_cli(
            "backup", "--tls-ca", str(pki.ca), "-o", str(tmp_path / "tls.sqlite"), env=env
        )
        assert result.returncode == 0, result.stderr
        assert run_cli("health", "--tls-ca", str(pki.ca), env=env).returncode == 0
    finally:
        server.stop()


def test_mutual_tls_requires_a_client_certificate(
    pki: Pki, tmp_path: Path, sqlite_db: Path
) -> None:
    """And the plaintext loopback health port (what the Dockerfile's HEALTHCHECK
    calls) answers health checks, but no BackupService call."""
    health_port = free_port()
    server = start_server(
        tmp_path,
        f"sqlite:///{sqlite_db}",
        PASSWORD,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        "--health-listen",
        f"127.0.0.1:{health_port}",
    )
    try:
        health = run_cli("health", "--target", f"127.0.0.1:{health_port}", env=os.environ)
        assert (health.returncode, health.stdout) == (0, f"127.0.0.1:{health_port}: SERVING\n")
        with (
            Client(f"127.0.0.1:{health_port}", PASSWORD, attempts=1) as plaintext,
            pytest.raises(AuthenticationFailed),
        ):
            plaintext.server_info()
        with (
            Client(
                server.target, PASSWORD, tls=TlsOptions(ca=pki.ca), connect_timeout=2, attempts=1
            ) as anonymous,
            pytest.raises(ConnectionFailed),
        ):
            anonymous.server_info()
        trusted = TlsOptions(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        with Client(server.target, PASSWORD, tls=trusted) as client:
            client.backup(tmp_path / "mtls.sqlite")
    finally:
        server.stop()
