"""The dashboard's pure parts: listen rules, the status JSON and its pictures."""

import json

import pytest
from twisted.python import usage

from sdbackup import manager_tap, pki
from sdbackup.services.history import Event, Sample, ServerUsage
from sdbackup.web import status, svg
from sdbackup.web.endpoints import ListenRefused, dashboard_endpoint, is_loopback, loopback_by_default

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("given", "used"), [
    ("tcp:8080", "tcp:8080:interface=127.0.0.1"),
    ("tcp6:8080", "tcp6:8080:interface=\\:\\:1"),
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"),
    ("unix:/run/sdbackup.sock", "unix:/run/sdbackup.sock"),
])
def test_endpoints_listen_on_loopback_unless_they_name_an_interface(given, used):
    assert loopback_by_default(given) == used
    assert is_loopback(used)


@pytest.mark.parametrize("endpoint", ["tcp:8080:interface=0.0.0.0", "tcp:8080:interface=192.0.2.4",
                                      "tcp6:8080:interface=\\:\\:"])
def test_the_dashboard_refuses_other_addresses_without_tls_and_a_password(endpoint):
    with pytest.raises(ListenRefused, match=r"missing: TLS .* and --web-password-file"):
        dashboard_endpoint(endpoint, None, tls=False)
    with pytest.raises(ListenRefused, match="missing: TLS"):
        dashboard_endpoint(endpoint, "/etc/password-file", tls=False)
    with pytest.raises(ListenRefused, match="missing: --web-password-file"):
        dashboard_endpoint(endpoint, None, tls=True)
    assert dashboard_endpoint(endpoint, "/etc/password-file", tls=True) == endpoint
    with pytest.raises(usage.UsageError, match="not a loopback address"):
        manager_tap.Options().parseOptions(["--web", endpoint])


def test_loopback_dashboards_need_neither():
    assert dashboard_endpoint("tcp:8080", None, tls=False) == "tcp:8080:interface=127.0.0.1"


def tls_options(folder) -> list[str]:
    """``--tls-*`` options of a manager certificate of a new CA in ``folder``."""
    ca = pki.create_ca()
    pki.save_ca(str(folder), ca)
    cert, key = pki.save_certificate(str(folder), "manager", pki.issue(ca, "manager", "manager"))
    return ["--tls-ca", pki.ca_paths(str(folder))[0], "--tls-cert", cert, "--tls-key", key]


def test_with_tls_and_a_password_the_dashboard_may_listen_beyond_loopback(tmp_path):
    password = tmp_path / "password"
    password.write_text("secret\n")
    options = manager_tap.Options()
    options.parseOptions([*tls_options(tmp_path), "--web", "tcp:8443:interface=0.0.0.0",
                          "--web-password-file", str(password)])

    assert options["web"] == "tcp:8443:interface=0.0.0.0"


def test_metrics_beyond_loopback_follow_the_rule_of_the_process_port(tmp_path):
    with pytest.raises(usage.UsageError, match="--metrics: refusing to listen"):
        manager_tap.Options().parseOptions(["--metrics", "tcp:9100:interface=0.0.0.0"])
    options = manager_tap.Options()
    options.parseOptions(["--insecure", "--metrics", "tcp:9100:interface=0.0.0.0"])
    options = manager_tap.Options()
    options.parseOptions([*tls_options(tmp_path), "--metrics", "tcp:9100"])
    assert options["metrics"] == "tcp:9100"


def test_a_password_file_without_a_dashboard_is_refused(tmp_path):
    with pytest.raises(usage.UsageError, match="needs --web"):
        manager_tap.Options().parseOptions(["--web-password-file", str(tmp_path / "p")])


def sample(t: float, chunks=10, under=0, missing=0, stored=0, **fields) -> Sample:
    return Sample(t, chunks, under, missing, servers_alive=2, snapshots=2, stored_bytes=stored,
                  **fields)


def test_status_lists_live_and_dead_servers_with_usage():
    last = sample(NOW - 5, chunks=10, under=2, missing=1,
                  usage={"tcp:a:1": ServerUsage(7, 7000), "tcp:b:2": ServerUsage(5, 5000)},
                  servers=[("tcp:a:1", NOW - 6, 100, 7), ("tcp:b:2", NOW - 60, 200, 5)],
                  snapshot_times={"laptop": [NOW - 7200, NOW - 3600]})
    live = [status.LiveView("tcp:a:1", free_bytes=90, chunks=8, last_seen=NOW - 1)]

    shaped = status.status(NOW, "ready", 2, live, [last], [Event(NOW - 2, "server-dead", "x")],
                           repair_running=True, stale_after=1800)

    assert [(s["address"], s["state"], s["free_bytes"], s["chunks"], s["cluster_bytes"])
            for s in shaped["servers"]] == [("tcp:a:1", "alive", 90, 8, 7000),
                                            ("tcp:b:2", "dead", 200, 5, 5000)]
    assert shaped["servers"][0]["heartbeat_age"] == 1.0
    assert shaped["health"] == {"sampled_at": NOW - 5, "chunks": 10, "healthy": 7,
                                "under_replicated": 2, "missing": 1}
    assert shaped["snapshots"]["hosts"] == [
        {"host": "laptop", "last": NOW - 3600, "age": 3600.0, "stale": True}]
    assert shaped["repair"] == {"running": True, "copied_bytes": 0, "bytes_per_second": 0.0,
                                "chunks_left": 2}
    assert shaped["events"] == [{"time": NOW - 2, "kind": "server-dead", "text": "x"}]
    json.dumps(shaped)  # all of it travels as JSON


def test_status_shows_each_disk_used_free_and_the_cluster_share():
    last = sample(NOW - 5, usage={"tcp:a:1": ServerUsage(7, 7000), "tcp:b:2": ServerUsage(5, 5000),
                                  "tcp:c:3": ServerUsage(1, 900)},
                  servers=[("tcp:a:1", NOW - 6, 100, 7), ("tcp:b:2", NOW - 60, 2000, 5),
                           ("tcp:c:3", NOW - 90, 100, 1)])
    live = [status.LiveView("tcp:a:1", free_bytes=3000, chunks=8, last_seen=NOW - 1,
                            total_bytes=100_000)]

    # b died: its size is the one it told before; c never told one (an older server).
    shaped = status.status(NOW, "ready", 2, live, [last], [], repair_running=False,
                           sizes={"tcp:b:2": 50_000})

    space = {s["address"]: (s["total_bytes"], s["used_bytes"], s["free_bytes"], s["cluster_bytes"])
             for s in shaped["servers"]}
    assert space == {"tcp:a:1": (100_000, 97_000, 3000, 7000),
                     "tcp:b:2": (50_000, 48_000, 2000, 5000),
                     "tcp:c:3": (0, None, 100, 900)}
    bar = shaped["servers"][0]["bar"]
    assert 'class="used" width="17"' in bar and 'class="other" width="233"' in bar
    assert "94.7 KiB used of 97.7 KiB, 6.8 KiB of them this cluster" in bar


def test_status_shows_the_scrub_under_way_on_each_live_server():
    live = [status.LiveView("tcp:a:1", 100, 8, NOW - 1, 1000, scrub_done=1234, scrub_total=5000),
            status.LiveView("tcp:b:2", 100, 8, NOW - 1, 1000)]

    shaped = status.status(NOW, "ready", 2, live, [], [], repair_running=False)

    scrubbing, idle = shaped["servers"]
    assert (scrubbing["scrub"]["done"], scrubbing["scrub"]["total"]) == (1234, 5000)
    assert 'class="done" width="59"' in scrubbing["scrub"]["bar"]  # 1234/5000 of 240
    assert idle["scrub"] is None


def test_repair_progress_is_the_bytes_copied_and_their_rate():
    samples = [sample(NOW - 10, under=9, repaired_bytes=1000),
               sample(NOW, under=4, repaired_bytes=6000)]

    shaped = status.status(NOW, "ready", 2, [], samples, [], repair_running=True,
                           repaired_bytes=6500)

    assert shaped["repair"] == {"running": True, "copied_bytes": 6500, "bytes_per_second": 500.0,
                                "chunks_left": 4}


def test_status_before_the_first_sample():
    shaped = status.status(NOW, "starting", 2, [], [], [], repair_running=False)

    assert shaped["health"] is None
    assert shaped["servers"] == []
    assert shaped["snapshots"]["count"] == 0
    assert "no samples yet" in shaped["charts"]["health"]


def test_throughput_is_the_rate_between_samples():
    samples = [sample(NOW, stored=0), sample(NOW + 10, stored=10_000),
               sample(NOW + 20, stored=10_000)]

    assert status.throughput(samples) == [(NOW + 10, 1000.0), (NOW + 20, 0.0)]
    # A restarted manager counts from 0 again: no negative rate.
    assert status.throughput([sample(NOW, stored=500), sample(NOW + 1, stored=0)]) == []


def test_host_names_are_escaped_in_pictures():
    picture = svg.snapshot_timeline({"<script>x</script>": [NOW - 10]}, NOW, 3600, 86400)

    assert "<script>" not in picture
    assert "&lt;script&gt;x&lt;/script&gt;" in picture


def test_a_stale_host_is_drawn_in_red():
    picture = svg.snapshot_timeline({"old": [NOW - 7200], "new": [NOW - 60]}, NOW, 86400, 3600)

    assert 'class="host stale" x="2" y="' in picture and f'fill="{svg.RED}">old' in picture
    assert 'class="host" x="2"' in picture and ">new · 60 s ago<" in picture


def test_health_chart_stacks_missing_under_and_healthy():
    picture = svg.health_chart([(NOW - 60, 8, 1, 1), (NOW, 10, 0, 0)], NOW, 120)

    for layer in ("missing", "under-replicated", "healthy"):
        assert f'class="{layer}"' in picture
    assert "10 chunks" in picture  # the scale's top


def test_capacity_bar_shows_the_cluster_share_of_the_space():
    assert 'class="used" width="60"' in svg.capacity_bar(250, 750, width=240)
    assert 'class="used" width="1"' in svg.capacity_bar(1, 10**12, width=240)  # never invisible
    assert 'class="used" width="0"' in svg.capacity_bar(0, 0, width=240)


def test_capacity_bar_of_a_disk_of_known_size_shows_used_and_free():
    # 1000 bytes: 600 used, 150 of them this cluster's, 400 free.
    bar = svg.capacity_bar(150, 400, 1000, width=240)

    assert 'class="used" width="36"' in bar and 'class="other" width="144"' in bar
    # A size smaller than what is known to be there (a stale figure) never shrinks the bar.
    assert 'class="used" width="120"' in svg.capacity_bar(500, 500, 10, width=240)


def test_charts_cover_the_history_kept_within_bounds():
    assert status.span(NOW, None, 60, 3600) == 60
    assert status.span(NOW, NOW - 10, 60, 3600) == 60
    assert status.span(NOW, NOW - 1000, 60, 3600) == 1050
    assert status.span(NOW, NOW - 10**6, 60, 3600) == 3600
