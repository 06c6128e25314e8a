"""Placement: distinct servers, emptiest first, and an even spread over a small cluster."""

import collections

import pytest

from sdbackup import hashing
from sdbackup.placement import NotEnoughServers, ServerLoad, choose_servers, place_chunks

MiB = 1024 * 1024


def loads(**free) -> list[ServerLoad]:
    return [ServerLoad(address, space) for address, space in free.items()]


def chunk_ids(n: int) -> list[str]:
    return [hashing.chunk_id(f"chunk {i}".encode()) for i in range(n)]


def test_most_free_space_first():
    servers = loads(a=10 * MiB, b=30 * MiB, c=20 * MiB, d=5 * MiB)
    assert choose_servers(servers, 1) == ["b"]
    assert choose_servers(servers, 3) == ["b", "c", "a"]


def test_ties_are_broken_by_address():
    servers = loads(c=100, a=100, b=100)
    assert choose_servers(servers, 2) == ["a", "b"]
    assert choose_servers(list(reversed(servers)), 3) == ["a", "b", "c"]


def test_chosen_servers_are_distinct():
    servers = loads(a=100, b=100, c=100)
    for count in (1, 2, 3):
        chosen = choose_servers(servers, count)
        assert len(chosen) == count
        assert len(set(chosen)) == count


def test_not_enough_servers():
    with pytest.raises(NotEnoughServers) as raised:
        choose_servers(loads(a=100, b=100), 3)
    assert raised.value.code == "not-enough-servers"
    with pytest.raises(NotEnoughServers):
        choose_servers([], 1)
    with pytest.raises(NotEnoughServers):
        place_chunks(loads(a=100), [(chunk_ids(1)[0], 10)], 2)


def test_count_below_one_is_refused():
    with pytest.raises(ValueError):
        choose_servers(loads(a=100), 0)


def test_each_chunk_gets_distinct_servers_primary_first():
    servers = loads(a=1000 * MiB, b=900 * MiB, c=800 * MiB, d=700 * MiB)
    ids = chunk_ids(200)
    placement = place_chunks(servers, [(c, MiB) for c in ids], 3)
    assert list(placement) == ids
    for holders in placement.values():
        assert len(holders) == 3
        assert len(set(holders)) == 3
        assert set(holders) <= {"a", "b", "c", "d"}


def test_place_chunks_does_not_change_the_callers_loads():
    servers = loads(a=100 * MiB, b=100 * MiB)
    place_chunks(servers, [(c, MiB) for c in chunk_ids(10)], 1)
    assert [s.free_bytes for s in servers] == [100 * MiB, 100 * MiB]


def test_a_batch_fills_the_emptiest_server_first():
    # One server has 50 chunks' worth more free space: a batch must not pile onto it alone.
    servers = loads(a=150 * MiB, b=100 * MiB, c=100 * MiB)
    ids = chunk_ids(80)
    placement = place_chunks(servers, [(c, MiB) for c in ids], 1)
    first = collections.Counter(placement[c][0] for c in ids[:50])
    assert first == {"a": 50}
    rest = collections.Counter(placement[c][0] for c in ids[50:])
    assert sorted(rest.values()) == [10, 10, 10]


def test_even_spread_over_three_equal_servers():
    n = 3000
    ids = chunk_ids(n)
    placement = place_chunks(loads(a=10**12, b=10**12, c=10**12), [(c, 4 * MiB) for c in ids], 2)
    held = collections.Counter(address for holders in placement.values() for address in holders)
    primary = collections.Counter(holders[0] for holders in placement.values())
    assert set(held) == {"a", "b", "c"}
    for address in "abc":
        # each server holds 2/3 of the chunks, to within a handful
        assert abs(held[address] - 2 * n / 3) <= 3, held
        # and receives about a third of them from the client, as primary
        assert abs(primary[address] - n / 3) <= n * 0.05, primary
    assert sum(primary.values()) == n


def test_even_spread_when_count_equals_the_cluster_size():
    ids = chunk_ids(900)
    placement = place_chunks(loads(a=10**9, b=10**9, c=10**9), [(c, MiB) for c in ids], 3)
    assert all(sorted(h) == ["a", "b", "c"] for h in placement.values())
    primary = collections.Counter(h[0] for h in placement.values())
    for address in "abc":
        assert abs(primary[address] - 300) <= 45, primary


def test_spread_with_unequal_chunk_sizes():
    ids = chunk_ids(600)
    sizes = [(c, (i % 7 + 1) * MiB) for i, c in enumerate(ids)]
    placement = place_chunks(loads(a=10**12, b=10**12, c=10**12, d=10**12), sizes, 2)
    stored = collections.Counter()
    size_of = dict(sizes)
    for chunk, holders in placement.items():
        for address in holders:
            stored[address] += size_of[chunk]
    total = 2 * sum(size_of.values())
    for address in "abcd":
        assert abs(stored[address] - total / 4) <= 7 * MiB, stored


def test_servers_with_nearly_equal_free_space_share_the_chunks():
    """Servers on one disk report a few MiB apart: they still get equal shares."""
    gib, mib = 1024**3, 1024**2
    loads = [ServerLoad("tcp:a:1", 80 * gib + 30 * mib), ServerLoad("tcp:b:2", 80 * gib + 10 * mib),
             ServerLoad("tcp:c:3", 80 * gib + 20 * mib)]
    chunks = [(f"{i:064x}", mib) for i in range(30)]
    placement = place_chunks(loads, chunks, 2, granularity=gib)
    held = {s.address: sum(s.address in servers for servers in placement.values()) for s in loads}
    assert held == {"tcp:a:1": 20, "tcp:b:2": 20, "tcp:c:3": 20}


def test_bytes_already_assigned_count_against_a_server():
    gib = 1024**3
    loads = [ServerLoad("tcp:a:1", 10 * gib, assigned=0), ServerLoad("tcp:b:2", 10 * gib, assigned=5),
             ServerLoad("tcp:c:3", 10 * gib, assigned=0)]
    assert choose_servers(loads, 2, granularity=gib) == ["tcp:a:1", "tcp:c:3"]


def test_a_server_with_a_step_more_free_space_still_comes_first():
    gib = 1024**3
    loads = [ServerLoad("tcp:a:1", 10 * gib), ServerLoad("tcp:b:2", 12 * gib, assigned=10**6)]
    assert choose_servers(loads, 1, granularity=gib) == ["tcp:b:2"]


def test_one_byte_more_free_space_comes_first():
    servers = [ServerLoad("a", 99), ServerLoad("b", 100)]
    assert choose_servers(servers, 1) == ["b"]
    assert place_chunks(servers, [("00" * 32, 10)], 1) == {"00" * 32: ["b"]}


def test_a_load_given_no_assigned_bytes_has_none():
    assert choose_servers([ServerLoad("a", 100, assigned=1), ServerLoad("b", 100)], 1) == ["b"]
    assert choose_servers([ServerLoad("b", 100), ServerLoad("a", 100, assigned=0)], 1) == ["a"]


def test_the_primary_rotates_between_two_servers_by_chunk_id():
    servers = [ServerLoad("a", 10**12), ServerLoad("b", 10**12)]
    ids = ["ff" * 32, "fe" * 32, "01" * 32, "02" * 32]
    placement = place_chunks(servers, [(chunk_id, 1) for chunk_id in ids], 2)
    assert {chain[0] for chain in placement.values()} == {"a", "b"}
    assert all(sorted(chain) == ["a", "b"] for chain in placement.values())
