"""``/api/status``: the dashboard's data as JSON, shaped by pure functions.

The page shows addresses, counts, sizes, host names and times; never a file name
or a path (a snapshot's paths are left out on purpose).
"""

import itertools

import attrs

from sdbackup.services.history import Event, Sample
from sdbackup.web import svg

#: The charts cover the history kept, at most 6 hours and at least a minute; the snapshot
#: timeline the oldest snapshot kept, at most a week and at least ten minutes.
CHART_SPAN = 6 * 3600.0
MIN_CHART_SPAN = 60.0
TIMELINE_SPAN = 7 * 86400.0
MIN_TIMELINE_SPAN = 600.0
#: A host whose last backup is older than this is highlighted.
DEFAULT_STALE_AFTER = 26 * 3600.0


@attrs.frozen
class LiveView:
    """What the manager knows of a connected server now."""

    address: str
    free_bytes: int
    chunks: int
    last_seen: float
    #: The disk's size (0: the server did not tell).
    total_bytes: int = 0
    #: Its scrub pass under way: chunks checked of how many (0 of 0: none runs).
    scrub_done: int = 0
    scrub_total: int = 0


def rates(samples: list[Sample], counter: str) -> list[tuple[float, float]]:
    """(time, growth a second of the samples' ``counter`` since the previous sample), one point
    per later sample; none across a restart (the counter went back)."""
    points = []
    for before, after in itertools.pairwise(samples):
        elapsed = after.time - before.time
        grown = getattr(after, counter) - getattr(before, counter)
        if elapsed > 0 and grown >= 0:
            points.append((after.time, grown / elapsed))
    return points


def throughput(samples: list[Sample]) -> list[tuple[float, float]]:
    """(time, bytes a second stored since the previous sample), one point per later sample."""
    return rates(samples, "stored_bytes")


def disk(free: int, total: int, cluster: int) -> dict:
    """A server's space: ``used`` (total - free, None when the size is unknown), of which
    ``cluster_bytes`` (per the catalog) are this cluster's chunks."""
    used = max(0, total - free) if total else None
    return {"free_bytes": free, "total_bytes": total, "used_bytes": used, "cluster_bytes": cluster}


def span(now: float, oldest: float | None, shortest: float, longest: float) -> float:
    """The time a chart covers: back to ``oldest`` (and a little more), within bounds."""
    if oldest is None:
        return shortest
    return min(longest, max(shortest, (now - oldest) * 1.05))


def servers(now: float, live: list[LiveView], sample: Sample | None,
            sizes: dict[str, int] | None = None) -> list[dict]:
    """Every server the catalog knows or that is connected, alive ones with fresh figures.

    ``sizes``: the last disk size told by servers not connected now (the catalog keeps none).
    """
    sizes = sizes or {}
    known = {address: (last_seen, free, chunks, sizes.get(address, 0))
             for address, last_seen, free, chunks in (sample.servers if sample else [])}
    for view in live:
        known[view.address] = (view.last_seen, view.free_bytes, view.chunks, view.total_bytes)
    alive = {view.address: view for view in live}
    rows = []
    for address in sorted(known):
        last_seen, free, chunks, total = known[address]
        usage = sample.usage.get(address) if sample else None
        space = disk(free, total, usage.bytes if usage else 0)
        view = alive.get(address)
        scrubbing = view is not None and view.scrub_total > 0
        rows.append({
            "address": address,
            "state": "alive" if view is not None else "dead",
            **space,
            "chunks": chunks,
            "last_heartbeat": last_seen,
            "heartbeat_age": round(max(0.0, now - last_seen), 1),
            "scrub": {"done": view.scrub_done, "total": view.scrub_total,
                      "bar": svg.progress_bar(view.scrub_done, view.scrub_total)}
            if scrubbing else None,
            "bar": svg.capacity_bar(space["cluster_bytes"], free, total),
        })
    return rows


def status(now: float, state: str, replicas: int, live: list[LiveView], samples: list[Sample],
           events: list[Event], repair_running: bool,
           stale_after: float = DEFAULT_STALE_AFTER, repaired_bytes: int = 0,
           sizes: dict[str, int] | None = None) -> dict:
    """Everything the page shows, as JSON-ready values.

    ``repaired_bytes``: copied by repair since the manager started, now; ``sizes``: the
    last disk size of servers not connected now."""
    sample = samples[-1] if samples else None
    stored_rates = throughput(samples)
    repair_rates = rates(samples, "repaired_bytes")
    hosts = sample.snapshot_times if sample else {}
    chart_span = span(now, samples[0].time if samples else None, MIN_CHART_SPAN, CHART_SPAN)
    oldest = min((min(times) for times in hosts.values() if times), default=None)
    timeline_span = span(now, oldest, MIN_TIMELINE_SPAN, TIMELINE_SPAN)
    return {
        "time": now,
        "state": state,
        "replicas": replicas,
        "servers": servers(now, live, sample, sizes),
        "servers_alive": len(live),
        "health": None if sample is None else {
            "sampled_at": sample.time,
            "chunks": sample.chunks,
            "healthy": sample.healthy,
            "under_replicated": sample.under_replicated,
            "missing": sample.missing,
        },
        "snapshots": {
            "count": sample.snapshots if sample else 0,
            "stale_after": stale_after,
            "hosts": [{"host": host, "last": max(times), "age": round(now - max(times), 1),
                       "stale": now - max(times) > stale_after}
                      for host, times in sorted(hosts.items()) if times],
        },
        "repair": {
            "running": repair_running,
            "copied_bytes": repaired_bytes,
            "bytes_per_second": repair_rates[-1][1] if repair_rates else 0.0,
            # What is left: the chunks short of copies in the newest sample.
            "chunks_left": sample.under_replicated if sample else None,
        },
        "throughput": {"bytes_per_second": stored_rates[-1][1] if stored_rates else 0.0},
        "events": [{"time": e.time, "kind": e.kind, "text": e.text} for e in reversed(events)],
        "charts": {
            "health": svg.health_chart(
                [(s.time, s.healthy, s.under_replicated, s.missing) for s in samples], now,
                chart_span),
            "throughput": svg.throughput_chart(stored_rates, now, chart_span),
            "snapshots": svg.snapshot_timeline(hosts, now, timeline_span, stale_after),
        },
    }
