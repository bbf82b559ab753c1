"""Certificates and device keys for a deployed federation."""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pollen.certs import (CA_VALID_DAYS, EXPIRY_WARNING_DAYS, VALID_DAYS, CertificateError, add_devices,
                          device_names, expires_on, expiry_warning, make_certificates, renew_server_certificate,
                          revoke_devices, server_names_of)


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


def reissued(folder: Path, name: str, not_after: datetime.datetime) -> None:
    """Sign ``folder/name`` again with the CA, same subject, names and key, to end at ``not_after``."""
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    old = x509.load_pem_x509_certificate((folder / name).read_bytes())
    builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject)
               .public_key(old.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(min(old.not_valid_before_utc, not_after - datetime.timedelta(days=1)))
               .not_valid_after(not_after))
    for extension in old.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    (folder / name).write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_lifetimes_are_ten_years_for_the_ca_and_825_days_for_the_server(tmp_path):
    paths = make_certificates(tmp_path, ["localhost"], devices=1)
    now, hour = datetime.datetime.now(datetime.timezone.utc), datetime.timedelta(hours=1)
    assert abs(expires_on(paths.ca_cert) - now - datetime.timedelta(days=CA_VALID_DAYS)) < hour
    assert abs(expires_on(paths.server_cert) - now - datetime.timedelta(days=VALID_DAYS)) < hour
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        expires_on(paths.device_public_keys[0])


def test_renewing_the_server_certificate_keeps_the_ca_and_every_device_key(tmp_path):
    paths = make_certificates(tmp_path / "certs", ["fl.example.org", "127.0.0.1"], devices=2)
    before = files(paths.folder)
    reissued(paths.folder, "server.pem", datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3))
    renewed = renew_server_certificate(paths.folder, ["fl2.example.org", "127.0.0.1"])
    after = files(paths.folder)
    assert renewed == paths.server_cert
    assert {name: data for name, data in after.items() if name not in ("server.pem", "server.key")} == \
        {name: data for name, data in before.items() if name not in ("server.pem", "server.key")}
    assert after["server.pem"] != before["server.pem"] and after["server.key"] != before["server.key"]
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert server_names_of(paths.server_cert) == ["fl2.example.org", "127.0.0.1"]
    assert expires_on(paths.server_cert) - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=800)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.server_cert, paths.server_key)  # the new key goes with the new certificate
    assert mode(paths.server_key) == 0o600


def test_a_renewed_server_certificate_never_outlives_its_ca_and_an_expired_ca_is_refused(tmp_path):
    paths = make_certificates(tmp_path, ["localhost"], devices=1)
    soon = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(days=40)
    reissued(paths.folder, "ca.pem", soon)
    renew_server_certificate(paths.folder, ["localhost"])
    assert expires_on(paths.server_cert) == soon
    reissued(paths.folder, "ca.pem", datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1))
    before = paths.server_cert.read_bytes()
    with pytest.raises(CertificateError, match="the CA expired on .* new ca.pem on every device"):
        renew_server_certificate(paths.folder, ["localhost"])
    assert paths.server_cert.read_bytes() == before
    with pytest.raises(CertificateError, match="ca.pem: missing"):
        renew_server_certificate(tmp_path / "elsewhere", ["localhost"])


def test_expiry_warning_is_quiet_until_the_last_month_and_an_expired_certificate_is_an_error(tmp_path):
    paths = make_certificates(tmp_path, ["localhost"], devices=1)
    end = expires_on(paths.server_cert)
    assert expiry_warning(paths.server_cert, "renew") is None
    month = datetime.timedelta(days=EXPIRY_WARNING_DAYS)
    assert expiry_warning(paths.server_cert, "renew", now=end - month - datetime.timedelta(days=1)) is None
    warning = expiry_warning(paths.server_cert, "renew it", now=end - datetime.timedelta(days=12))
    assert warning == f"{paths.server_cert} expires in 12 days ({end:%Y-%m-%d} UTC); renew it"
    with pytest.raises(CertificateError, match=f"{paths.server_cert}: expired on"):
        expiry_warning(paths.server_cert, "renew", now=end + datetime.timedelta(seconds=1))


def test_added_devices_are_numbered_after_every_issued_one_and_nothing_is_overwritten(tmp_path):
    paths = make_certificates(tmp_path, ["localhost"], devices=3)
    revoke_devices(tmp_path, ["device-2"])
    before = files(tmp_path)
    keys = add_devices(tmp_path, 2)
    assert [key.name for key in keys] == ["device-3.key", "device-4.key"]  # device-2's number stays retired
    after = files(tmp_path)
    assert {name: after[name] for name in before} == before
    assert device_names(tmp_path) == ["device-0", "device-1", "device-3", "device-4"]
    for key in keys:
        private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(key.with_suffix(".pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert mode(key) == 0o600
    assert not list(tmp_path.rglob("*.partial"))
    assert [key.name for key in add_devices(tmp_path, 1)] == ["device-5.key"]
    with pytest.raises(CertificateError, match="--add-devices: must be at least 1"):
        add_devices(tmp_path, 0)
    with pytest.raises(CertificateError, match="no ca.pem; create the federation first"):
        add_devices(tmp_path / "nothing", 1)
    assert paths.ca_cert.read_bytes() == before["ca.pem"]


def test_revoking_moves_the_key_pair_aside_and_an_unknown_name_revokes_nothing(tmp_path):
    make_certificates(tmp_path, ["localhost"], devices=3)
    before = files(tmp_path)
    with pytest.raises(CertificateError) as unknown:
        revoke_devices(tmp_path, ["device-1", "device-7"])
    assert str(unknown.value) == (f"--revoke device-7: no {tmp_path / 'devices' / 'device-7'}.pub; "
                                  "known devices: device-0, device-1, device-2")
    assert files(tmp_path) == before
    moved = revoke_devices(tmp_path, ["device-1", "device-2"])
    assert moved == [tmp_path / "revoked" / "device-1.pub", tmp_path / "revoked" / "device-2.pub"]
    assert device_names(tmp_path) == ["device-0"]
    for name in ("device-1.pub", "device-1.key", "device-2.pub", "device-2.key"):
        assert (tmp_path / "revoked" / name).read_bytes() == before[f"devices/{name}"]
    assert mode(tmp_path / "revoked") == 0o700
    with pytest.raises(CertificateError, match="known devices: device-0$"):
        revoke_devices(tmp_path, ["device-1"])
