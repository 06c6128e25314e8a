"""The manager reading objects from storage servers, verified.

The manager fetches snapshot objects (to index them) and tree and chunk list
objects (to walk the DAG in ``check``) over each server's registration link,
the way it sends ReplicateChunk. It believes no copy it has not checked: the
bytes must match their checksum, hash to the id under the kind the server
reports, and open as an envelope of that kind. A server with a missing, bad or
lying copy makes the read move on to the next holder.
"""

from twisted.internet.threads import deferToThread

from sdbackup import hashing, objects
from sdbackup.protocols.messages import FetchChunk

#: Seconds the manager waits for one object.
FETCH_TIMEOUT = 60.0
#: Payloads up to this size are hashed on the reactor; larger ones in a thread.
HASH_INLINE = 256 * 1024


class ObjectUnavailable(Exception):
    """No live holder gave a copy (none is live, or none answered)."""

    code = "object-unavailable"


class ObjectInvalid(ObjectUnavailable):
    """Copies came, and none of them is the object its id names."""

    code = "bad-object"


def problem_with(object_id: str, kinds: tuple, kind: str, checksum: str, payload: bytes) -> str | None:
    """Why these bytes are not the object ``object_id`` of one of ``kinds``; None when they are."""
    if kind not in kinds:
        return f"it is a {kind} chunk, not a {' or '.join(kinds)} object"
    if hashing.checksum(payload) != checksum:
        return "its bytes do not match their checksum"
    if hashing.object_id(kind, payload) != object_id:
        return "its bytes do not hash to its id"
    try:
        objects.open_envelope(payload, kind)
    except objects.ObjectFormatError as e:
        return str(e)
    return None


async def read_object(live: dict, holders: list[str], object_id: str, kinds: tuple,
                      clock) -> tuple[str, bytes]:
    """The kind and verified bytes of ``object_id`` from the first live holder with a good copy.

    ``live`` maps addresses to live servers (with a ``connection``). Raises
    ``ObjectInvalid`` when every live holder answered with a wrong copy,
    ``ObjectUnavailable`` when some gave no copy at all.
    """
    reasons, unanswered = [], 0
    for address in holders:
        server = live.get(address)
        if server is None:
            continue
        try:
            reply = await server.connection.request(FetchChunk(chunk_id=object_id), FETCH_TIMEOUT,
                                                    clock)
        except Exception as e:
            reasons.append(f"{address}: {getattr(e, 'reason', None) or e}")
            unanswered += 1
            continue
        args = (object_id, kinds, reply.kind, reply.checksum, reply.payload)
        problem = (problem_with(*args) if len(reply.payload) <= HASH_INLINE
                   else await deferToThread(problem_with, *args))
        if problem is None:
            return reply.kind, reply.payload
        reasons.append(f"{address}: {problem}")
    if not reasons:
        raise ObjectUnavailable(f"no live server holds {object_id[:16]}")
    error = ObjectUnavailable if unanswered else ObjectInvalid
    raise error(f"no good copy of {object_id[:16]}: " + "; ".join(reasons))
