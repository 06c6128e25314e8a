"""How a process reaches and accepts peers: mutual TLS against the cluster CA, or loopback.

``Transport`` is what the manager, the servers and the client share about their
links: with a ``TLSIdentity`` (``--tls-ca/--tls-cert/--tls-key``) every link is
TLS 1.3, both ends present a certificate of the cluster's CA, and a peer's role
is read from its certificate. Without one, a process listens on and connects to
loopback addresses only, unless ``insecure`` (``--insecure``) says otherwise.
Endpoint strings stay ``tcp:...``; TLS wraps them (Twisted's TLS, pyOpenSSL,
service_identity for host names).
"""

import ipaddress
import re

import attrs
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory

from sdbackup import pki

#: Seconds a new connection has to finish TLS and the Hello exchange.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds a connection with nothing in flight stays open.
IDLE_TIMEOUT = 300.0
#: Connections one process accepts at once, in all and from one peer address.
MAX_CONNECTIONS = 1024
MAX_CONNECTIONS_PER_HOST = 128


class AddressRefused(Exception):
    """An address a process may not listen on or connect to as configured."""

    code = "address-refused"


class TLSConfigError(Exception):
    """TLS files that cannot be used (missing, unreadable, not of this CA, no role)."""


@attrs.frozen
class TLSIdentity:
    """This process's certificate and key, and the CA it trusts."""

    ca: ssl.Certificate
    own: ssl.PrivateCertificate
    role: str
    name: str

    def server_options(self) -> ssl.CertificateOptions:
        """Accepting side: TLS 1.3, a certificate of our CA required from every peer."""
        return ssl.CertificateOptions(
            privateKey=self.own.privateKey.original, certificate=self.own.original,
            trustRoot=ssl.trustRootFromCertificates([self.ca]),
            raiseMinimumTo=ssl.TLSVersion.TLSv1_3)

    def client_options(self, hostname: str):
        """Connecting side: the peer's certificate must be of our CA and valid for ``hostname``."""
        return ssl.optionsForClientTLS(
            hostname, trustRoot=ssl.trustRootFromCertificates([self.ca]), clientCertificate=self.own,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_3})


def load_identity(ca_file: str, cert_file: str, key_file: str) -> TLSIdentity:
    """Read and check the three files; ``TLSConfigError`` says what is wrong with them."""
    try:
        with open(ca_file, "rb") as f:
            ca_pem = f.read()
        with open(cert_file, "rb") as f:
            cert_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        ca_cert, cert = pki.load_certificate(ca_pem), pki.load_certificate(cert_pem)
        pki.verify_issued_by(cert, ca_cert)
        role = pki.role_of(cert)
        key = serialization.load_pem_private_key(key_pem, None)
        if key.public_key() != cert.public_key():
            raise TLSConfigError(f"{key_file} is not the key of {cert_file}")
        own = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        return TLSIdentity(ssl.Certificate.loadPEM(ca_pem), own, role, pki.name_of(cert))
    except pki.CertificateError as e:
        raise TLSConfigError(f"{cert_file}: {e}") from None
    except (ValueError, TypeError, SSL.Error) as e:
        raise TLSConfigError(f"{cert_file}, {key_file} or {ca_file} is not a PEM certificate or "
                             f"key: {e}") from None


@attrs.frozen
class PeerCertificate:
    role: str
    name: str
    fingerprint: str


def peer_certificate(transport) -> PeerCertificate:
    """Who is at the other end of a TLS ``transport`` (verified by the handshake already)."""
    x509 = transport.getPeerCertificate() if hasattr(transport, "getPeerCertificate") else None
    if x509 is None:
        raise pki.CertificateError("the peer presented no certificate")
    cert = x509.to_cryptography()
    return PeerCertificate(pki.role_of(cert), pki.name_of(cert), pki.fingerprint(cert))


# --- addresses ---------------------------------------------------------------------


def _parts(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint string's kind, positional and keyword arguments (``\\:`` escapes ``:``)."""
    pieces = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    args, kwargs = [], {}
    for piece in pieces[1:]:
        name, eq, value = piece.partition("=")
        if eq and name.isidentifier():
            kwargs[name] = value
        else:
            args.append(piece)
    return pieces[0], args, kwargs


def endpoint_host(description: str, listening: bool) -> str | None:
    """The host of a ``tcp:`` endpoint: for a listening one its interface ("" for every
    interface), for a connecting one the host it dials. None for other kinds."""
    kind, args, kwargs = _parts(description)
    if kind != "tcp":
        return None
    if listening:
        return kwargs.get("interface", "")
    return kwargs.get("host", args[0] if args else "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@attrs.frozen
class Transport:
    """TLS or loopback, and the limits every listener applies."""

    tls: TLSIdentity | None = None
    insecure: bool = False
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float | None = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_host: int = MAX_CONNECTIONS_PER_HOST

    @property
    def role(self) -> str | None:
        return self.tls.role if self.tls else None

    def listen_description(self, description: str) -> str:
        """``description``, bound to 127.0.0.1 when it names no interface and there is no TLS;
        ``AddressRefused`` for a non-loopback interface without TLS and without ``insecure``."""
        host = endpoint_host(description, listening=True)
        if self.tls is not None or self.insecure or host is None:
            return description
        if host == "":
            return f"{description}:interface=127.0.0.1"
        if not is_loopback(host):
            raise AddressRefused(
                f"refusing to listen on {description} without TLS: give --tls-ca, --tls-cert and "
                f"--tls-key, or --insecure to accept plaintext from the network")
        return description

    def check_connect(self, address: str, what: str = "connect to"):
        """``AddressRefused`` unless this process may dial ``address``."""
        kind = address.partition(":")[0]
        if kind != "tcp":
            raise AddressRefused(f"cannot {what} {address}: only tcp: endpoints are used")
        if self.tls is None and not self.insecure and not is_loopback(
                endpoint_host(address, listening=False) or ""):
            raise AddressRefused(
                f"refusing to {what} {address} without TLS: only loopback addresses are reached "
                f"in plaintext (give --tls-ca, --tls-cert and --tls-key, or --insecure)")

    def client_endpoint(self, reactor, address: str, timeout: float | None = None, what="connect to"):
        """An endpoint for ``address``, checked, with a connect timeout, TLS-wrapped when set."""
        self.check_connect(address, what)
        description = address
        if timeout is not None and "timeout=" not in address:
            description = f"{address}:timeout={int(timeout)}"
        endpoint = clientFromString(reactor, description)
        if self.tls is None:
            return endpoint
        host = endpoint_host(address, listening=False) or "localhost"
        return wrapClientTLS(self.tls.client_options(host.strip("[]")), endpoint)

    def server_factory(self, factory):
        if self.tls is None:
            return factory
        return TLSMemoryBIOFactory(self.tls.server_options(), False, factory)

    def warnings(self) -> list[str]:
        if self.tls is None and self.insecure:
            return ["--insecure: no TLS, and addresses beyond loopback are allowed; anyone who "
                    "can reach the ports can read, write and command this cluster"]
        return []


# --- what went wrong ------------------------------------------------------------------

_TLS_REASONS = [
    ("certificate verify failed", "the peer's certificate is not signed by this cluster's CA, "
                                  "or has expired"),
    ("unknown ca", "the peer does not trust our certificate (it is of another CA)"),
    ("bad certificate", "the peer refused our certificate"),
    ("certificate required", "the peer wants a certificate and we gave none"),
    ("peer did not return a certificate", "the peer presented no certificate"),
    ("wrong version number", "the peer does not speak TLS (plaintext?)"),
    ("packet length too long", "the peer does not speak TLS (plaintext?)"),
    ("record layer failure", "the peer does not speak TLS (plaintext?)"),
    ("http request", "the peer does not speak TLS (plaintext?)"),
    ("unsupported protocol", "the peer does not speak TLS 1.3"),
]


def describe_tls_failure(error: BaseException) -> str | None:
    """One line for a failed TLS handshake, or None when ``error`` is no TLS error."""
    if isinstance(error, SSL.Error):
        raw = "; ".join(str(r[-1]) for r in error.args[0] if r) if error.args and isinstance(
            error.args[0], list) else str(error)
        for fragment, meaning in _TLS_REASONS:
            if fragment in raw.lower():
                return f"TLS handshake failed: {meaning} ({raw})"
        return f"TLS handshake failed: {raw}"
    if type(error).__name__ == "VerificationError":  # service_identity: wrong host name
        return f"TLS handshake failed: the peer's certificate is not valid for its address ({error})"
    return None


# --- twistd options ------------------------------------------------------------------

#: Options of both twistd plugins (``usage.Options`` lists).
OPTION_PARAMETERS = [
    ["tls-ca", None, None, "The cluster CA's certificate (PEM): every peer must present a "
                           "certificate it signed. With --tls-cert and --tls-key: mutual TLS 1.3."],
    ["tls-cert", None, None, "This process's certificate (PEM), issued by `sdbackup tls cert`."],
    ["tls-key", None, None, "This process's private key (PEM)."],
    ["handshake-timeout", None, HANDSHAKE_TIMEOUT,
     "Seconds a new connection has to finish TLS and the Hello exchange.", float],
    ["idle-timeout", None, IDLE_TIMEOUT,
     "Seconds an accepted connection with nothing in flight stays open.", float],
    ["max-connections", None, MAX_CONNECTIONS, "Connections accepted at once.", int],
    ["max-connections-per-host", None, MAX_CONNECTIONS_PER_HOST,
     "Connections accepted at once from one peer address.", int],
]
OPTION_FLAGS = [
    ["insecure", None, "Without TLS, allow addresses other than loopback (plaintext, no "
                       "authentication: anyone who reaches the ports controls the cluster)."],
]


def transport_from_options(options, role: str) -> Transport:
    """The ``Transport`` that twistd options describe; ``usage.UsageError`` says what is wrong."""
    from twisted.python import usage

    files = [options["tls-ca"], options["tls-cert"], options["tls-key"]]
    tls = None
    if any(files):
        if not all(files):
            raise usage.UsageError("give all of --tls-ca, --tls-cert and --tls-key, or none")
        try:
            tls = load_identity(*files)
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        if tls.role != role:
            raise usage.UsageError(f"{options['tls-cert']} is a {tls.role}'s certificate; a "
                                   f"{role} needs one issued with --role {role}")
    for name in ("handshake-timeout", "idle-timeout", "max-connections", "max-connections-per-host"):
        if options[name] <= 0:
            raise usage.UsageError(f"--{name} must be positive")
    return Transport(tls=tls, insecure=bool(options["insecure"]),
                     handshake_timeout=options["handshake-timeout"],
                     idle_timeout=options["idle-timeout"],
                     max_connections=options["max-connections"],
                     max_connections_per_host=options["max-connections-per-host"])
