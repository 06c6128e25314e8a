"""The dashboard's pictures as inline SVG: pure functions of numbers and times.

Every text that comes from the cluster (an address, a host name) is escaped here.
"""

from html import escape

GREEN, AMBER, RED, GREY, BLUE = "#2e9e5b", "#e0a020", "#d64040", "#c8ccd0", "#3b7dd8"
#: A disk's free space, and its space used by other things than this cluster's chunks.
LIGHT_GREY, DARK_GREY = "#e4e7ea", "#8d949c"


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(label)}">{body}</svg>')


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def capacity_bar(cluster_bytes: int, free_bytes: int, total_bytes: int = 0, width: int = 240,
                 height: int = 14) -> str:
    """A server's disk: this cluster's chunks, the rest of the used space, and the free space.

    Without the disk's size (``total_bytes`` 0) the bar is the cluster's chunks and the free
    space only."""
    total = max(total_bytes, cluster_bytes + free_bytes)
    used = total - free_bytes

    def share(part: int) -> int:
        w = 0 if total <= 0 else round(width * part / total)
        return 1 if part and w == 0 else w  # some bytes: visible

    cluster_w = share(cluster_bytes)
    used_w = max(cluster_w, share(used))
    if total_bytes:
        told = (f"{human_bytes(used)} used of {human_bytes(total_bytes)}, "
                f"{human_bytes(cluster_bytes)} of them this cluster's chunks; "
                f"{human_bytes(free_bytes)} free")
    else:
        told = f"{human_bytes(cluster_bytes)} of this cluster's chunks, {human_bytes(free_bytes)} free"
    body = (f'<rect width="{width}" height="{height}" fill="{LIGHT_GREY}"/>'
            f'<rect class="other" width="{used_w}" height="{height}" fill="{DARK_GREY}"/>'
            f'<rect class="used" width="{cluster_w}" height="{height}" fill="{BLUE}"/>'
            f"<title>{told}</title>")
    return _svg(width, height, body, "capacity")


def progress_bar(done: int, total: int, width: int = 240, height: int = 4) -> str:
    """A thin bar: ``done`` of ``total``."""
    done_w = 0 if total <= 0 else round(width * min(done, total) / total)
    body = (f'<rect width="{width}" height="{height}" fill="{LIGHT_GREY}"/>'
            f'<rect class="done" width="{done_w}" height="{height}" fill="{GREEN}"/>')
    return _svg(width, height, body, f"{done} of {total}")


def health_chart(points: list[tuple[float, int, int, int]], now: float, span: float,
                 width: int = 600, height: int = 120) -> str:
    """Stacked areas of (time, healthy, under-replicated, missing) over the last ``span`` s."""
    shown = [p for p in points if p[0] >= now - span]
    body = [f'<rect width="{width}" height="{height}" fill="#f6f7f8"/>']
    if shown:
        top = max(max(h + u + m for _, h, u, m in shown), 1)

        def x(t):
            return round(width * (t - (now - span)) / span, 1)

        def y(v):
            return round(height - height * v / top, 1)

        # Missing at the bottom (the worst is seen first), then under-replicated, then healthy.
        layers = [(RED, "missing", lambda p: 0, lambda p: p[3]),
                  (AMBER, "under-replicated", lambda p: p[3], lambda p: p[3] + p[2]),
                  (GREEN, "healthy", lambda p: p[3] + p[2], lambda p: p[3] + p[2] + p[1])]
        for colour, name, low, high in layers:
            upper = [f"{x(p[0])},{y(high(p))}" for p in shown]
            lower = [f"{x(p[0])},{y(low(p))}" for p in reversed(shown)]
            if len(shown) == 1:  # one sample: a thin band rather than nothing
                upper.append(f"{width},{y(high(shown[0]))}")
                lower.insert(0, f"{width},{y(low(shown[0]))}")
            body.append(f'<polygon class="{name}" fill="{colour}" '
                        f'points="{" ".join(upper + lower)}"/>')
        body.append(f'<text x="4" y="12" font-size="11">{top} chunks · last {human_age(span)}</text>')
    else:
        body.append(f'<text x="4" y="{height // 2}" font-size="12">no samples yet</text>')
    return _svg(width, height, "".join(body), "replication health over time")


def throughput_chart(points: list[tuple[float, float]], now: float, span: float,
                     width: int = 600, height: int = 60) -> str:
    """Bytes a second stored in the cluster (every copy), as a line over the last ``span`` s."""
    shown = [p for p in points if p[0] >= now - span]
    body = [f'<rect width="{width}" height="{height}" fill="#f6f7f8"/>']
    top = max([rate for _, rate in shown] + [1.0])
    if shown:
        coords = " ".join(f"{round(width * (t - (now - span)) / span, 1)},"
                          f"{round(height - (height - 14) * rate / top, 1)}" for t, rate in shown)
        body.append(f'<polyline fill="none" stroke="{BLUE}" stroke-width="2" points="{coords}"/>')
    body.append(f'<text x="4" y="12" font-size="11">peak {human_bytes(top)}/s · '
                f'last {human_age(span)}</text>')
    return _svg(width, height, "".join(body), "backup throughput")


def snapshot_timeline(hosts: dict[str, list[float]], now: float, span: float, stale_after: float,
                      width: int = 600, row: int = 22) -> str:
    """One row per host: a dot per snapshot over the last ``span`` seconds, the host name and
    the time since its last backup, in red when older than ``stale_after``."""
    label_w = 200
    plot_w = width - label_w
    height = max(1, len(hosts)) * row + 4
    body = []
    for index, host in enumerate(sorted(hosts)):
        times = hosts[host]
        y = index * row + row // 2 + 2
        age = now - max(times) if times else float("inf")
        stale = age > stale_after
        colour = RED if stale else "#222"
        body.append(f'<text class="host{" stale" if stale else ""}" x="2" y="{y + 4}" '
                    f'font-size="12" fill="{colour}">{escape(host)} · {human_age(age)} ago</text>')
        body.append(f'<line x1="{label_w}" y1="{y}" x2="{width}" y2="{y}" stroke="{GREY}"/>')
        for t in times:
            if t >= now - span:
                cx = round(label_w + plot_w * (t - (now - span)) / span, 1)
                body.append(f'<circle cx="{cx}" cy="{y}" r="4" fill="{BLUE}"/>')
    if not hosts:
        body.append('<text x="2" y="14" font-size="12">no snapshots yet</text>')
    return _svg(width, height, "".join(body), "snapshots per host")
