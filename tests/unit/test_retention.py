"""``forget``'s policies (sdbackup.retention) on synthetic snapshot times, against restic's rules
and the examples of restic's documentation."""

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbackup import retention
from sdbackup.client import cli
from sdbackup.retention import Duration, Item, Policy, PolicyError, apply_policy, decide

NOW = datetime.datetime(2026, 11, 27, 12, 0).timestamp()


def at(*when) -> float:
    """Seconds of a local time."""
    return datetime.datetime(*when).timestamp()


def items_at(times, host="h", paths=("/p",), tags=()) -> list[Item]:
    return [Item(f"{n:064x}", t, host, paths, tags) for n, t in enumerate(times)]


def kept_ids(items, policy, now=NOW):
    keep, _, _ = apply_policy(items, policy, now)
    return {i.snapshot_id for i in keep}


def test_keep_last_keeps_the_newest():
    items = items_at([at(2026, 1, d) for d in range(1, 11)])
    keep, reasons, remove = apply_policy(items, Policy(last=3), NOW)
    assert [i.time for i in keep] == [at(2026, 1, 10), at(2026, 1, 9), at(2026, 1, 8)]
    assert all(reasons[i.snapshot_id] == ["last snapshot"] for i in keep)
    assert len(remove) == 7 and all(i.time < at(2026, 1, 8) for i in remove)


def test_a_bucket_counts_once_and_keeps_its_newest():
    # Three a day for four days: keep-daily 2 keeps the newest of each of the two newest days.
    items = items_at([at(2026, 3, d, h) for d in (1, 2, 3, 4) for h in (8, 12, 20)])
    keep, reasons, _ = apply_policy(items, Policy(daily=2), NOW)
    assert [i.time for i in keep] == [at(2026, 3, 4, 20), at(2026, 3, 3, 20)]
    assert {tuple(r) for r in reasons.values()} == {("daily snapshot",)}


def test_the_oldest_is_kept_while_a_count_is_left():
    # restic: "if there are not enough snapshots to keep one for each duration related
    # --keep-* option, the oldest snapshot in the group is kept additionally".
    items = items_at([at(2026, 3, 1, h) for h in (8, 12, 20)])
    keep, reasons, remove = apply_policy(items, Policy(daily=5), NOW)
    assert [i.time for i in keep] == [at(2026, 3, 1, 20), at(2026, 3, 1, 8)]
    assert [i.time for i in remove] == [at(2026, 3, 1, 12)]
    assert list(reasons.values()) == [["daily snapshot"], ["daily snapshot"]]


def test_several_reasons_for_one_snapshot():
    items = items_at([at(2026, 5, 31, 23), at(2026, 5, 30, 23), at(2026, 4, 30, 23)],
                     tags=("daily",))
    _, reasons, _ = apply_policy(items, Policy(last=1, daily=2, monthly=2, yearly=1,
                                               tags=[("daily",)]), NOW)
    assert reasons[f"{0:064x}"] == ["has tags [daily]", "last snapshot", "daily snapshot",
                                    "monthly snapshot", "yearly snapshot"]
    assert reasons[f"{1:064x}"] == ["has tags [daily]", "daily snapshot"]
    assert reasons[f"{2:064x}"] == ["has tags [daily]", "monthly snapshot"]


def test_weeks_are_iso_weeks():
    # Sunday 2026-03-08 and Monday 2026-03-09 are in two ISO weeks; Monday to Sunday in one.
    items = items_at([at(2026, 3, 9, 10), at(2026, 3, 8, 10), at(2026, 3, 2, 10)])
    keep, _, remove = apply_policy(items, Policy(weekly=2), NOW)
    assert [i.time for i in keep] == [at(2026, 3, 9, 10), at(2026, 3, 8, 10)]
    assert [i.time for i in remove] == [at(2026, 3, 2, 10)]


def test_hourly_buckets():
    items = items_at([at(2026, 3, 9, 10, m) for m in (5, 35)] + [at(2026, 3, 9, 9, 50)])
    keep, _, _ = apply_policy(items, Policy(hourly=2), NOW)
    assert [i.time for i in keep] == [at(2026, 3, 9, 10, 35), at(2026, 3, 9, 9, 50)]


def test_keep_within_counts_back_from_the_newest_snapshot():
    items = items_at([at(2026, 6, 10, 12), at(2026, 6, 9, 13), at(2026, 6, 8, 13),
                      at(2026, 6, 8, 11)])
    keep, reasons, remove = apply_policy(items, Policy(within=Duration.parse("2d")), NOW)
    assert [i.time for i in keep] == [at(2026, 6, 10, 12), at(2026, 6, 9, 13), at(2026, 6, 8, 13)]
    assert all(r == ["within 2d"] for r in reasons.values())
    assert [i.time for i in remove] == [at(2026, 6, 8, 11)]


def test_keep_within_ignores_snapshots_dated_in_the_future():
    items = items_at([at(2030, 1, 1), at(2026, 6, 10), at(2026, 6, 1)])
    keep, _, _ = apply_policy(items, Policy(within=Duration.parse("3d")), at(2026, 7, 1))
    assert [i.time for i in keep] == [at(2030, 1, 1), at(2026, 6, 10)]


def test_keep_within_months_run_as_go_adddate():
    # 31 March less one month is "31 February", which is 3 March: 2 March is out.
    items = items_at([at(2026, 3, 31, 12), at(2026, 3, 3, 13), at(2026, 3, 2, 13)])
    keep, _, _ = apply_policy(items, Policy(within=Duration.parse("1m")), NOW)
    assert [i.time for i in keep] == [at(2026, 3, 31, 12), at(2026, 3, 3, 13)]


def test_keep_tag_needs_every_tag_of_an_entry():
    items = [Item("a" * 64, at(2026, 1, 3), tags=("x", "y")), Item("b" * 64, at(2026, 1, 2),
             tags=("x",)), Item("c" * 64, at(2026, 1, 1), tags=("z",))]
    keep, reasons, _ = apply_policy(items, Policy(tags=[("x", "y"), ("z",)]), NOW)
    assert [i.snapshot_id[0] for i in keep] == ["a", "c"]
    assert reasons["a" * 64] == ["has tags [x y]"] and reasons["c" * 64] == ["has tags [z]"]


def test_minus_one_keeps_every_bucket():
    items = items_at([at(2026, 1, d, h) for d in range(1, 6) for h in (1, 2)])
    keep, _, _ = apply_policy(items, Policy(daily=-1), NOW)
    assert [i.time for i in keep] == [at(2026, 1, d, 2) for d in range(5, 0, -1)] + [at(2026, 1, 1, 1)]


def test_an_empty_policy_keeps_everything():
    items = items_at([at(2026, 1, d) for d in range(1, 4)])
    keep, reasons, remove = apply_policy(items, Policy(), NOW)
    assert len(keep) == 3 and not remove
    assert set(map(tuple, reasons.values())) == {("policy is empty",)}
    assert Policy().empty and not Policy(within=Duration(hours=1)).empty


def test_restic_documentation_hundred_years_of_dailies():
    """restic's docs: daily snapshots for 100 years, ``--keep-daily 7 --keep-weekly 5
    --keep-monthly 12 --keep-yearly 75`` keeps the 7 newest days, the last snapshot of 5 weeks
    (some already daily ones), of 12 months and of 75 years; everything else goes."""
    start = datetime.datetime(1926, 1, 1, 12)
    days = [start + datetime.timedelta(days=n) for n in range(36525)]
    items = items_at([d.timestamp() for d in days])
    keep, reasons, remove = apply_policy(
        items, Policy(daily=7, weekly=5, monthly=12, yearly=75), at(2030, 1, 1))
    times = {i.snapshot_id: datetime.datetime.fromtimestamp(i.time) for i in keep}
    by_reason = {r: sorted(times[s] for s, rs in reasons.items() if r in rs)
                 for r in ("daily snapshot", "weekly snapshot", "monthly snapshot", "yearly snapshot")}
    newest = days[-1]
    assert by_reason["daily snapshot"] == days[-7:]
    assert len(by_reason["weekly snapshot"]) == 5
    assert all(d.weekday() == 6 for d in by_reason["weekly snapshot"][:-1])  # Sundays
    assert len(by_reason["monthly snapshot"]) == 12
    assert all((d + datetime.timedelta(days=1)).day == 1 for d in by_reason["monthly snapshot"][:-1])
    assert len(by_reason["yearly snapshot"]) == 75
    assert [d.year for d in by_reason["yearly snapshot"]] == list(range(newest.year - 74, newest.year + 1))
    assert all((d.month, d.day) == (12, 31) for d in by_reason["yearly snapshot"][:-1])
    assert len(keep) + len(remove) == len(items)
    assert days[0] not in times.values()  # every count was used up: the oldest goes


def test_groups_by_host_and_paths_by_default():
    items = [*items_at([at(2026, 1, 1), at(2026, 1, 2)], host="a"),
             Item("e" * 64, at(2026, 1, 1), "b", ("/p",)), Item("f" * 64, at(2026, 1, 3), "a", ("/q",))]
    decisions = decide(items, Policy(last=1), ("host", "paths"), NOW)
    assert [d.key for d in decisions] == [(("host", "a"), ("paths", ("/p",))),
                                         (("host", "a"), ("paths", ("/q",))),
                                         (("host", "b"), ("paths", ("/p",)))]
    assert [len(d.keep) for d in decisions] == [1, 1, 1]
    assert [len(d.remove) for d in decisions] == [1, 0, 0]
    (one,) = decide(items, Policy(last=1), (), NOW)
    assert [i.snapshot_id for i in one.keep] == ["f" * 64] and len(one.remove) == 3


def test_parse_group_by_and_durations():
    assert retention.parse_group_by("host,paths,tags") == ("host", "paths", "tags")
    assert retention.parse_group_by("") == ()
    with pytest.raises(PolicyError):
        retention.parse_group_by("host,colour")
    assert Duration.parse("1y2m3d4h") == Duration(1, 2, 3, 4)
    assert str(Duration.parse("2d")) == "2d" and str(Duration.parse("1y4h")) == "1y4h"
    for bad in ("", "2", "d", "1w", "2d2d", "-1d", "1d 2h"):
        with pytest.raises(PolicyError):
            Duration.parse(bad)
    with pytest.raises(PolicyError):
        Policy(last=-2)


def test_policy_in_words():
    assert str(Policy(last=1)) == "keep 1 latest snapshots"
    assert (str(Policy(daily=7, weekly=-1, within=Duration(days=2), tags=[("a", "b")]))
            == "keep 7 daily, all weekly snapshots and all snapshots with tags [a b] and all "
               "snapshots within 2d of the newest")


@pytest.mark.parametrize("argv, error", [
    ([], "refusing to forget every snapshot"),
    (["--host", "h"], "refusing to forget every snapshot"),
    (["abcd", "--keep-last", "1"], "not both"),
    (["--keep-within", "2w"], "is not a duration"),
    (["--keep-daily", "-3"], "give a count"),
    (["--keep-last", "1", "--group-by", "host,os"], "'os' is not one of"),
])
def test_forget_usage_errors(argv, error, capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exited:
        cli.check_forget(parser, parser.parse_args(["forget", *argv]))
    assert exited.value.code == 2
    assert error in capsys.readouterr().err


def test_forget_options_make_the_policy():
    parser = cli.build_parser()
    args = parser.parse_args(["forget", "--keep-daily", "7", "--keep-within", "1y2m",
                              "--keep-tag", "a,b", "--keep-tag", "c", "--group-by", "host,tags"])
    cli.check_forget(parser, args)
    assert args.policy == Policy(daily=7, within=Duration(years=1, months=2),
                                 tags=[("a", "b"), ("c",)])
    assert args.group_by == ("host", "tags")


def test_filters():
    item = Item("a" * 64, 0.0, "h", ("/x", "/y"), ("t", "u"))
    assert retention.matches(item)
    assert retention.matches(item, hosts=["g", "h"], paths=["/x"], tags=[("v",), ("t", "u")])
    assert not retention.matches(item, hosts=["g"])
    assert not retention.matches(item, paths=["/x", "/z"])
    assert not retention.matches(item, tags=[("t", "v")])


# --- properties -----------------------------------------------------------------------

times = st.lists(st.integers(min_value=int(at(2020, 1, 1)), max_value=int(at(2027, 1, 1))),
                 min_size=0, max_size=40)
counts = st.integers(min_value=-1, max_value=6)
policies = st.builds(Policy, last=counts, hourly=counts, daily=counts, weekly=counts,
                     monthly=counts, yearly=counts,
                     within=st.builds(Duration, st.integers(0, 1), st.integers(0, 3),
                                      st.integers(0, 10), st.integers(0, 30)))


@settings(max_examples=200, deadline=None)
@given(times, policies)
def test_every_snapshot_is_kept_or_removed_once(seconds, policy):
    items = items_at(seconds)
    keep, reasons, remove = apply_policy(items, policy, NOW)
    assert sorted(i.snapshot_id for i in keep + remove) == sorted(i.snapshot_id for i in items)
    assert set(reasons) == {i.snapshot_id for i in keep} and all(reasons.values())
    assert keep == retention.newest_first(keep) and remove == retention.newest_first(remove)
    if items and not policy.empty:
        assert retention.newest_first(items)[0] in keep or policy.last == policy.hourly == \
            policy.daily == policy.weekly == policy.monthly == policy.yearly == 0


@settings(max_examples=200, deadline=None)
@given(times, st.integers(min_value=1, max_value=8),
       st.sampled_from(["hourly", "daily", "weekly", "monthly", "yearly"]))
def test_a_count_keeps_the_newest_of_the_newest_buckets(seconds, count, kind):
    items = items_at(seconds)
    bucket = {"hourly": lambda d: (d.year, d.month, d.day, d.hour),
              "daily": lambda d: (d.year, d.month, d.day), "weekly": lambda d: d.isocalendar()[:2],
              "monthly": lambda d: (d.year, d.month), "yearly": lambda d: d.year}[kind]
    ordered = retention.newest_first(items)
    expected, seen = [], []
    for item in ordered:
        b = bucket(datetime.datetime.fromtimestamp(item.time))
        if b not in seen:
            seen.append(b)
            if len(seen) <= count:
                expected.append(item.snapshot_id)
    if ordered and len(seen) < count and ordered[-1].snapshot_id not in expected:
        expected.append(ordered[-1].snapshot_id)  # a count left: the oldest too
    keep, reasons, _ = apply_policy(items, Policy(**{kind: count}), NOW)
    assert [i.snapshot_id for i in keep] == expected
    assert all(r == [f"{kind} snapshot"] for r in reasons.values())


@settings(max_examples=150, deadline=None)
@given(times, policies, st.sampled_from(["last", "hourly", "daily", "weekly", "monthly",
                                         "yearly"]))
def test_a_larger_count_keeps_no_fewer(seconds, policy, name):
    items = items_at(seconds)
    if getattr(policy, name) == -1:
        return
    fields = {f: getattr(policy, f) for f in ("last", "hourly", "daily", "weekly", "monthly",
                                              "yearly", "within")}
    more = Policy(**{**fields, name: getattr(policy, name) + 1})
    assert kept_ids(items, policy) <= kept_ids(items, more) or policy.empty
