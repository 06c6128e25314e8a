"""The two hashes a chunk has, kept apart on purpose.

* ``chunk_id`` names a chunk: the catalog and deduplication use it.
* ``checksum`` covers the bytes a server receives and holds: every hop
  verifies it.

Today both are BLAKE3 of the same plaintext bytes, so they are equal (and the
client hashes each chunk once). When
client-side encryption arrives the id becomes a keyed hash of the plaintext and
the checksum covers the ciphertext; nothing on the wire has to change.

BLAKE3 rather than SHA-256: measured here at about 4,300 MiB/s against
780 MiB/s on 1 MiB blocks, and every byte is hashed at the client, the primary
and each replica.
"""

import re

import blake3

DIGEST_SIZE = 32
HEX_DIGEST_LENGTH = 2 * DIGEST_SIZE


def checksum(data: bytes) -> str:
    """The checksum of bytes as a server holds them."""
    return blake3.blake3(data).hexdigest()


def chunk_id(data: bytes) -> str:
    """The content address of a chunk of plaintext."""
    return blake3.blake3(data).hexdigest()


def object_id(kind: str, data: bytes) -> str:
    """The id of a tree, chunk list or snapshot object: BLAKE3 in key-derivation mode with
    a context per kind, so no object id can equal a file chunk's id or another kind's."""
    return blake3.blake3(data, derive_key_context=f"sdbackup 2026-11 {kind} object id").hexdigest()


def file_hasher() -> "blake3.blake3":
    """An incremental hasher for a whole file's contents."""
    return blake3.blake3()


_HEX_DIGEST = re.compile(f"[0-9a-f]{{{HEX_DIGEST_LENGTH}}}")


def is_hex_digest(value: str) -> bool:
    """True when ``value`` looks like one of our hex digests (lowercase, full length)."""
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


def are_hex_digests(values) -> bool:
    """``is_hex_digest`` of every one of ``values`` (a list or a dict's keys), in a few passes
    in C: a message may hold thousands of ids, and one regex match per id was most of the
    time spent checking it."""
    if not (set(map(type, values)) <= {str} and set(map(len, values)) <= {HEX_DIGEST_LENGTH}):
        return False
    digits = "".join(values)
    try:
        # fromhex skips whitespace (then fewer bytes come out) and takes capitals.
        return len(bytes.fromhex(digits)) * 2 == len(digits) and digits == digits.lower()
    except ValueError:
        return False
