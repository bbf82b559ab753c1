"""Certificates and keys for a deployed federation, made with ``cryptography``.

``make_certificates(folder, server_names=["server.example.org"], devices=3)`` writes:

- ``ca.pem`` / ``ca.key``: a private certificate authority; devices trust ``ca.pem``
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA,
  valid for every name and IP address the devices will dial (subject alternative names)
- ``devices/device-N.key`` / ``devices/device-N.pub``: one EC key pair per device; the
  SuperLink admits only nodes whose public key was registered (SuperNode authentication)

Private keys are written owner-read-only (0600), the folder 0700; nothing is overwritten
unless asked, because replacing a CA silently locks every device out.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEVICES = "devices"
VALID_DAYS = 825  # the longest server-certificate lifetime common TLS clients accept


class CertificateError(ValueError):
    """Bad input for certificate generation; the message names the problem."""


@dataclass(frozen=True)
class CertificateSet:
    """Paths of everything ``make_certificates`` wrote."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    device_keys: tuple[Path, ...]  # private keys, one per device
    device_public_keys: tuple[Path, ...]  # what the server registers


def certificate_set(folder: str | Path, devices: int) -> CertificateSet:
    folder = Path(folder)
    names = [f"device-{i}" for i in range(devices)]
    return CertificateSet(
        folder=folder,
        ca_cert=folder / CA_CERT, ca_key=folder / CA_KEY,
        server_cert=folder / SERVER_CERT, server_key=folder / SERVER_KEY,
        device_keys=tuple(folder / DEVICES / f"{name}.key" for name in names),
        device_public_keys=tuple(folder / DEVICES / f"{name}.pub" for name in names),
    )


def make_certificates(folder: str | Path, server_names: list[str], devices: int = 3,
                      force: bool = False) -> CertificateSet:
    """Write a CA, a server certificate for ``server_names`` and ``devices`` EC key pairs."""
    if not server_names:
        raise CertificateError("--server-name: give at least one host name or IP address the devices dial")
    if devices < 1:
        raise CertificateError(f"--devices: must be at least 1, got {devices}")
    paths = certificate_set(folder, devices)
    written = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key,
               *paths.device_keys, *paths.device_public_keys]
    existing = [p for p in written if p.exists()]
    if existing and not force:
        raise CertificateError(f"{existing[0]} already exists; pass --force to replace "
                               "(devices holding the old CA or keys will be refused)")
    alt_names = [_alt_name(name) for name in server_names]

    paths.folder.mkdir(parents=True, exist_ok=True)
    (paths.folder / DEVICES).mkdir(exist_ok=True)
    os.chmod(paths.folder, 0o700)
    os.chmod(paths.folder / DEVICES, 0o700)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pollen federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days=3650)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]), ca_name,
                 server_key.public_key(), now, days=VALID_DAYS)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_key, _private_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _private_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for private_path, public_path in zip(paths.device_keys, paths.device_public_keys):
        key = ec.generate_private_key(ec.SECP384R1())
        # OpenSSH format: what Flower's SuperNode and `flwr supernode register` read
        _write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), private=True)
        _write(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n",
               private=False)
    return paths


def server_names_of(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def _alt_name(name: str) -> x509.GeneralName:
    name = name.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or any(not label or len(label) > 63 or not label.replace("-", "").isalnum()
                       or label.startswith("-") or label.endswith("-") for label in labels):
        raise CertificateError(f"--server-name {name!r}: not a host name or IP address")
    return x509.DNSName(name)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + datetime.timedelta(days=days)))


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create with the final mode, so a private key is never readable by others, even briefly."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is ignored when replacing an existing file
