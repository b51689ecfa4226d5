"""TLS and mutual TLS, with certificates the test makes."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PASSWORD
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import Server, run_cli, start_server
from pg import free_port

from safehold.client import AuthenticationFailed, Client, ConnectionFailed, TlsOptions
from safehold.client.errors import TlsConfigError


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
    return make_pki(tmp_path)


def make_pki(tmp_path: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate:
    ca.crt, server.crt/.key, client.crt/.key in tmp_path."""

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


def _tls_server(tmp_path: Path, sqlite_db: Path, pki: Pki, *extra: str) -> Server:
    return start_server(
        tmp_path,
        f"sqlite:///{sqlite_db}",
        PASSWORD,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        *extra,
    )


def test_tls_server(pki: Pki, tmp_path: Path, sqlite_db: Path) -> None:
    server = _tls_server(tmp_path, sqlite_db, pki)
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


def test_a_certificate_without_its_key_is_one_line_not_a_crash(
    pki: Pki, sqlite_server: Server
) -> None:
    env = sqlite_server.client_env()
    for flags in (["--tls-cert", str(pki.client_cert)], ["--tls-key", str(pki.client_key)]):
        result = run_cli("info", "--tls-ca", str(pki.ca), *flags, env=env, timeout=20)
        assert result.returncode == 1, result
        assert "without its" in result.stderr and "[TLS_MISCONFIGURED]" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    mismatched = run_cli(
        "info",
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.server_key),
        env=env,
    )
    assert mismatched.returncode == 1 and "does not belong to" in mismatched.stderr
    with pytest.raises(TlsConfigError, match="without its key"):
        Client(sqlite_server.target, PASSWORD, tls=TlsOptions(ca=pki.ca, cert=pki.client_cert))


def test_tls_and_plaintext_mismatch_is_named_within_the_stated_time(
    pki: Pki, tmp_path: Path, sqlite_db: Path, sqlite_server: Server
) -> None:
    tls_server = _tls_server(tmp_path, sqlite_db, pki)
    try:
        plain_env = {**sqlite_server.client_env(), "SAFEHOLD_TARGET": tls_server.target}
        started = time.monotonic()
        plain = run_cli("info", "--connect-timeout", "2", env=plain_env)
        elapsed = time.monotonic() - started
        assert plain.returncode == 1
        assert "within 2s" in plain.stderr and "speaks TLS" in plain.stderr, plain.stderr
        assert elapsed < 2 + 3, elapsed  # the stated timeout, a probe, interpreter start
    finally:
        tls_server.stop()
    to_plain = run_cli(
        "info",
        "--tls-ca",
        str(pki.ca),
        "--connect-timeout",
        "2",
        env=sqlite_server.client_env(),
    )
    assert to_plain.returncode == 1 and "does not speak TLS" in to_plain.stderr, to_plain.stderr


def test_mtls_without_a_client_certificate_says_so(
    pki: Pki, tmp_path: Path, sqlite_db: Path
) -> None:
    server = _tls_server(tmp_path, sqlite_db, pki, "--tls-client-ca", str(pki.ca))
    try:
        result = run_cli(
            "info", "--tls-ca", str(pki.ca), "--connect-timeout", "2", env=server.client_env()
        )
        assert result.returncode == 1
        assert "requires a client certificate" in result.stderr, result.stderr
    finally:
        server.stop()


def test_no_server_at_all_fails_in_the_stated_time(sqlite_server: Server) -> None:
    env = {**sqlite_server.client_env(), "SAFEHOLD_TARGET": f"127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = run_cli("info", "--connect-timeout", "2", env=env)
    assert result.returncode == 1 and "within 2s" in result.stderr
    assert "nothing listens" in result.stderr, result.stderr
    assert time.monotonic() - started < 2 + 3


def test_a_server_key_that_does_not_match_its_certificate_is_named_at_start(
    pki: Pki, tmp_path: Path, sqlite_db: Path
) -> None:
    result = run_cli(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.client_key),
        env={
            **os.environ,
            "SAFEHOLD_DATABASE_URL": f"sqlite:///{sqlite_db}",
            "SAFEHOLD_PASSWORD": PASSWORD,
            "SAFEHOLD_DATA_DIR": str(tmp_path / "d"),
        },
    )
    assert result.returncode == 2
    assert "does not belong to the certificate" in result.stderr, result.stderr
    assert "cannot listen" not in result.stderr


def test_health_finds_tls_from_the_servers_environment(
    pki: Pki, tmp_path: Path, sqlite_db: Path
) -> None:
    server = _tls_server(tmp_path, sqlite_db, pki)
    try:
        container_env = {
            **os.environ,
            "SAFEHOLD_TARGET": server.target,
            "SAFEHOLD_TLS_CERT": str(pki.server_cert),
            "SAFEHOLD_TLS_KEY": str(pki.server_key),
            "SAFEHOLD_TLS_CA": str(pki.ca),
        }
        result = run_cli("health", env=container_env)
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout
        named = {**container_env, "SAFEHOLD_TLS_SERVER_NAME": "localhost"}
        assert run_cli("health", env=named).returncode == 0
        misnamed = {**container_env, "SAFEHOLD_TLS_SERVER_NAME": "other.example"}
        assert run_cli("health", "--connect-timeout", "2", env=misnamed).returncode == 1
        without = run_cli(
            "health", "--connect-timeout", "2", env={**os.environ, "SAFEHOLD_TARGET": server.target}
        )
        assert without.returncode == 1 and "speaks TLS" in without.stderr
    finally:
        server.stop()
