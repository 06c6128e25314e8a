"""Placement tickets: what a server accepts under one, and the manager's keys over time."""

import pytest
from twisted.python import usage

from sdbackup import hashing, manager_tap, tickets
from sdbackup.protocols.messages import StoreChunks, Ticket, decode, encode_frame

A, B, C = "tcp:localhost:5001", "tcp:localhost:5002", "tcp:localhost:5003"
ONE, TWO, OTHER = (hashing.chunk_id(d) for d in (b"one", b"two", b"other"))
NOW = 1_700_000_000.0


@pytest.fixture
def keyring() -> tickets.Keyring:
    return tickets.Keyring(lifetime=600, interval=3600)


def keys_of(keyring, now=NOW) -> dict:
    return {key.key_id: key for key in keyring.valid(now)}


def refusal(ticket, keyring, now=NOW, chunk_ids=(ONE,), address=A, forward_to=(B, C)):
    return tickets.refusal(ticket, keys_of(keyring, now), now, list(chunk_ids), address,
                           list(forward_to))


def test_a_ticket_allows_its_chunks_along_its_chain(keyring):
    ticket = keyring.issue([ONE, TWO], [A, B, C], NOW)
    assert refusal(ticket, keyring) is None
    assert refusal(ticket, keyring, chunk_ids=[ONE, TWO]) is None
    # Each server of the chain, forwarding to the rest of it, or cutting it short.
    assert refusal(ticket, keyring, address=B, forward_to=[C]) is None
    assert refusal(ticket, keyring, address=C, forward_to=[]) is None
    assert refusal(ticket, keyring, address=A, forward_to=[B]) is None
    # A ticket survives the wire as it was signed.
    sent = StoreChunks(chunks=[], forward_to=[B, C], ticket=ticket)
    assert refusal(decode(encode_frame(sent)).ticket, keyring) is None


@pytest.mark.parametrize(("change", "code", "why"), [
    ({"mac": "0" * 64}, "bad-ticket", "signature"),
    ({"chain": [A, "tcp:evil:1"]}, "bad-ticket", "signature"),
    ({"chunk_ids": [ONE, OTHER]}, "bad-ticket", "signature"),
    ({"expires": 2_000_000_000}, "bad-ticket", "signature"),
    ({"key_id": "unknown"}, "ticket-expired", "key"),
])
def test_a_changed_ticket_is_refused(keyring, change, code, why):
    ticket = keyring.issue([ONE], [A, B], NOW)
    fields = {**{name: getattr(ticket, name) for name in ("chunk_ids", "chain", "expires",
                                                            "key_id", "mac")}, **change}
    refused = refusal(Ticket(**fields), keyring, forward_to=[B])
    assert refused is not None and refused[0] == code and why in refused[1]


def test_a_ticket_of_another_manager_is_refused(keyring):
    other = tickets.Keyring(lifetime=600, interval=3600)
    forged = tickets.sign(tickets.TicketKey(keyring.current(NOW).key_id, "ab" * 32), [ONE], [A],
                          int(NOW) + 600)
    assert refusal(forged, keyring, forward_to=[]) == ("bad-ticket",
                                                       "the ticket's signature is not the manager's")
    assert refusal(other.issue([ONE], [A], NOW), keyring, forward_to=[])[0] == "ticket-expired"


def test_no_ticket_is_refused(keyring):
    assert refusal(None, keyring)[0] == "bad-ticket"


def test_other_chunks_other_servers_and_other_hops_are_refused(keyring):
    ticket = keyring.issue([ONE, TWO], [A, B], NOW)
    assert refusal(ticket, keyring, chunk_ids=[ONE, OTHER], forward_to=[B]) == (
        "bad-ticket", "the ticket does not name these chunks")
    assert refusal(ticket, keyring, address=C, forward_to=[]) == (
        "bad-ticket", f"the ticket does not name this server ({C})")
    for forward_to in ([C], [B, C], ["unix:/tmp/socket"], [A]):
        assert refusal(ticket, keyring, forward_to=forward_to) == (
            "bad-ticket", "forward_to is not the rest of the ticket's chain")


def test_an_expired_ticket_is_refused(keyring):
    ticket = keyring.issue([ONE], [A], NOW)
    assert refusal(ticket, keyring, now=NOW + 600, forward_to=[]) is None
    refused = refusal(ticket, keyring, now=NOW + 602, forward_to=[])
    assert refused[0] == "ticket-expired" and "expired" in refused[1]


def test_an_old_key_stays_valid_until_its_tickets_expire(keyring):
    first = keyring.current(NOW)
    old = keyring.issue([ONE], [A], NOW + 3599)  # signed with the first key, just before rotation
    assert keyring.rotate(NOW + 3600)
    assert keyring.current(NOW + 3600) != first
    assert [k.key_id for k in keyring.valid(NOW + 3600)] == [
        first.key_id, keyring.current(NOW + 3600).key_id]
    assert refusal(old, keyring, now=NOW + 4100, forward_to=[]) is None
    # Once every ticket it signed has expired, the old key is dropped.
    assert keyring.rotate(NOW + 3600 + 602)
    assert first not in keyring.valid(NOW + 3600 + 602)
    assert not keyring.rotate(NOW + 3600 + 700)


def test_keys_are_random_and_of_full_strength():
    first, second = tickets.new_key(), tickets.new_key()
    assert first.key_id != second.key_id and first.secret != second.secret
    assert len(bytes.fromhex(first.secret)) == 32
    assert first.secret not in repr(first)


def test_the_manager_options_bound_tickets_and_keys():
    options = manager_tap.Options()
    options.parseOptions(["--ticket-lifetime", "120", "--ticket-key-interval", "3600"])
    assert (options["ticket-lifetime"], options["ticket-key-interval"]) == (120.0, 3600.0)
    for argv, why in ((["--ticket-lifetime", "0"], "--ticket-lifetime must be positive"),
                      (["--ticket-lifetime", "900", "--ticket-key-interval", "600"],
                       "--ticket-key-interval must be at least --ticket-lifetime")):
        with pytest.raises(usage.UsageError, match=why):
            manager_tap.Options().parseOptions(argv)


def test_an_expired_ticket_says_how_long_ago():
    keyring = tickets.Keyring(lifetime=600, interval=3600)
    ticket = keyring.issue([ONE], [A], NOW)
    assert refusal(ticket, keyring, now=NOW + 645.4, forward_to=[]) == (
        "ticket-expired", "the ticket expired 45 s ago")


def test_by_default_tickets_last_ten_minutes_and_keys_sign_for_ten_hours():
    # The defaults README.rst gives for --ticket-lifetime and --ticket-key-interval.
    options = manager_tap.Options()
    options.parseOptions([])
    assert (options["ticket-lifetime"], options["ticket-key-interval"]) == (600.0, 36000.0)
    keyring = tickets.Keyring()
    ticket = keyring.issue([ONE], [A], NOW)
    assert ticket.expires == NOW + 600
    assert refusal(ticket, keyring, now=NOW + 600, forward_to=[]) is None
    assert refusal(ticket, keyring, now=NOW + 600.5, forward_to=[])[0] == "ticket-expired"
    first = keyring.current(NOW)
    assert keyring.current(NOW + 35999.5) == first
    assert keyring.current(NOW + 36000) != first


def test_a_ticket_signed_just_before_a_rotation_is_accepted_until_it_expires():
    # Times with fractions: a key first used half a second in, a ticket signed with it a
    # moment before it stops signing; its expiry is rounded up to the next second.
    keyring = tickets.Keyring(lifetime=600, interval=3600)
    first = keyring.current(NOW + 0.5)
    ticket = keyring.issue([ONE], [A], NOW + 3600.2)
    assert ticket.key_id == first.key_id and ticket.expires == NOW + 4201
    assert keyring.current(NOW + 3600.5) != first
    for now in (NOW + 4200.8, NOW + 4201):
        assert refusal(ticket, keyring, now=now, forward_to=[]) is None
    assert first in keyring.valid(NOW + 4201)
    refused = refusal(ticket, keyring, now=NOW + 4202, forward_to=[])
    assert refused[0] == "ticket-expired" and "key this server does not hold" in refused[1]
    assert keyring.valid(NOW + 4202) == [keyring.current(NOW + 4202)]


def test_keys_rotate_one_after_another_keeping_those_still_needed():
    keyring = tickets.Keyring(lifetime=600, interval=3600)
    made = [keyring.current(NOW + hour * 3600) for hour in range(4)]
    assert len({key.key_id for key in made}) == 4
    # A quarter of an hour after the last rotation, only the newest key is needed.
    assert keyring.valid(NOW + 3 * 3600 + 900) == [made[3]]
    # Left unused for hours, the keyring makes one new key; the last one signed until now.
    assert keyring.rotate(NOW + 10 * 3600)
    newest = keyring.current(NOW + 10 * 3600)
    assert newest not in made
    assert keyring.valid(NOW + 10 * 3600) == [made[3], newest]
    assert keyring.valid(NOW + 10 * 3600 + 602) == [newest]
