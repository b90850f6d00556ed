"""A private root of trust for the local DPS + IoT Hub emulator.

One CA (kept in ``cert_dir`` and reused, so a ``--ca-cert`` path handed to users stays
valid across restarts) signs a short-lived server certificate whose subject alternative
names cover ``localhost``, ``127.0.0.1`` and the address the emulator binds: the SDK
checks the host name it dials against the certificate, for DPS and for the hub alike.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from flasher.errors import FlasherError
from flasher.files import atomic_write

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


@dataclass(frozen=True)
class ServerCredentials:
    ca_cert: Path
    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    atomic_write(path, data, mode=0o600 if private else 0o644)


def _san_entries(hosts: list[str]):
    from cryptography import x509

    names, seen = [], set()
    for h in hosts:
        if not h or h in seen:
            continue
        seen.add(h)
        name: x509.GeneralName
        try:
            name = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            name = x509.DNSName(h)
        names.append(name)
    return names


def _new_ca(cert_dir: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flasher local DPS emulator CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flasher (testing only)")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write(cert_dir / CA_KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), private=True)
    _write(cert_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(cert_dir: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((cert_dir / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((cert_dir / CA_KEY).read_bytes(), password=None)
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
        raise ValueError("expired")
    return cert, key


def make_ca(cert_dir: str | os.PathLike) -> Path:
    """Create a fresh CA in ``cert_dir`` (overwriting any) and return its certificate's path."""
    d = Path(cert_dir)
    d.mkdir(parents=True, exist_ok=True)
    _new_ca(d)
    return d / CA_CERT


def ensure_server_credentials(cert_dir: str | os.PathLike, hosts: list[str]) -> ServerCredentials:
    """Reuse (or create) the CA in ``cert_dir`` and issue a server certificate for ``hosts``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(cert_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        try:
            ca_cert, ca_key = _load_ca(d)
        except (OSError, ValueError):
            ca_cert, ca_key = _new_ca(d)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(d / SERVER_KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), private=True)
        _write(d / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise FlasherError(f"certificate directory {str(d)!r}: cannot write ({exc.strerror or exc})") from None
    return ServerCredentials(d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY)
