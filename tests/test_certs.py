"""Certificates and device keys for a deployed federation."""

from __future__ import annotations

import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pollen.certs import CertificateError, make_certificates, server_names_of


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path):
    paths = make_certificates(tmp_path / "certs", ["fl.example.org", "127.0.0.1", "::1"], devices=2)
    assert sorted(server_names_of(paths.server_cert)) == sorted(["fl.example.org", "127.0.0.1", "::1"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # A TLS stack accepts the pair: the key matches the certificate, the CA loads as a trust root.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    ssl.create_default_context(cafile=str(paths.ca_cert))


def test_device_keys_are_ec_pairs_in_the_format_flower_reads(tmp_path):
    paths = make_certificates(tmp_path, ["localhost"], devices=3)
    assert len(paths.device_keys) == 3 and len(set(paths.device_public_keys)) == 3
    publics = set()
    for private_path, public_path in zip(paths.device_keys, paths.device_public_keys):
        private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        publics.add(public_path.read_text())
    assert len(publics) == 3


def test_private_files_are_owner_only_and_nothing_is_overwritten_without_force(tmp_path):
    paths = make_certificates(tmp_path / "certs", ["localhost"], devices=1)
    assert mode(paths.folder) == 0o700
    for private in (paths.ca_key, paths.server_key, *paths.device_keys):
        assert mode(private) == 0o600, private
    assert mode(paths.ca_cert) == 0o644
    before = paths.ca_cert.read_bytes()
    with pytest.raises(CertificateError, match="already exists.*--force"):
        make_certificates(tmp_path / "certs", ["localhost"], devices=1)
    assert paths.ca_cert.read_bytes() == before
    make_certificates(tmp_path / "certs", ["localhost"], devices=1, force=True)
    assert paths.ca_cert.read_bytes() != before
    assert mode(paths.ca_key) == 0o600


@pytest.mark.parametrize("names, devices, message", [
    ([], 1, "at least one host"),
    (["bad host"], 1, "not a host name"),
    (["-x.org"], 1, "not a host name"),
    (["localhost"], 0, "--devices"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, names, devices, message):
    with pytest.raises(CertificateError, match=message):
        make_certificates(tmp_path / "certs", names, devices=devices)
    assert not (tmp_path / "certs").exists()
