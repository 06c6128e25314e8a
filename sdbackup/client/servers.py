"""``sdbackup server list|drain|retire``: the storage servers as the manager knows them.

``list`` shows each server (retired ones too) with its disk's identity, its state and
what the catalog records on it. ``drain ADDR`` has the manager place nothing more on a
server and copy each of its chunks to the others; it then shows the progress until
every chunk has its full copies elsewhere (``--no-wait``: return at once; the drain goes
on in the manager, and survives its restart). ``retire ADDR`` forgets a dead or drained
server; the manager refuses while a chunk would be left short of copies. ADDR is the
address ``list`` shows, or any unique end of it (``localhost:5001``, ``5001``).
"""

import sys
import time

from twisted.internet import task

from sdbackup.client import jsonout
from sdbackup.client.progress import human_bytes
from sdbackup.client.session import ClientError, Session
from sdbackup.protocols.messages import DrainServer, ListServers, RetireServer, ServerInfo
from sdbackup.protocols.peer import RemoteError

#: Seconds between looks at a drain's progress, and without progress before giving up.
DRAIN_POLL = 1.0
DRAIN_STALLED = 120.0
#: Exit status when the command finished but left something undone (README: degraded).
EXIT_INCOMPLETE = 3


def duration(seconds: float) -> str:
    """``45s``, ``12m 5s``, ``3h 2m``, ``4d 1h``: how long, to a reader."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def state_of(info: ServerInfo, now: float) -> str:
    """``alive``, ``full``, ``dead 5m 2s``, ``retired``, with ``draining`` added."""
    if info.retired:
        return "retired"
    state = ("full" if info.full else "alive") if info.alive else f"dead {duration(now - info.last_seen)}"
    return f"{state}, draining" if info.draining else state


def server_json(info: ServerInfo, now: float) -> dict:
    return {"address": info.address, "disk_id": info.disk_id, "alive": info.alive,
            "full": info.full, "draining": info.draining, "retired": info.retired,
            "chunks": info.chunks, "bytes": info.bytes, "free_bytes": info.free_bytes,
            "total_bytes": info.total_bytes, "last_seen": jsonout.rfc3339(info.last_seen),
            "dead_seconds": None if info.alive or info.retired else round(now - info.last_seen, 1),
            "short": info.short, "only_here": info.only_here}


def resolve(servers: list[ServerInfo], given: str) -> str:
    """The address ``given`` names: itself, or the one address that ends with ``:given``
    (retired servers are not candidates)."""
    if any(s.address == given for s in servers):
        return given
    matches = [s.address for s in servers if not s.retired
               and (s.address.endswith(f":{given}") or s.address == f"tcp:{given}")]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ClientError(f"no server {given!r} is known to the manager (see sdbackup server list)")
    raise ClientError(f"{given!r} names {len(matches)} servers ({', '.join(matches)}): give the "
                      f"whole address")


async def cmd_server(session: Session, args) -> int:
    command = {"list": list_servers, "drain": drain, "retire": retire}[args.server_command]
    return await command(session, args)


async def list_servers(session: Session, args) -> int:
    reply = await session.ask(ListServers())
    now = time.time()
    if getattr(args, "json", False):
        print(jsonout.dumps({"replicas": reply.replicas,
                             "servers": [server_json(s, now) for s in reply.servers]}))
        return 0
    print(f"{'SERVER':<28} {'DISK':<12} {'STATE':<18} {'CHUNKS':>8} {'BYTES':>10} {'FREE':>10}")
    for s in reply.servers:
        print(f"{s.address:<28} {s.disk_id[:12]:<12} {state_of(s, now):<18} {s.chunks:>8} "
              f"{human_bytes(s.bytes):>10} {human_bytes(s.free_bytes):>10}")
    return 0


async def _find(session: Session, given: str) -> ServerInfo:
    servers = (await session.ask(ListServers())).servers
    address = resolve(servers, given)
    return next(s for s in servers if s.address == address)


async def drain(session: Session, args) -> int:
    address = (await _find(session, args.address)).address
    reply = await session.ask(DrainServer(address=address))
    as_json = getattr(args, "json", False)
    info, replicas = reply.servers[0], reply.replicas
    if not as_json:
        print(f"draining {address}: nothing more is placed on it; its {info.chunks} chunks are "
              f"copied to the other servers")
    last, changed = None, time.monotonic()
    while not args.no_wait and info.short:
        if info.short != last:
            last, changed = info.short, time.monotonic()
            if not as_json:
                print(f"  {info.short} of {info.chunks} chunks still short of {replicas} copies "
                      f"elsewhere", flush=True)
        elif time.monotonic() - changed > DRAIN_STALLED:
            if as_json:
                print(jsonout.dumps(server_json(info, time.time())))
            print(f"sdbackup: the drain of {address} made no progress for {DRAIN_STALLED:g} s "
                  f"({info.short} chunks left): see sdbackup status and the manager's log; it "
                  f"goes on in the manager", file=sys.stderr)
            return EXIT_INCOMPLETE
        await task.deferLater(session.reactor, DRAIN_POLL)
        try:  # (asked again: it answers for this server alone, a cheap look)
            info = (await session.ask(DrainServer(address=address))).servers[0]
        except RemoteError as e:
            if e.code != "unknown-server":
                raise
            raise ClientError(f"{address} was retired during the drain") from None
    if as_json:
        print(jsonout.dumps(server_json(info, time.time())))
    elif info.short:
        print(f"{info.short} of {info.chunks} chunks are still short of {replicas} copies "
              f"elsewhere; the drain goes on in the manager (see sdbackup server list)")
    else:
        print(f"{address} is drained: each of its {info.chunks} chunks has {replicas} copies on "
              f"other servers. Retire it with: sdbackup server retire {address}")
    return 0


async def retire(session: Session, args) -> int:
    before = await _find(session, args.address)
    address = before.address
    reply = await session.ask(RetireServer(address=address))
    if getattr(args, "json", False):
        info = reply.servers[0] if reply.servers else before
        print(jsonout.dumps({**server_json(info, time.time()), "forgotten_copies": before.chunks}))
        return 0
    print(f"{address} retired: the manager forgot it and its {before.chunks} copies; each of "
          f"its chunks has its copies on other servers")
    return 0
