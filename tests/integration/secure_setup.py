"""Throwaway PKI and token files for the TLS/auth tests, made at test time (never committed).

A CA and a server certificate for 127.0.0.1/localhost signed by it (``cryptography``), and a
tokens file with one read and one write token plus a cluster-internal token file.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    """PEM paths: the CA certificate, the server's certificate and key, a client's (for mTLS)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class Tokens:
    """Token values and the files that hold them."""

    read: str
    write: str
    internal: str
    tokens_file: Path  # server side: "read R" / "write W"
    read_file: Path  # client side: one token each
    write_file: Path
    internal_file: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), client_auth: bool = False) -> Pki:
    """Write a fresh CA and a server certificate valid for ``hosts`` under ``directory``.

    ``client_auth``: the server certificate may also authenticate a client (the cluster-internal
    certificate, presented by both the shards and the broker).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("loupe test CA")).issuer_name(_name("loupe test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(_name("loupe broker")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
                                             + ([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder().subject_name(_name("loupe broker client")).issuer_name(ca.subject)
        .public_key(client_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.crt", directory / "tls.crt", directory / "tls.key", directory / "client.crt", directory / "client.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(_pem_key(key))
    pki.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    pki.client_key.write_bytes(_pem_key(client_key))
    pki.key.chmod(0o600)
    pki.client_key.chmod(0o600)
    return pki


def make_tokens(directory: Path) -> Tokens:
    """Write a tokens file (one read, one write token) and one file per token under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    read, write, internal = (secrets.token_urlsafe(24) for _ in range(3))
    t = Tokens(read, write, internal, directory / "tokens", directory / "read-token", directory / "write-token", directory / "internal-token")
    t.tokens_file.write_text(f"# loupe tokens: ROLE TOKEN\nread {read}\n\nwrite {write}\n")
    t.read_file.write_text(read + "\n")
    t.write_file.write_text(write + "\n")
    t.internal_file.write_text(internal + "\n")
    for p in (t.tokens_file, t.read_file, t.write_file, t.internal_file):
        p.chmod(0o600)
    return t


def make_internal_pki(directory: Path) -> Pki:
    """The cluster-internal CA and certificate: DNS name loupe-internal, server and client auth."""
    from services.common.tls import INTERNAL_SERVER_NAME

    return make_pki(directory, hosts=(INTERNAL_SERVER_NAME,), client_auth=True)
