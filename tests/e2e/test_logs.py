"""``--log-format json``: a twistd process writes twisted.logger's JSON events, one a line."""

import subprocess
import sys
import time
from pathlib import Path

from twisted.logger import eventsFromJSONLogFile, formatEvent

TWISTD = Path(sys.executable).parent / "twistd"
START_TIMEOUT = 30.0


def read_events(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(eventsFromJSONLogFile(f))


def test_manager_logs_json_events_a_log_shipper_can_read(tmp_path):
    log = tmp_path / "manager.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "sdbackup-manager", "--listen", "tcp:0:interface=127.0.0.1",
             "--data", tmp_path / "manager_data", "--log-format", "json"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        listening = []
        while not listening:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no listening event:\n{log.read_text()}"
            time.sleep(0.2)
            listening = [e for e in read_events(log)
                         if e.get("log_format") == "sdbackup-manager listening on port {port}, "
                                                   "catalog in {data}, replication factor {replicas}"]
        event = listening[0]
        assert isinstance(event["port"], int) and event["port"] > 0
        assert event["replicas"] == 2
        assert formatEvent(event).startswith(f"sdbackup-manager listening on port {event['port']}")
        # Every record is a JSON event (each starts with the record separator): no text lines.
        records = [r for r in log.read_text().split("\x1e") if r.strip()]
        assert log.read_text().startswith("\x1e")
        assert len(records) == len(read_events(log)) >= 3
    finally:
        process.terminate()
        process.wait(10)
