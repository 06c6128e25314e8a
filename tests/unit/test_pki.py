"""The cluster CA and the certificates it issues: roles, host names, files, verification."""

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sdbackup import pki
from sdbackup.tlsconfig import TLSConfigError, load_identity


@pytest.fixture(scope="module")
def ca():
    return pki.create_ca()


def certificate(issued: pki.Issued) -> x509.Certificate:
    return pki.load_certificate(issued.certificate)


@pytest.mark.parametrize("role", pki.ROLES)
def test_a_certificate_carries_its_role_and_name(ca, role):
    cert = certificate(pki.issue(ca, role, f"{role}-1"))

    assert pki.role_of(cert) == role
    assert pki.name_of(cert) == f"{role}-1"
    pki.verify_issued_by(cert, certificate(ca))


def test_the_default_hosts_are_localhost_and_the_loopback_address(ca):
    cert = certificate(pki.issue(ca, "server", "s1"))

    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_given_hosts_replace_the_defaults(ca):
    cert = certificate(pki.issue(ca, "server", "s2", hosts=["backup2.example", "10.0.0.7"]))

    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["backup2.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


def test_only_managers_and_servers_may_act_as_tls_servers(ca):
    def usages(role):
        cert = certificate(pki.issue(ca, role, role))
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert ExtendedKeyUsageOID.SERVER_AUTH in usages("manager")
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages("server")
    assert usages("client") == usages("admin") == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_a_certificate_of_another_ca_is_rejected(ca):
    other = pki.create_ca()
    foreign = certificate(pki.issue(other, "client", "intruder"))

    with pytest.raises(pki.CertificateError, match="not issued by this CA"):
        pki.verify_issued_by(foreign, certificate(ca))


def test_an_unknown_role_is_refused(ca):
    with pytest.raises(pki.CertificateError, match="role 'root' is not one of"):
        pki.issue(ca, "root", "x")


def test_a_certificate_without_a_role_has_none(ca):
    with pytest.raises(pki.CertificateError, match="carries no sdbackup role"):
        pki.role_of(certificate(ca))


def test_ca_files_keep_the_key_private_and_are_never_replaced(tmp_path, ca):
    folder = str(tmp_path / "tls")
    pki.save_ca(folder, ca)
    _, key_path = pki.ca_paths(folder)

    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert pki.load_ca(folder) == ca
    with pytest.raises(pki.CertificateError, match="a CA exists already"):
        pki.save_ca(folder, pki.create_ca())
    assert pki.load_ca(folder) == ca


def test_certificate_files_load_as_this_processs_identity(tmp_path, ca):
    folder = str(tmp_path)
    pki.save_ca(folder, ca)
    cert_path, key_path = pki.save_certificate(folder, "node", pki.issue(ca, "server", "node"))

    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    identity = load_identity(pki.ca_paths(folder)[0], cert_path, key_path)
    assert (identity.role, identity.name) == ("server", "node")


def test_a_key_of_another_certificate_is_refused(tmp_path, ca):
    folder = str(tmp_path)
    pki.save_ca(folder, ca)
    cert_path, _ = pki.save_certificate(folder, "a", pki.issue(ca, "client", "a"))
    _, other_key = pki.save_certificate(folder, "b", pki.issue(ca, "client", "b"))

    with pytest.raises(TLSConfigError, match="is not the key of"):
        load_identity(pki.ca_paths(folder)[0], cert_path, other_key)


def test_a_certificate_of_another_ca_does_not_load(tmp_path, ca):
    folder = str(tmp_path)
    pki.save_ca(folder, ca)
    foreign = pki.issue(pki.create_ca(), "client", "intruder")
    cert_path, key_path = pki.save_certificate(folder, "intruder", foreign)

    with pytest.raises(TLSConfigError, match="not issued by this CA"):
        load_identity(pki.ca_paths(folder)[0], cert_path, key_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TLSConfigError, match=r"cannot read .*ca\.crt"):
        load_identity(str(tmp_path / "ca.crt"), str(tmp_path / "a.crt"), str(tmp_path / "a.key"))


def test_a_certificate_name_cannot_escape_the_folder(tmp_path, ca):
    for name in ("../evil", "", ".hidden", "ca"):
        with pytest.raises(pki.CertificateError):
            pki.save_certificate(str(tmp_path), name, pki.issue(ca, "client", "x"))
