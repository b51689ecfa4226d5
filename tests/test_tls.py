"""TLS and mutual TLS, with certificates the test makes."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
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


def dockerfile_healthcheck(health_target: str) -> list[str]:
    """The Dockerfile's HEALTHCHECK command, aimed at health_target instead of
    the image's SAFEHOLD_HEALTH_LISTEN (a fixed port could clash in tests)."""
    text = (Path(__file__).parent.parent / "Dockerfile").read_text()
    listen = re.search(r"SAFEHOLD_HEALTH_LISTEN=(\S+)", text)
    command = re.search(r"HEALTHCHECK .*\\\n\s*CMD (\[.*\])", text)
    assert listen and command, "the Dockerfile has no health port or HEALTHCHECK"
    argv: list[str] = json.loads(command.group(1))
    assert argv[0] == "safehold" and listen.group(1) in argv
    return [health_target if arg == listen.group(1) else arg for arg in argv[1:]]


def test_mutual_tls_requires_a_client_certificate(
    pki: Pki, tmp_path: Path, sqlite_db: Path
) -> None:
    """Configured as in the container, the Dockerfile's HEALTHCHECK passes over
    the plaintext loopback health port, which takes no BackupService call."""
    health_target = f"127.0.0.1:{free_port()}"
    container_env = {
        "SAFEHOLD_TLS_CERT": str(pki.server_cert),
        "SAFEHOLD_TLS_KEY": str(pki.server_key),
        "SAFEHOLD_TLS_CLIENT_CA": str(pki.ca),
        "SAFEHOLD_HEALTH_LISTEN": health_target,
    }
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, env=container_env)
    try:
        health = run_cli(
            *dockerfile_healthcheck(health_target), env={**os.environ, **container_env}
        )
        assert (health.returncode, health.stdout) == (0, f"{health_target}: SERVING\n")
        with (
            Client(health_target, PASSWORD, attempts=1) as plaintext,
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
