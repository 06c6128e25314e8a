"""Transport rules: loopback only without TLS, refused at start; connection limits; TLS roles.

In-process, with real sockets on 127.0.0.1 and real certificates.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.python import usage
from zope.interface import implementer

from sdbackup import manager_tap, pki, server_tap
from sdbackup.localcluster import make_certificates, tls_transport
from sdbackup.protocols.messages import StatusRequest
from sdbackup.protocols.peer import MessageProtocol, RemoteError
from sdbackup.services.manager import ManagerService
from sdbackup.tlsconfig import AddressRefused, Transport, load_identity


def test_a_listen_without_interface_binds_loopback_without_tls():
    assert Transport().listen_description("tcp:5000") == "tcp:5000:interface=127.0.0.1"
    ipv6 = r"tcp:0:interface=\:\:1"
    assert Transport().listen_description(ipv6) == ipv6


@pytest.mark.parametrize("listen", ["tcp:0:interface=0.0.0.0", "tcp:5000:interface=192.0.2.7"])
def test_a_non_loopback_listen_without_tls_is_refused_at_start(tmp_path, listen):
    with pytest.raises(AddressRefused, match=r"refusing to listen on .* without TLS"):
        ManagerService(listen, str(tmp_path / "m"), reactor=reactor)
    with pytest.raises(usage.UsageError, match="--insecure"):
        manager_tap.Options().parseOptions(["--listen", listen, "--data", str(tmp_path / "m")])


def test_insecure_allows_it_and_says_so():
    transport = Transport(insecure=True)
    assert transport.listen_description("tcp:5000:interface=0.0.0.0") == "tcp:5000:interface=0.0.0.0"
    assert transport.listen_description("tcp:5000") == "tcp:5000"
    transport.check_connect("tcp:backup.example:5000")
    assert "anyone who can reach the ports" in transport.warnings()[0]


@pytest.mark.parametrize("option", ["--manager", "--advertise"])
def test_a_server_refuses_a_non_loopback_manager_or_advertised_address_without_tls(tmp_path, option):
    with pytest.raises(usage.UsageError, match="without TLS"):
        server_tap.Options().parseOptions(["--listen", "tcp:0", "--data", str(tmp_path / "d"),
                                           option, "tcp:backup.example:5000"])


def test_connections_go_to_loopback_only_without_tls():
    Transport().check_connect("tcp:localhost:5000")
    Transport().check_connect("tcp:127.0.0.2:5000")
    with pytest.raises(AddressRefused, match="only loopback addresses"):
        Transport().check_connect("tcp:backup.example:5000")
    with pytest.raises(AddressRefused, match="only tcp: endpoints"):
        Transport().check_connect("unix:/run/some.sock")


def test_tls_allows_any_address(tmp_path):
    make_certificates(str(tmp_path))
    tls = load_identity(str(tmp_path / "ca.crt"), str(tmp_path / "manager.crt"),
                        str(tmp_path / "manager.key"))
    transport = Transport(tls=tls)
    assert transport.listen_description("tcp:5000") == "tcp:5000"
    transport.check_connect("tcp:backup.example:5000")


def test_the_taps_want_a_certificate_of_their_role(tmp_path):
    make_certificates(str(tmp_path))
    options = ["--listen", "tcp:0", "--data", str(tmp_path / "m"), "--tls-ca", str(tmp_path / "ca.crt"),
               "--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key")]
    with pytest.raises(usage.UsageError, match="a manager needs one issued with --role manager"):
        manager_tap.Options().parseOptions(options)
    with pytest.raises(usage.UsageError, match="all of --tls-ca, --tls-cert and --tls-key"):
        manager_tap.Options().parseOptions(options[:6])


class Silent(Protocol):
    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_per_host_limit_are_closed(tmp_path):
    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=Transport(max_connections_per_host=2))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        kept = [await connectProtocol(endpoint, Silent()) for _ in range(2)]
        refused = await connectProtocol(endpoint, Silent())
        await refused.lost  # closed at once
        await task.deferLater(reactor, 0.2)
        assert not any(p.lost.called for p in kept)
        for p in kept:
            p.transport.loseConnection()
            await p.lost
        again = await connectProtocol(endpoint, Silent())  # room again once they are gone
        await task.deferLater(reactor, 0.2)
        assert not again.lost.called
        again.transport.loseConnection()
        await again.lost
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_connections_over_the_total_limit_are_refused_and_those_within_it_served(tmp_path):
    """README (Hostile connections): "A process accepts at most --max-connections connections"
    (and --max-connections-per-host from one address, in the test above). Each
    connection here comes from its own loopback address, so only the total can refuse one."""
    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=Transport(max_connections=3, max_connections_per_host=3))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port

        def endpoint(host: str):
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(host, 0))

        kept = []
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            proto = await connectProtocol(endpoint(host), MessageProtocol(None, "client"))
            kept.append(await proto.ready)
        refused = await connectProtocol(endpoint("127.0.0.5"), Silent())
        await until(lambda: refused.lost.called, "the fourth connection's refusal")  # no Hello
        for proto in kept:  # the three within the limit are served as before
            status = await proto.request(StatusRequest(), 10, reactor)
            assert status.state == "starting"
        kept.pop().transport.loseConnection()
        await until(lambda: len(manager.manager.connections) == 2, "the third one's end")
        again = await connectProtocol(endpoint("127.0.0.5"), MessageProtocol(None, "client"))
        await again.ready  # room again for one
        assert (await again.request(StatusRequest(), 10, reactor)).state == "starting"
        for proto in [*kept, again]:
            proto.transport.loseConnection()
    finally:
        await manager.stopService()


async def until(condition, what: str, timeout: float = 10.0):
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, f"{what} did not happen within {timeout} s"
        await task.deferLater(reactor, 0.05)


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_closed_at_the_handshake_timeout(tmp_path):
    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=Transport(handshake_timeout=0.3))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        silent = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Silent())
        started = reactor.seconds()
        await silent.lost
        assert reactor.seconds() - started < 5
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_under_tls_the_role_is_the_certificates(tmp_path):
    make_certificates(str(tmp_path))

    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=tls_transport(str(tmp_path), "manager"))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        address = f"tcp:127.0.0.1:{port}"
        for name, hello, role in [("admin", "client", "admin"), ("server", "server", "server")]:
            proto = MessageProtocol(None, hello, tls=True, expect=("manager",), clock=reactor)
            endpoint = tls_transport(str(tmp_path), name).client_endpoint(reactor, address, 5)
            await connectProtocol(endpoint, proto)
            await proto.ready
            await task.deferLater(reactor, 0.1)
            [accepted] = [c for c in manager.manager.connections if c.peer_name == name]
            assert accepted.peer_role == role
            assert no_delay(proto) and no_delay(accepted)  # through the TLS layer too
            assert accepted.peer_identity == pki.fingerprint(
                pki.load_certificate((tmp_path / f"{name}.crt").read_bytes()))
            proto.transport.loseConnection()
            await task.deferLater(reactor, 0.1)
        proto = MessageProtocol(None, "manager", tls=True, expect=("manager",), clock=reactor)
        endpoint = tls_transport(str(tmp_path), "client").client_endpoint(reactor, address, 5)
        await connectProtocol(endpoint, proto)
        await proto.ready
        with pytest.raises(RemoteError, match="its certificate is a client's, but it said it is a "
                                              "manager"):
            await proto.request(manager_status(), 5, reactor)
    finally:
        await manager.stopService()


def no_delay(proto: MessageProtocol) -> bool:
    """Whether the socket under ``proto`` sends small frames at once (Nagle's algorithm off)."""
    tcp = proto.transport
    if isinstance(tcp, ProtocolWrapper):  # TLS: the TCP connection is under it
        tcp = tcp.transport
    return bool(tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest_twisted.ensureDeferred
async def test_both_ends_of_a_link_send_small_frames_at_once(tmp_path):
    """A request waits for no acknowledgement of the one before: with Nagle's algorithm on,
    the reader's many small requests (a tree fetch, a Locate) waited for the peer's delayed
    ACK, and listing a 3,200-folder snapshot took 14.5 s instead of 4.2 s."""
    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor)
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        proto = MessageProtocol(None, "client", expect=("manager",), clock=reactor)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
        await proto.ready
        await until(lambda: manager.manager.connections, "the manager to see the link")
        [accepted] = manager.manager.connections
        assert no_delay(proto) and no_delay(accepted)
        proto.transport.loseConnection()
    finally:
        await manager.stopService()


def manager_status():
    from sdbackup.protocols.messages import StatusRequest

    return StatusRequest()


@pytest_twisted.ensureDeferred
async def test_a_client_whose_idle_link_was_closed_connects_again(tmp_path):
    from sdbackup.client.session import Session
    from sdbackup.protocols.messages import StatusRequest

    manager = ManagerService("tcp:0:interface=127.0.0.1", str(tmp_path / "m"), reactor=reactor,
                             transport=Transport(idle_timeout=0.2))
    manager.startService()
    try:
        port = (await manager.when_listening()).getHost().port
        session = await Session(reactor, f"tcp:127.0.0.1:{port}").connect()
        first = session.manager
        await task.deferLater(reactor, 0.6)
        assert first.closed  # the manager closed it, and said why
        assert first.refusal.code == "idle"
        status = await session.ask(StatusRequest())
        assert status.state == "starting"
        assert session.manager is not first
        await session.close()
    finally:
        await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_under_tls_an_idle_connection_with_a_producer_registered_is_closed(tmp_path):
    """A server's fetch gate is its connection's producer for as long as the connection lives;
    under TLS a registered producer keeps a close from happening unless it is let go first.
    The client here is told the connection is idle and stays: only the server can close it."""
    make_certificates(str(tmp_path))
    server_lost = defer.Deferred()
    on_lost = told_when_lost(server_lost)
    accepted: list[MessageProtocol] = []

    def accept():
        proto = MessageProtocol(on_lost, "server", tls=True, clock=reactor, idle_timeout=0.3)
        accepted.append(proto)
        return proto

    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        tls_transport(str(tmp_path), "server").server_factory(Factory.forProtocol(accept)))
    client_lost = defer.Deferred()
    client = Lingering(told_when_lost(client_lost), "client", tls=True, expect=("server",), clock=reactor)
    try:
        endpoint = tls_transport(str(tmp_path), "client").client_endpoint(
            reactor, f"tcp:127.0.0.1:{port.getHost().port}", 5)
        await connectProtocol(endpoint, client)
        await client.ready
        [server] = accepted
        server.transport.registerProducer(_StillProducer(), True)  # as a fetch gate is

        await server_lost.addTimeout(10, reactor)  # closed for idleness, not left open
        assert client.refusal.code == "idle"
        await client_lost.addTimeout(10, reactor)
    finally:
        if not client_lost.called:
            client.transport.abortConnection()
        await port.stopListening()


def told_when_lost(lost: defer.Deferred):
    """A handler that fires ``lost`` when its connection is lost."""
    return type("Handler", (), {"connection_lost": lambda self, proto: lost.callback(proto)})()


class Lingering(MessageProtocol):
    """A client that is told its connection is closed and does not close its end."""

    def _peer_refused(self, msg):
        self.refusal = RemoteError(msg.reason, msg.code)


@implementer(IPushProducer)
class _StillProducer:
    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
