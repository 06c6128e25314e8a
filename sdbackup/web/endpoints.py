"""Where the dashboard may listen: loopback unless told otherwise, and then only safely.

Pure functions on Twisted endpoint strings. A ``tcp:PORT`` without an interface
would listen on every address; for the dashboard it means loopback. Any other
address needs the cluster's TLS (the page is then served over TLS with the
manager's certificate) and a password (``--web-password-file``). (The metrics
follow the rule of the process's own port: ``Transport.listen_description``.)
"""

import ipaddress


class ListenRefused(ValueError):
    """An endpoint a listener may not use; the text says why and what to give instead."""


def _parts(description: str) -> tuple[str, list[str]]:
    """The endpoint's type and its fields, split at colons not escaped with a backslash."""
    fields, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields[0].lower(), fields[1:]


def _interface(parts: list[str]) -> str | None:
    for part in parts:
        if part.startswith("interface="):
            return part[len("interface="):].strip("[]")
    return None


def loopback_by_default(description: str) -> str:
    """``description`` with ``interface=`` set to loopback when a TCP endpoint names none."""
    kind, parts = _parts(description)
    if kind in ("tcp", "tcp6", "ssl") and _interface(parts) is None:
        loopback = "\\:\\:1" if kind == "tcp6" else "127.0.0.1"
        return f"{description}:interface={loopback}"
    return description


def is_loopback(description: str) -> bool:
    """Whether ``description`` (after ``loopback_by_default``) is reachable from this host only."""
    kind, parts = _parts(description)
    if kind == "unix":
        return True
    interface = _interface(parts)
    if interface is None:
        return False
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def dashboard_endpoint(description: str, password_file: str | None, tls: bool) -> str:
    """The endpoint the dashboard listens on. Beyond loopback the page would show the
    cluster's layout to the network: refused without TLS and a password."""
    description = loopback_by_default(description)
    if not is_loopback(description):
        missing = [what for what, given in (("TLS (--tls-ca, --tls-cert, --tls-key)", tls),
                                            ("--web-password-file", password_file)) if not given]
        if missing:
            raise ListenRefused(
                f"--web {description} is not a loopback address: the dashboard listens on other "
                f"addresses only with TLS and a password; missing: {' and '.join(missing)} "
                "(or use a loopback address, e.g. tcp:8080, and an SSH tunnel)")
    return description
