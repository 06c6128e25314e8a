"""Who may send what: every request and notice, and the roles allowed to send it.

The one table of the cluster's authorisation. ``MessageProtocol`` checks every
incoming message against it before any handler runs; a message sent by a role
not listed is refused ("forbidden"). Replies are not in it: they only resolve
requests this end made. A message type missing from the table is refused to
everyone.

Under TLS a peer's role is the one its certificate carries. Without TLS (loopback
only) there are no identities: the Hello's role is taken as is, and a client is
trusted as an admin (any local process could claim any role anyway).
"""

from sdbackup.protocols.messages import CheckRequest, Message

MANAGER = frozenset({"manager"})
SERVER = frozenset({"server"})
#: Clients back up, restore and list; an admin may do all that clients do.
CLIENTS = frozenset({"client", "admin"})
ADMIN = frozenset({"admin"})

#: Message (or variant, see ``request_kind``) -> the roles that may send it.
SENDERS: dict[str, frozenset] = {
    # Clients to the manager: placing, committing, listing, reading the index.
    "PlacementRequest": CLIENTS,
    "HasChunks": CLIENTS,
    "CommitSnapshot": CLIENTS,
    "ListSnapshots": CLIENTS,
    "Locate": CLIENTS,
    "StatusRequest": CLIENTS,
    "CheckRequest": CLIENTS,
    "CheckRequest --read-data": ADMIN,  # every server re-reads every chunk: costly
    "ForgetSnapshots": ADMIN,  # unlists snapshots for every client
    "ReplaceSnapshot": CLIENTS,  # tag: same content under new tags (restic lets writers tag)
    "ListServers": CLIENTS,
    "DrainServer": ADMIN,  # moves every chunk off a server
    "RetireServer": ADMIN,  # forgets a server and its copies
    "PruneRequest": ADMIN,  # deletes unreachable data on every server
    "PruneStatusRequest": ADMIN,
    "ListKeys": CLIENTS,  # encrypted repositories' key objects (wrapped keys)
    "CommitKey": CLIENTS,
    "RemoveKey": CLIENTS,  # never a repository's last key
    # Storing: a client to a primary, a primary to its replica (the chain of forward_to), each
    # under a ticket of the manager's placement (sdbackup.tickets).
    "StoreChunk": CLIENTS | SERVER,
    "StoreChunks": CLIENTS | SERVER,
    # Reading chunks and objects: restores, and the manager's indexer and check.
    "FetchChunk": CLIENTS | MANAGER,
    "FetchChunks": CLIENTS | MANAGER,
    # Only the manager orders replication, verification and repair.
    "ReplicateChunk": MANAGER,
    "VerifyChunks": MANAGER,
    "SyncNotices": MANAGER,
    "TicketKeys": MANAGER,  # the keys placement tickets are signed with
    "DeleteSnapshots": MANAGER,
    "DeleteChunks": MANAGER,
    # Only servers register, heartbeat and report what they hold.
    "RegisterServer": SERVER,
    "Heartbeat": SERVER,
    "ChunkInventory": SERVER,
    "ChunksAdded": SERVER,
    "ChunksCorrupt": SERVER,
}


def request_kind(msg: Message) -> str:
    """The table's name for ``msg``: its type, or a costlier variant of it."""
    if isinstance(msg, CheckRequest) and msg.read_data:
        return "CheckRequest --read-data"
    return type(msg).__name__


def refusal(role: str | None, msg: Message, authenticated: bool) -> str | None:
    """Why a peer of ``role`` may not send ``msg``, or None when it may."""
    if msg.IS_REPLY:
        return None
    kind = request_kind(msg)
    allowed = SENDERS.get(kind, frozenset())
    effective = {role}
    if not authenticated and role == "client":
        effective.add("admin")
    if effective & allowed:
        return None
    if not allowed:
        return f"{kind} is not accepted from any peer"
    return f"a {role} may not send {kind} (only {', '.join(sorted(allowed))})"
