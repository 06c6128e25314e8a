"""The dashboard's resource tree: ``/`` (the page), ``/dashboard.js``, ``/api/status``.

The page and its script are files shipped in this package; nothing is fetched
from the internet. With a password, every request needs HTTP basic auth (any
user name).
"""

import base64
import hmac
import json
from importlib import resources

from twisted.web import resource

from sdbackup.metrics import MetricsPage

STATIC = resources.files("sdbackup.web") / "static"


def _static(name: str) -> bytes:
    return (STATIC / name).read_bytes()


class StaticFile(resource.Resource):
    isLeaf = True

    def __init__(self, name: str, content_type: bytes):
        super().__init__()
        self.body = _static(name)
        self.content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body


class StatusJSON(resource.Resource):
    """``/api/status``: ``status()`` of the monitor, as JSON."""

    isLeaf = True

    def __init__(self, status):
        super().__init__()
        self.status = status

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.status()).encode()


class Dashboard(resource.Resource):
    """The root: the page, its script, the JSON, and the metrics (when there are some)."""

    def __init__(self, status, metrics=None, password: bytes | None = None):
        super().__init__()
        self.password = password
        page = StaticFile("index.html", b"text/html; charset=utf-8")
        self.putChild(b"", page)
        self.putChild(b"index.html", page)
        self.putChild(b"dashboard.js", StaticFile("dashboard.js", b"text/javascript; charset=utf-8"))
        api = resource.Resource()
        api.putChild(b"status", StatusJSON(status))
        self.putChild(b"api", api)
        if metrics is not None:
            self.putChild(b"metrics", MetricsPage(metrics))

    def getChildWithDefault(self, path, request):
        if self.password is not None and not self._authorized(request):
            return _Unauthorized()
        return super().getChildWithDefault(path, request)

    def _authorized(self, request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            _, _, given = base64.b64decode(encoded, validate=True).partition(b":")
        except ValueError:
            return False
        return hmac.compare_digest(given, self.password)


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Basic realm="sdbackup"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"a password is needed\n"


def read_password(path: str) -> bytes:
    """The first line of ``path``; refuses an empty one."""
    with open(path, "rb") as f:
        password = f.readline().rstrip(b"\r\n")
    if not password:
        raise ValueError(f"{path} holds no password on its first line")
    return password
