"""Certificates and keys for a deployed federation, made with ``cryptography``.

``make_certificates(folder, server_names=["server.example.org"], devices=3)`` writes:

- ``ca.pem`` / ``ca.key``: a private certificate authority; devices trust ``ca.pem``
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA,
  valid for every name and IP address the devices will dial (subject alternative names)
- ``devices/device-N.key`` / ``devices/device-N.pub``: one EC key pair per device; the
  SuperLink admits only nodes whose public key was registered (SuperNode authentication)

Afterwards, on the same folder: ``add_devices`` writes more key pairs, numbered after the
highest ever issued; ``revoke_devices`` moves a device's pair into ``revoked/``, so no
server registers it again (a running ``pollen server`` unregisters it); and
``renew_server_certificate`` re-issues only ``server.pem``/``server.key`` from the same
CA, so devices keep their ``ca.pem`` and keys.

Lifetimes: the CA ``CA_VALID_DAYS``, the server certificate ``VALID_DAYS``; device keys
are bare keys without expiry (they are trusted for as long as their ``.pub`` is registered).

Private keys are written owner-read-only (0600), the folder 0700; nothing is overwritten
unless asked, because replacing a CA silently locks every device out.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEVICES = "devices"
REVOKED = "revoked"  # device key pairs taken out of the federation, kept so their numbers are never reused
CA_VALID_DAYS = 3650
VALID_DAYS = 825  # the longest server-certificate lifetime common TLS clients accept
EXPIRY_WARNING_DAYS = 30
DEVICE_NAME = re.compile(r"device-(\d+)")


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
        _builder(ca_name, ca_name, ca_key.public_key(), now, now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_key, _private_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write_server_certificate(paths.folder, ca_cert, ca_key, server_names, alt_names, now)
    for private_path, public_path in zip(paths.device_keys, paths.device_public_keys):
        _write_device_pair(private_path, public_path)
    return paths


def renew_server_certificate(folder: str | Path, server_names: list[str]) -> Path:
    """Re-issue ``server.pem``/``server.key`` from the folder's CA; ``ca.pem`` and device keys stay.

    The new certificate is valid ``VALID_DAYS`` from now, but never past the CA.
    """
    folder = Path(folder)
    if not server_names:
        raise CertificateError("--server-name: give at least one host name or IP address the devices dial")
    alt_names = [_alt_name(name) for name in server_names]
    for name in (CA_CERT, CA_KEY):
        if not (folder / name).is_file():
            raise CertificateError(f"{folder / name}: missing; renewing needs the CA that signed the devices' "
                                   f"ca.pem (a new federation: `pollen certs {folder} --force --server-name HOST`)")
    try:
        ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    except ValueError as error:
        raise CertificateError(f"{folder}: unreadable CA certificate or key ({error})") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if ca_cert.not_valid_after_utc <= now:
        raise CertificateError(f"{folder / CA_CERT}: the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                               f"a new CA (`pollen certs {folder} --force --server-name HOST`) means a new "
                               "ca.pem on every device")
    _write_server_certificate(folder, ca_cert, ca_key, server_names, alt_names, now)
    return folder / SERVER_CERT


def add_devices(folder: str | Path, count: int) -> tuple[Path, ...]:
    """Write ``count`` more device key pairs, numbered after the highest ever issued; returns the private keys."""
    folder = Path(folder)
    if count < 1:
        raise CertificateError(f"--add-devices: must be at least 1, got {count}")
    if not (folder / CA_CERT).is_file():
        raise CertificateError(f"{folder}: no {CA_CERT}; create the federation first with "
                               f"`pollen certs {folder} --server-name HOST`")
    (folder / DEVICES).mkdir(mode=0o700, exist_ok=True)
    # Revoked numbers count too: a new device never takes the name of a revoked one.
    issued = [int(match.group(1)) for sub in (DEVICES, REVOKED) for path in (folder / sub).glob("device-*.*")
              if (match := DEVICE_NAME.fullmatch(path.stem))]
    first = max(issued, default=-1) + 1
    written = []
    for number in range(first, first + count):
        private_path = folder / DEVICES / f"device-{number}.key"
        _write_device_pair(private_path, private_path.with_suffix(".pub"))
        written.append(private_path)
    return tuple(written)


def device_names(folder: str | Path) -> list[str]:
    """The devices whose public key is in ``devices/``, in number order."""
    names = [path.stem for path in (Path(folder) / DEVICES).glob("*.pub")]
    return sorted(names, key=lambda name: (int(m.group(1)) if (m := DEVICE_NAME.fullmatch(name)) else -1, name))


def revoke_devices(folder: str | Path, names: list[str]) -> list[Path]:
    """Move each named device's key pair into ``revoked/``; returns where the public keys went.

    Every name is checked before anything moves, so a typo revokes nothing.
    """
    folder = Path(folder)
    known = device_names(folder)
    for name in names:
        if name not in known:
            raise CertificateError(f"--revoke {name}: no {folder / DEVICES / name}.pub; known devices: "
                                   f"{', '.join(known) or 'none'}")
        if (folder / REVOKED / f"{name}.pub").exists():
            raise CertificateError(f"--revoke {name}: {folder / REVOKED / name}.pub already exists; "
                                   "move it away first")
    (folder / REVOKED).mkdir(mode=0o700, exist_ok=True)
    moved = []
    for name in dict.fromkeys(names):
        for suffix in (".pub", ".key"):  # the .pub first: once it is gone, no server registers the device
            source = folder / DEVICES / f"{name}{suffix}"
            if source.exists():
                os.replace(source, folder / REVOKED / source.name)
        moved.append(folder / REVOKED / f"{name}.pub")
    return moved


def server_names_of(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def expires_on(cert_path: str | Path) -> datetime.datetime:
    """When a certificate stops being valid (UTC)."""
    try:
        return x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).not_valid_after_utc
    except ValueError as error:
        raise CertificateError(f"{cert_path}: not a PEM certificate ({error})") from None


def expiry_warning(cert_path: str | Path, remedy: str, now: datetime.datetime | None = None) -> str | None:
    """None while ``cert_path`` has over ``EXPIRY_WARNING_DAYS`` left, a one-line warning within them.

    An expired certificate raises ``CertificateError``; ``remedy`` ends either line (what to run).
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    end = expires_on(cert_path)
    if end <= now:
        raise CertificateError(f"{cert_path}: expired on {end:%Y-%m-%d %H:%M} UTC; {remedy}")
    left = end - now
    if left > datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        return None
    return f"{cert_path} expires in {left.days} days ({end:%Y-%m-%d} UTC); {remedy}"


def _write_server_certificate(folder: Path, ca_cert: x509.Certificate, ca_key, server_names: list[str],
                              alt_names: list[x509.GeneralName], now: datetime.datetime) -> None:
    server_key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + datetime.timedelta(days=VALID_DAYS), ca_cert.not_valid_after_utc)
    server_cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]), ca_cert.subject,
                 server_key.public_key(), now, not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(folder / SERVER_KEY, _private_pem(server_key), private=True)
    _write(folder / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False)


def _write_device_pair(private_path: Path, public_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    # OpenSSH format: what Flower's SuperNode and `flwr supernode register` read. The .pub
    # last: a running server that sees it finds the pair complete.
    _write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), private=True)
    _write(public_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + b"\n",
           private=False)


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
             not_after: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(not_after))


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Create with the final mode, so a private key is never readable by others, even briefly; then
    rename into place, so a reader (a running server polling devices/) never sees half a file."""
    mode = 0o600 if private else 0o644
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(partial, mode)  # O_CREAT's mode is ignored when the file was already there
    os.replace(partial, path)
