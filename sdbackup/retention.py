"""Which snapshots a ``forget`` policy keeps, and why: restic's rules, as pure functions.

Snapshots are grouped (by host and paths by default, see ``group_key``), then each group
is walked newest first. ``--keep-last N`` keeps the N newest; ``--keep-hourly/daily/
weekly/monthly/yearly N`` keep the newest snapshot of each of the N newest hours, days,
ISO weeks, months or years (in local time) that hold one; a bucket counts once however
many snapshots fall in it, and while a count is left the group's oldest snapshot is kept
too (the longest history the counts allow). ``--keep-within 1y2m3d4h`` keeps every
snapshot made within that long before the group's newest (not before now: forgetting
later does not lose more). ``--keep-tag a,b`` keeps every snapshot carrying all of those
tags. A snapshot may be kept for several reasons; one kept for none is removed. A count
of -1 keeps every bucket.
"""

import datetime
import re
from collections.abc import Iterable, Sequence

from attrs import field, frozen

#: What ``--group-by`` may name.
GROUP_FIELDS = ("host", "paths", "tags")
_DURATION = re.compile(r"(\d+)([ymdh])")


class PolicyError(ValueError):
    """A policy or a duration that cannot be used."""


@frozen
class Duration:
    """A calendar duration, as restic's ``--keep-within`` takes it: ``1y2m3d4h``."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> "Duration":
        text = text.strip()
        parts, position = {}, 0
        for match in _DURATION.finditer(text):
            if match.start() != position or match.group(2) in parts:
                break
            parts[match.group(2)] = int(match.group(1))
            position = match.end()
        if not text or position != len(text):
            raise PolicyError(f"{text!r} is not a duration: give numbers of y, m, d and h, as "
                              "in 1y2m3d4h")
        return cls(parts.get("y", 0), parts.get("m", 0), parts.get("d", 0), parts.get("h", 0))

    @property
    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def cutoff(self, latest: float) -> float:
        """``latest`` (seconds) less this duration: years, months and days on the local
        calendar (a day past a month's end runs into the next month, as Go's ``AddDate``),
        then hours of elapsed time."""
        moment = _local(latest)
        months = moment.year * 12 + moment.month - 1 - self.years * 12 - self.months
        year, month = divmod(months, 12)
        try:
            day = moment.replace(year=year, month=month + 1, day=1) + datetime.timedelta(
                days=moment.day - 1 - self.days)
            return day.timestamp() - self.hours * 3600
        except (ValueError, OverflowError):  # before year 1: everything is within
            return float("-inf")

    def __str__(self) -> str:
        return "".join(f"{n}{unit}" for n, unit in ((self.years, "y"), (self.months, "m"),
                                                    (self.days, "d"), (self.hours, "h")) if n)


@frozen
class Policy:
    """What to keep; counts are 0 (not used), N, or -1 (every bucket)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration = field(factory=Duration)
    #: Each entry is a list of tags a snapshot must all carry to be kept.
    tags: tuple = field(default=(), converter=lambda ts: tuple(tuple(t) for t in ts))

    def __attrs_post_init__(self):
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            if getattr(self, name) < -1:
                raise PolicyError(f"--keep-{name} {getattr(self, name)}: give a count, or -1 "
                                  "for all")

    def __str__(self) -> str:
        """The policy in words, as restic says it: ``keep 2 latest, 7 daily snapshots``."""
        counts = [f"{'all' if n == -1 else n} {what}" for n, what in (
            (self.last, "latest"), (self.hourly, "hourly"), (self.daily, "daily"),
            (self.weekly, "weekly"), (self.monthly, "monthly"), (self.yearly, "yearly")) if n]
        parts = [f"{', '.join(counts)} snapshots"] if counts else []
        if self.tags:
            parts.append("all snapshots with tags "
                         + " or ".join(f"[{' '.join(t)}]" for t in self.tags))
        if not self.within.zero:
            parts.append(f"all snapshots within {self.within} of the newest")
        return "keep " + " and ".join(parts)

    @property
    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.tags or not self.within.zero)


@frozen
class Item:
    """What the policy reads of a snapshot."""

    snapshot_id: str
    time: float
    host: str = ""
    paths: tuple = field(default=(), converter=tuple)
    tags: tuple = field(default=(), converter=tuple)


@frozen
class Decision:
    """A group's snapshots, newest first: those kept (with their reasons) and those removed."""

    key: tuple
    keep: list
    reasons: dict
    remove: list


def _local(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds)


def _buckets(policy: Policy):
    """``(count, bucket of a local time and position, reason)`` of each counted rule."""
    return [
        (policy.last, lambda t, nr: nr, "last snapshot"),
        (policy.hourly, lambda t, nr: (t.year, t.month, t.day, t.hour), "hourly snapshot"),
        (policy.daily, lambda t, nr: (t.year, t.month, t.day), "daily snapshot"),
        (policy.weekly, lambda t, nr: t.isocalendar()[:2], "weekly snapshot"),
        (policy.monthly, lambda t, nr: (t.year, t.month), "monthly snapshot"),
        (policy.yearly, lambda t, nr: t.year, "yearly snapshot"),
    ]


def newest_first(items: Iterable[Item]) -> list[Item]:
    return sorted(items, key=lambda item: (-item.time, item.snapshot_id))


def apply_policy(items: Iterable[Item], policy: Policy, now: float
                 ) -> tuple[list[Item], dict[str, list[str]], list[Item]]:
    """``(kept, reasons by snapshot id, removed)`` of one group, newest first. An empty policy
    keeps everything ("policy is empty"); the caller refuses to run one."""
    ordered = newest_first(items)
    if policy.empty:
        return ordered, {i.snapshot_id: ["policy is empty"] for i in ordered}, []
    if not ordered:
        return [], {}, []
    # The newest snapshot made before now: one dated in the future does not move the window.
    past = [i.time for i in ordered if i.time < now]
    since = None
    if not policy.within.zero:
        since = policy.within.cutoff(max(past)) if past else float("-inf")
    counters = [[count, bucket, None, reason] for count, bucket, reason in _buckets(policy)]
    keep, reasons, remove = [], {}, []
    for nr, item in enumerate(ordered):
        why = []
        held = set(item.tags)
        for wanted in policy.tags:
            if held.issuperset(wanted):
                why.append(f"has tags [{' '.join(wanted)}]")
        when = _local(item.time)
        if since is not None and item.time > since:
            why.append(f"within {policy.within}")
        for counter in counters:
            count, bucket, last, reason = counter
            if count > 0 or count == -1:
                value = bucket(when, nr)
                if value != last or nr == len(ordered) - 1:
                    counter[2] = value
                    if count > 0:
                        counter[0] -= 1
                    why.append(reason)
        if why:
            keep.append(item)
            reasons[item.snapshot_id] = why
        else:
            remove.append(item)
    return keep, reasons, remove


def parse_group_by(text: str) -> tuple[str, ...]:
    """``host,paths`` -> ``("host", "paths")``; an empty text groups everything together."""
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    for name in fields:
        if name not in GROUP_FIELDS:
            raise PolicyError(f"--group-by {text!r}: {name!r} is not one of "
                              f"{', '.join(GROUP_FIELDS)}")
    return fields


def group_key(item: Item, group_by: Sequence[str]) -> tuple:
    """The group of ``item``: its values of the fields named (paths and tags sorted)."""
    values = {"host": item.host, "paths": tuple(sorted(item.paths)),
              "tags": tuple(sorted(item.tags))}
    return tuple((name, values[name]) for name in GROUP_FIELDS if name in group_by)


def matches(item: Item, hosts: Sequence[str] = (), paths: Sequence[str] = (),
            tags: Sequence[Sequence[str]] = ()) -> bool:
    """Whether ``--host``, ``--path`` and ``--tag`` select ``item``: one of the hosts; every
    path given among its paths; all of the tags of one ``--tag`` entry."""
    if hosts and item.host not in hosts:
        return False
    if paths and not set(paths).issubset(item.paths):
        return False
    return not tags or any(set(wanted).issubset(item.tags) for wanted in tags)


def decide(items: Iterable[Item], policy: Policy, group_by: Sequence[str], now: float
           ) -> list[Decision]:
    """The policy applied to each group of ``items`` on its own, groups in a stable order."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(group_key(item, group_by), []).append(item)
    decisions = []
    for key in sorted(groups):
        keep, reasons, remove = apply_policy(groups[key], policy, now)
        decisions.append(Decision(key, keep, reasons, remove))
    return decisions
