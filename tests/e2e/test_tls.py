"""Mutual TLS and roles, against a real cluster of ``twistd`` processes.

Every link of ``tls_cluster`` is TLS 1.3 with certificates of its own CA. The
attacks are those of the security issue: a plaintext client, a certificate of
another CA, a client certificate used to register as a server or to take a live
server's address, and a client ordering a server to replicate (to an address of
its choosing) or to verify its whole inventory; and connections that never
finish a handshake, or come in too many from one address.
"""

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import connectProtocol
from twisted.internet.ssl import Certificate, PrivateCertificate

from sdbackup import hashing, pki
from sdbackup.client.session import ClientError, Session
from sdbackup.localcluster import certificate_files, tls_environment, tls_transport
from sdbackup.protocols.messages import (
    FetchChunk,
    RegisterServer,
    ReplicateChunk,
    StatusRequest,
    VerifyChunks,
)
from sdbackup.protocols.peer import MessageProtocol, RemoteError
from sdbackup.tlsconfig import TLSIdentity, Transport

REFUSED_AT_TLS = re.compile(r"connection with \S+ refused: TLS handshake failed")


def identity(folder: Path, name: str) -> Transport:
    return tls_transport(str(folder), name)


def issue(folder: Path, role: str, name: str):
    """Another certificate of the cluster's CA (a second server, say)."""
    pki.save_certificate(str(folder), name, pki.issue(pki.load_ca(str(folder)), role, name))
    return identity(folder, name)


def foreign_identity(folder: Path, trusted_ca: Path) -> Transport:
    """A client certificate of another CA, by someone who trusts the cluster's CA (it is public)."""
    other = pki.create_ca("intruder CA")
    issued = pki.issue(other, "client", "intruder")
    own = PrivateCertificate.loadPEM(issued.certificate + b"\n" + issued.key)
    ca = Certificate.loadPEM((trusted_ca / "ca.crt").read_bytes())
    return Transport(tls=TLSIdentity(ca, own, "client", "intruder"))


async def connect(transport: Transport, address: str, role: str, expect: str) -> MessageProtocol:
    endpoint = transport.client_endpoint(reactor, address, 10)
    proto = MessageProtocol(None, role, tls=transport.tls is not None, expect=(expect,), clock=reactor)
    await connectProtocol(endpoint, proto)
    return await proto.ready


def test_a_tls_cluster_backs_up_and_restores(tls_cluster, tmp_path):
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_bytes(b"over TLS\n" * 1000)
    (src / "big.bin").write_bytes(hashing.chunk_id(b"seed").encode() * 100_000)

    snapshot = tls_cluster.backup("docs", "big.bin", cwd=src)
    tls_cluster.sdbackup("restore", snapshot, "--target", tmp_path / "out", cwd=tmp_path)

    assert (tmp_path / "out" / "docs" / "a.txt").read_bytes() == (src / "docs" / "a.txt").read_bytes()
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    status = tls_cluster.sdbackup("status", cwd=tmp_path).stdout
    assert "3 of 3 servers alive" in status


def test_a_plaintext_client_is_refused(tls_cluster, tmp_path):
    mark = tls_cluster.manager.mark()
    env = {k: v for k, v in tls_cluster.client_env().items() if not k.startswith("SDBACKUP_TLS")}

    result = subprocess.run(tls_cluster.command("snapshots"), cwd=tmp_path, env=env, timeout=60,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)

    assert result.returncode == 1, result
    assert "cannot reach the manager" in result.stderr
    assert "--tls-ca" in result.stderr
    assert "Traceback" not in result.stderr
    tls_cluster.manager.wait_for(re.compile(r"refused: TLS handshake failed: the peer does not "
                                            r"speak TLS"), timeout=10)
    assert tls_cluster.manager.mark() > mark


def test_some_of_the_tls_files_is_a_usage_error(tls_cluster, tmp_path):
    """The CA given, the client's certificate and key forgotten: a usage error (exit 2) that
    says what is missing, before anything is connected to."""
    env = {k: v for k, v in tls_cluster.client_env().items()
           if k not in ("SDBACKUP_TLS_CERT", "SDBACKUP_TLS_KEY")}
    mark = tls_cluster.manager.mark()

    result = subprocess.run(tls_cluster.command("snapshots"), cwd=tmp_path, env=env, timeout=60,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)

    assert result.returncode == 2, result
    assert "give all of --tls-ca, --tls-cert and --tls-key" in result.stderr, result
    assert tls_cluster.manager.mark() == mark  # (nothing reached the manager to be logged)


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_of_another_ca_is_refused(tls_cluster, tmp_path):
    intruder = foreign_identity(tmp_path, tls_cluster.tls)

    with pytest.raises(ClientError, match="TLS handshake failed: the peer does not trust our "
                                          "certificate"):
        await Session(reactor, tls_cluster.manager_endpoint, transport=intruder).connect()
    tls_cluster.manager.wait_for(re.compile(r"refused: TLS handshake failed: the peer's certificate "
                                            r"is not signed by this cluster's CA"), timeout=10)
    server = tls_cluster.servers[0]
    with pytest.raises(ConnectionError, match="TLS handshake failed"):
        await connect(intruder, server.address, "client", "server")
    server.process.wait_for(REFUSED_AT_TLS, timeout=10)


def test_a_client_trusting_another_ca_refuses_the_cluster(tls_cluster, tmp_path):
    other = tmp_path / "other"
    pki.save_ca(str(other), pki.create_ca("another CA"))
    pki.save_certificate(str(other), "c", pki.issue(pki.load_ca(str(other)), "client", "c"))
    env = dict(tls_cluster.client_env(), SDBACKUP_TLS_CA=str(other / "ca.crt"),
               SDBACKUP_TLS_CERT=str(other / "c.crt"), SDBACKUP_TLS_KEY=str(other / "c.key"))

    result = subprocess.run(tls_cluster.command("snapshots"), cwd=tmp_path, env=env, timeout=60,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)

    assert result.returncode == 1, result
    assert "the peer's certificate is not signed by this cluster's CA" in result.stderr
    assert "Traceback" not in result.stderr


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_cannot_register_as_a_server(tls_cluster):
    client = identity(tls_cluster.tls, "client")
    victim = tls_cluster.servers[0].address

    # Saying "server" in its Hello: refused at the first message, with the reason.
    posing = await connect(client, tls_cluster.manager_endpoint, "server", "manager")
    with pytest.raises(RemoteError, match="its certificate is a client's, but it said it is a "
                                          "server") as refused:
        await posing.request(RegisterServer(address="tcp:localhost:1", free_bytes=10**15), 10, reactor)
    assert refused.value.code == "forbidden"
    tls_cluster.manager.wait_for(re.compile(r"refused connection from client .*its certificate is "
                                            r"a client's"), timeout=10)

    # Saying "client": its RegisterServer is forbidden, and nothing of the victim changes.
    honest = await connect(client, tls_cluster.manager_endpoint, "client", "manager")
    try:
        with pytest.raises(RemoteError, match="a client may not send RegisterServer") as refused:
            await honest.request(RegisterServer(address=victim, free_bytes=10**15), 10, reactor)
        assert refused.value.code == "forbidden"
        status = await honest.request(StatusRequest(), 10, reactor)
        assert {s.address for s in status.servers if s.alive} == {
            s.address for s in tls_cluster.servers}
    finally:
        honest.transport.loseConnection()


def test_a_server_refuses_to_start_with_a_client_certificate(tls_cluster, tmp_path):
    ca, cert, key = certificate_files(str(tls_cluster.tls), "client")
    started = subprocess.run(
        [str(Path(tls_cluster.command()[0]).parent / "twistd"), "-n", "--pidfile=", "sdbackup-server",
         "--listen", "tcp:0:interface=127.0.0.1", "--data", str(tmp_path / "d"), "--manager",
         tls_cluster.manager_endpoint, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert started.returncode == 1, started
    assert "a server needs one issued with --role server" in started.stdout + started.stderr


@pytest_twisted.ensureDeferred
async def test_another_certificate_cannot_take_a_live_servers_address(tls_cluster):
    rogue = issue(tls_cluster.tls, "server", "rogue")
    victim = tls_cluster.servers[1].address

    proto = await connect(rogue, tls_cluster.manager_endpoint, "server", "manager")
    try:
        with pytest.raises(RemoteError, match="held by a live server with another certificate") as e:
            await proto.request(RegisterServer(address=victim, free_bytes=10**15), 10, reactor)
        assert e.value.code == "forbidden"
    finally:
        proto.transport.loseConnection()
    tls_cluster.manager.wait_for(re.compile(rf"refused registration of {re.escape(victim)}"), timeout=10)
    client = await connect(identity(tls_cluster.tls, "client"), tls_cluster.manager_endpoint,
                           "client", "manager")
    try:
        status = await client.request(StatusRequest(), 10, reactor)
        assert all(s.alive for s in status.servers if s.address == victim)
    finally:
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_order_a_server_to_replicate_or_verify(tls_cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.txt").write_bytes(b"secret\n")
    tls_cluster.backup("secret.txt", cwd=src)
    client = identity(tls_cluster.tls, "client")
    server = tls_cluster.servers[0]
    proto = await connect(client, server.address, "client", "server")
    try:
        chunk_id = hashing.chunk_id(b"secret\n")
        for order in (ReplicateChunk(chunk_id=chunk_id, forward_to=[tls_cluster.servers[1].address]),
                      VerifyChunks(read_data=True)):
            with pytest.raises(RemoteError) as refused:
                await proto.request(order, 10, reactor)
            assert refused.value.code == "forbidden"
            assert f"a client may not send {type(order).__name__}" in refused.value.reason
        # The connection serves on: what a client may ask is answered.
        with pytest.raises(RemoteError) as missing:
            await proto.request(FetchChunk(chunk_id=hashing.chunk_id(b"never stored")), 10, reactor)
        assert missing.value.code != "forbidden"
    finally:
        proto.transport.loseConnection()
    server.process.wait_for(re.compile(r"forbidden: ReplicateChunk from client"), timeout=10)


def test_check_read_data_needs_the_admin_role(tls_cluster, tmp_path):
    refused = tls_cluster.sdbackup("check", "--read-data", cwd=tmp_path, check=False)
    assert refused.returncode == 1, refused.describe()
    assert "a client may not send CheckRequest --read-data (only admin)" in refused.stderr

    admin = tls_environment(str(tls_cluster.tls), "admin")
    done = subprocess.run(tls_cluster.command("check", "--read-data"), cwd=tmp_path,
                          env=dict(tls_cluster.client_env(), **admin), timeout=60,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done
    assert "3 servers re-hashed every chunk" in done.stdout


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes ``sock`` within ``seconds`` (reading what it sent meanwhile)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_silent_and_surplus_connections_are_closed(start_cluster, fast_manager_options):
    cluster = start_cluster(servers=1, manager_options=[
        *fast_manager_options, "--handshake-timeout", 1, "--max-connections-per-host", 8])
    address = ("127.0.0.1", cluster.manager_port)
    # The server's link is one of the 8; seven more are let in, the next one is not.
    silent = [socket.create_connection(address) for _ in range(7)]
    surplus = socket.create_connection(address)
    try:
        assert closed_within(surplus, 1.0)
        started = time.monotonic()
        # A connection that never says Hello (nor starts TLS) is closed at the handshake timeout.
        assert all(closed_within(s, 5.0) for s in silent)
        assert time.monotonic() - started < 5.0
        cluster.manager.wait_for(re.compile(r"refused connection from 127\.0\.0\.1: 8 connections "
                                            r"from it already"), timeout=5)
        cluster.manager.wait_for(re.compile(r"no handshake within 1 s"), timeout=5)
        # The cluster serves on.
        assert "1 of 1 servers alive" in cluster.sdbackup("status", cwd=cluster.root).stdout
    finally:
        for s in [*silent, surplus]:
            s.close()
