"""The daemons' option checks: a value that makes no sense stops the start with a clear message."""

import pytest
from twisted.python import usage

from sdbackup import manager_tap, server_tap


@pytest.mark.parametrize("replicas", ["0", "17"])
def test_the_manager_refuses_a_replication_factor_it_cannot_keep(replicas, tmp_path):
    with pytest.raises(usage.UsageError, match="--replicas must be between 1 and 16"):
        manager_tap.Options().parseOptions(["--data", str(tmp_path), "--replicas", replicas])


@pytest.mark.parametrize("option", ["--dead-after", "--repair-interval", "--repair-rate"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_manager_times_and_rates_must_be_positive(option, value, tmp_path):
    with pytest.raises(usage.UsageError, match=f"{option} must be positive"):
        manager_tap.Options().parseOptions(["--data", str(tmp_path), option, value])


@pytest.mark.parametrize("option", ["--safe-mode-timeout", "--safe-mode-settle"])
def test_safe_mode_waits_cannot_be_negative(option, tmp_path):
    with pytest.raises(usage.UsageError, match=f"{option} cannot be negative"):
        manager_tap.Options().parseOptions(["--data", str(tmp_path), option, "-1"])


@pytest.mark.parametrize("option", ["--heartbeat", "--scrub-interval", "--scrub-rate"])
@pytest.mark.parametrize("value", ["0", "-2.5"])
def test_server_times_and_rates_must_be_positive(option, value, tmp_path):
    with pytest.raises(usage.UsageError, match=f"{option} must be positive"):
        server_tap.Options().parseOptions(["--data", str(tmp_path), option, value])


def test_sensible_options_are_taken(tmp_path):
    options = manager_tap.Options()
    options.parseOptions(["--data", str(tmp_path), "--replicas", "3", "--dead-after", "2.5"])
    assert (options["replicas"], options["dead-after"]) == (3, 2.5)
    server = server_tap.Options()
    server.parseOptions(["--listen", "tcp:5002"])
    assert server["data"] == "data_5002"


@pytest.mark.parametrize("tap", [manager_tap, server_tap])
def test_an_unknown_log_format_is_refused(tap, tmp_path):
    with pytest.raises(usage.UsageError, match="--log-format must be one of text, json"):
        tap.Options().parseOptions(["--data", str(tmp_path), "--log-format", "xml"])
