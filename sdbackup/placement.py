"""Where chunks go: a pure function of the servers' free space and what they were given.

The primary and replicas of a chunk are distinct live servers, most free space
first. Servers within ``granularity`` bytes of the most free space count as
equal, and among equals the one given the fewest bytes wins; each choice
charges the chunk's size to the chosen servers. So chunks spread over the
cluster instead of piling onto the server that happened to report a few bytes
more (Tahoe-LAFS ticket #3022), as servers sharing a disk or filling at the
same pace always do, while a server with much more room still fills first.
"""

import attrs


class NotEnoughServers(Exception):
    code = "not-enough-servers"


@attrs.define
class ServerLoad:
    address: str
    free_bytes: int
    #: Bytes placed on this server lately: among equals, the least given wins.
    assigned: int = 0


def choose_servers(servers: list[ServerLoad], count: int, granularity: int = 1) -> list[str]:
    """The ``count`` servers with the most free space, then the fewest bytes given, then by address.

    Servers within ``granularity`` bytes of the most free space of those left
    are equals; with the default of one byte, only exact ties are.
    """
    if count < 1:
        raise ValueError("a chunk needs at least one server")
    if len(servers) < count:
        raise NotEnoughServers(
            f"{count} servers are needed and {len(servers)} are alive"
        )
    left = list(servers)
    chosen = []
    while len(chosen) < count:
        most = max(s.free_bytes for s in left)
        equals = [s for s in left if s.free_bytes > most - granularity]
        best = min(equals, key=lambda s: (s.assigned, s.address))
        chosen.append(best.address)
        left.remove(best)
    return chosen


def place_chunks(
    servers: list[ServerLoad], chunks: list[tuple[str, int]], count: int, granularity: int = 1
) -> dict[str, list[str]]:
    """Servers for each ``(chunk_id, size)``, primary first, balancing as it goes.

    The caller's loads are left as they were; it can charge the result itself.
    """
    loads = [ServerLoad(s.address, s.free_bytes, s.assigned) for s in servers]
    by_address = {s.address: s for s in loads}
    placement = {}
    for chunk_id, size in chunks:
        chosen = choose_servers(loads, count, granularity)
        for address in chosen:
            by_address[address].free_bytes -= size
            by_address[address].assigned += size
        # Rotate the primary role among the chosen servers by chunk id, so the
        # work of receiving from the client is shared as well as the space.
        shift = int(chunk_id[:8], 16) % count if count > 1 else 0
        placement[chunk_id] = chosen[shift:] + chosen[:shift]
    return placement
