"""The cluster's certificates: a CA, and certificates it issues that carry a role.

A certificate's role is its subject's organizational unit (``OU=server``...),
under ``O=sdbackup``: a standard, visible field (``openssl x509 -noout -subject``
shows it), signed by the CA with everything else. Keys are EC P-256. The
functions here are pure (objects and PEM bytes in, out); ``save_ca`` and
``save_certificate`` write the files, keys with mode 0600.
"""

import datetime
import ipaddress
import os

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: What a peer may be. An admin may do all a client does, and more.
ROLES = ("manager", "server", "client", "admin")
ORGANIZATION = "sdbackup"
#: Days a CA and a certificate are valid.
CA_DAYS = 3650
CERT_DAYS = 825
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


class CertificateError(Exception):
    """A certificate that is not what the cluster needs (no role, another CA...)."""


@attrs.frozen
class Issued:
    """A certificate and its private key, as PEM."""

    certificate: bytes
    key: bytes


def _name(common_name: str, role: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if role is not None:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    parts.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(parts)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(common_name: str = "sdbackup cluster CA", days: int = CA_DAYS) -> Issued:
    """A new self-signed CA that may sign certificates and nothing else."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(ca: Issued, role: str, name: str, hosts=DEFAULT_HOSTS, days: int = CERT_DAYS) -> Issued:
    """A certificate for ``name`` in ``role``, valid for ``hosts``, signed by ``ca``.

    Managers and servers accept connections and make them (TLS server and client
    use); clients and admins only make them.
    """
    if role not in ROLES:
        raise CertificateError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name:
        raise CertificateError("a certificate needs a name")
    ca_cert = x509.load_pem_x509_certificate(ca.certificate)
    ca_key = serialization.load_pem_private_key(ca.key, None)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in ("manager", "server"):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name, role)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def role_of(cert: x509.Certificate) -> str:
    """The role a certificate carries; ``CertificateError`` when it carries none we know."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    roles = [u.value for u in units if u.value in ROLES]
    if len(roles) != 1 or len(units) != 1:
        raise CertificateError(f"certificate {name_of(cert)!r} carries no sdbackup role "
                               f"(subject {cert.subject.rfc4514_string()})")
    return roles[0]


def name_of(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate, hex: what identifies one peer."""
    return cert.fingerprint(hashes.SHA256()).hex()


def verify_issued_by(cert: x509.Certificate, ca: x509.Certificate, at: datetime.datetime | None = None):
    """``CertificateError`` unless ``cert`` is signed by ``ca`` and valid at ``at`` (now).

    TLS does this check itself; this is for tools and tests that look at files.
    """
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        detail = f" ({e})" if str(e) else ""
        raise CertificateError(f"certificate {name_of(cert)!r} is not issued by this CA{detail}") from None
    at = at or _now()
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise CertificateError(f"certificate {name_of(cert)!r} is not valid at {at:%Y-%m-%d}")


def load_certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# --- files ---------------------------------------------------------------------


def _write(path: str, data: bytes, mode: int, replace: bool):
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def ca_paths(folder: str) -> tuple[str, str]:
    return os.path.join(folder, "ca.crt"), os.path.join(folder, "ca.key")


def save_ca(folder: str, ca: Issued):
    """``folder/ca.crt`` and ``folder/ca.key`` (0600); never replaces an existing CA."""
    os.makedirs(folder, exist_ok=True)
    cert_path, key_path = ca_paths(folder)
    if os.path.exists(cert_path) or os.path.exists(key_path):
        raise CertificateError(f"a CA exists already in {folder}")
    _write(key_path, ca.key, 0o600, replace=False)
    _write(cert_path, ca.certificate, 0o644, replace=False)


def load_ca(folder: str) -> Issued:
    cert_path, key_path = ca_paths(folder)
    try:
        with open(cert_path, "rb") as c, open(key_path, "rb") as k:
            return Issued(c.read(), k.read())
    except FileNotFoundError as e:
        raise CertificateError(f"no CA in {folder} ({e.filename} missing): "
                               f"create one with `sdbackup tls ca --dir {folder}`") from None


def save_certificate(folder: str, name: str, issued: Issued) -> tuple[str, str]:
    """``folder/NAME.crt`` and ``folder/NAME.key`` (0600), replacing older ones of that name."""
    if not name or os.sep in name or name.startswith(".") or name == "ca":
        raise CertificateError(f"{name!r} cannot name a certificate file")
    cert_path, key_path = os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key")
    _write(key_path, issued.key, 0o600, replace=True)
    _write(cert_path, issued.certificate, 0o644, replace=True)
    return cert_path, key_path
