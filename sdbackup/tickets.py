"""Placement tickets: the manager's signed word that these chunks go along this chain of servers.

HDFS block tokens are the model. The manager makes a random secret at start
and gives it to each storage server in the reply to its registration (over
mutual TLS in a TLS cluster). Each placement comes with tickets: the chunk
ids placed together, the chain of servers (primary first) and an expiry,
with an HMAC-SHA256 of them under that secret. A server stores a chunk, and
forwards it, only under a valid, unexpired ticket that names the chunk and
this server, and forwards it only to the next server the ticket names (a
sender may cut the chain short, never change it): a store's ``forward_to``
can never send bytes to an endpoint the manager did not choose. The manager
places only on live registered servers, so its signature vouches for the next
hop.

A key signs for ``interval`` seconds; then a new one does, and the old one
stays valid until the last ticket it signed has expired (``Keyring``).

Pure functions and records: no I/O, and the time is always given.
"""

import json
import math
import secrets

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from sdbackup.protocols.messages import Ticket, TicketKey

#: Seconds a ticket is valid: a batch is stored long before (an option of the manager).
DEFAULT_LIFETIME = 600.0
#: Seconds a key signs before the next one does (HDFS: 10 hours).
DEFAULT_KEY_INTERVAL = 10 * 3600.0
KEY_BYTES = 32

#: Error codes of a refused store. "ticket-expired": an honest client asks for a new
#: placement (the ticket outlived its time, or its key is unknown here: the manager restarted).
BAD_TICKET = "bad-ticket"
TICKET_EXPIRED = "ticket-expired"


def new_key() -> TicketKey:
    return TicketKey(key_id=secrets.token_hex(8), secret=secrets.token_bytes(KEY_BYTES).hex())


def _signed_bytes(key_id: str, expires: int, chain: list, chunk_ids: list) -> bytes:
    # (Ids and addresses are validated printable ASCII: their JSON is one exact text.)
    return json.dumps(["sdbackup-ticket-1", key_id, expires, chain, chunk_ids],
                      separators=(",", ":")).encode()


def _mac(secret: str, data: bytes) -> hmac.HMAC:
    mac = hmac.HMAC(bytes.fromhex(secret), hashes.SHA256())
    mac.update(data)
    return mac


def sign(key: TicketKey, chunk_ids: list[str], chain: list[str], expires: int) -> Ticket:
    data = _signed_bytes(key.key_id, expires, chain, chunk_ids)
    return Ticket(chunk_ids=list(chunk_ids), chain=list(chain), expires=expires,
                  key_id=key.key_id, mac=_mac(key.secret, data).finalize().hex())


def refusal(ticket: Ticket | None, keys: dict[str, TicketKey], now: float, chunk_ids: list[str],
            address: str, forward_to: list[str]) -> tuple[str, str] | None:
    """Why the server at ``address`` may not store ``chunk_ids`` and forward them along
    ``forward_to`` under ``ticket``, as ``(code, reason)``; None when it may."""
    if ticket is None:
        return BAD_TICKET, "a store needs a ticket from the manager's placement"
    key = keys.get(ticket.key_id)
    if key is None:
        return TICKET_EXPIRED, ("the ticket is signed with a key this server does not hold "
                                "(the manager restarted, or this server has not registered yet)")
    data = _signed_bytes(ticket.key_id, ticket.expires, ticket.chain, ticket.chunk_ids)
    try:
        _mac(key.secret, data).verify(bytes.fromhex(ticket.mac))
    except InvalidSignature:
        return BAD_TICKET, "the ticket's signature is not the manager's"
    if now > ticket.expires:
        return TICKET_EXPIRED, f"the ticket expired {now - ticket.expires:.0f} s ago"
    named = set(ticket.chunk_ids)
    if not all(chunk_id in named for chunk_id in chunk_ids):
        return BAD_TICKET, "the ticket does not name these chunks"
    if address not in ticket.chain:
        return BAD_TICKET, f"the ticket does not name this server ({address})"
    # The rest of the chain, or the start of it (the sender may cut it short: fewer copies,
    # which repair makes up), never another server.
    following = ticket.chain[ticket.chain.index(address) + 1 :]
    if list(forward_to) != following[: len(forward_to)]:
        return BAD_TICKET, "forward_to is not the rest of the ticket's chain"
    return None


@attrs.define
class Keyring:
    """The manager's keys: the newest signs; each older one is kept until the last ticket it
    signed has expired."""

    lifetime: float = DEFAULT_LIFETIME
    interval: float = DEFAULT_KEY_INTERVAL
    #: ``(key, signing since)``, newest last; an older key is dropped ``lifetime`` after the
    #: next one began to sign.
    keys: list = attrs.field(factory=list)

    def issue(self, chunk_ids: list[str], chain: list[str], now: float) -> Ticket:
        return sign(self.current(now), chunk_ids, chain, math.ceil(now + self.lifetime))

    def current(self, now: float) -> TicketKey:
        self.rotate(now)
        return self.keys[-1][0]

    def rotate(self, now: float) -> bool:
        """Make a new key if the newest one has signed for ``interval``, and forget the keys
        whose tickets have all expired; True when the keys changed."""
        before = [key for key, _ in self.keys]
        if not self.keys or now >= self.keys[-1][1] + self.interval:
            self.keys.append((new_key(), now))
        older = [(key, since) for (key, since), (_, replaced)
                 in zip(self.keys[:-1], self.keys[1:], strict=True)
                 if now <= replaced + self.lifetime + 1]
        self.keys = [*older, self.keys[-1]]
        return [key for key, _ in self.keys] != before

    def valid(self, now: float) -> list[TicketKey]:
        """Every key a server must know now, to accept every ticket not expired."""
        self.rotate(now)
        return [key for key, _ in self.keys]
