"""Where chunks go: a pure function of the servers' free space.

The primary and replicas of a chunk are distinct live servers, most free space
first. Each choice charges the chunk's size against the chosen servers, so a
batch of chunks spreads over the cluster instead of piling onto the server that
was emptiest when the batch began (Tahoe-LAFS ticket #3022).
"""

import attrs


class NotEnoughServers(Exception):
    code = "not-enough-servers"


@attrs.define
class ServerLoad:
    address: str
    free_bytes: int


def choose_servers(servers: list[ServerLoad], count: int) -> list[str]:
    """The ``count`` servers with the most free space, ties broken by address."""
    if count < 1:
        raise ValueError("a chunk needs at least one server")
    if len(servers) < count:
        raise NotEnoughServers(
            f"{count} servers are needed and {len(servers)} are alive"
        )
    ranked = sorted(servers, key=lambda s: (-s.free_bytes, s.address))
    return [s.address for s in ranked[:count]]


def place_chunks(
    servers: list[ServerLoad], chunks: list[tuple[str, int]], count: int
) -> dict[str, list[str]]:
    """Servers for each ``(chunk_id, size)``, primary first, balancing as it goes."""
    loads = [ServerLoad(s.address, s.free_bytes) for s in servers]
    by_address = {s.address: s for s in loads}
    placement = {}
    for chunk_id, size in chunks:
        chosen = choose_servers(loads, count)
        for address in chosen:
            by_address[address].free_bytes -= size
        # Rotate the primary role among the chosen servers by chunk id, so the
        # work of receiving from the client is shared as well as the space.
        shift = int(chunk_id[:8], 16) % count if count > 1 else 0
        placement[chunk_id] = chosen[shift:] + chosen[:shift]
    return placement
