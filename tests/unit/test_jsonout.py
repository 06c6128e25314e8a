"""The pure formatting of ``--json``: restic's shapes, RFC 3339 times, lossless names."""

import datetime
import io
import json
import stat

from sdbackup import hashing, retention
from sdbackup.client import jsonout
from sdbackup.client.backup import BackupResult
from sdbackup.client.cli import JsonStatus
from sdbackup.client.progress import Counts
from sdbackup.client.restore import RestoreResult
from sdbackup.names import escape, unescape
from sdbackup.objects import Node
from sdbackup.protocols.messages import CheckReport, ClusterStatus, ServerState, SnapshotSummary

SID = hashing.object_id("snapshot", b"a snapshot")
TREE = hashing.object_id("tree", b"a tree")
PARENT = hashing.object_id("snapshot", b"its parent")
ODD = b"caf\xe9\n.txt"
MTIME_NS = 1_600_000_000_123_456_789


def round_trip(value):
    """What a script reads back: the printed line must be one line of ASCII JSON."""
    line = jsonout.dumps(value)
    assert "\n" not in line and line.isascii()
    return json.loads(line)


def test_times_are_rfc3339_with_an_offset_and_node_times_keep_their_nanoseconds():
    parsed = datetime.datetime.fromisoformat(jsonout.rfc3339(1_700_000_000.25))
    assert parsed.tzinfo is not None and parsed.timestamp() == 1_700_000_000.25
    text = jsonout.rfc3339_ns(MTIME_NS)
    assert ".123456789" in text
    # Python reads microseconds; the nanoseconds are the digits it cannot hold.
    micro = datetime.datetime.fromisoformat(text.replace("123456789", "123456"))
    assert micro.tzinfo is not None and round(micro.timestamp() * 1e6) == MTIME_NS // 1000
    assert jsonout.rfc3339_ns(5)[19:29] == ".000000005"


def test_a_snapshot_is_restics_object_with_escaped_paths():
    summary = SnapshotSummary(SID, 1_700_000_000.5, "hôst", ["docs", escape(b"odd\x01" + ODD)], TREE,
                              tags=["daily"], parent=PARENT, files=3, dirs=2, bytes=4096)
    out = round_trip(jsonout.snapshot(summary))
    assert out["id"] == SID and out["short_id"] == SID[:8] and out["tree"] == TREE
    assert out["hostname"] == "hôst" and out["tags"] == ["daily"] and out["parent"] == PARENT
    assert [unescape(p) for p in out["paths"]] == [b"docs", b"odd\x01" + ODD]
    assert datetime.datetime.fromisoformat(out["time"]).timestamp() == 1_700_000_000.5
    assert out["summary"] == {"total_files_processed": 3, "total_dirs_processed": 2,
                              "total_bytes_processed": 4096}
    without_parent = SnapshotSummary(SID, 1.0, "h", [], TREE)
    assert "parent" not in jsonout.snapshot(without_parent)  # restic omits it too
    assert round_trip(jsonout.listed_snapshot(summary))["message_type"] == "snapshot"


def test_a_node_carries_its_name_and_path_losslessly():
    node = Node(name=ODD, type="file", mode=0o4755, uid=1000, gid=100, user="ann", group="users",
                mtime_ns=MTIME_NS, size=9)
    out = round_trip(jsonout.node((b"dir\\x", ODD), node))
    assert out["name"] == "caf\\xe9\\n.txt" and unescape(out["name"]) == ODD
    assert [unescape(n) for n in out["path"].split("/")] == [b"dir\\x", ODD]
    assert out["mode"] == stat.S_IFREG | 0o4755 and out["permissions"] == "-rwsr-xr-x"
    assert (out["uid"], out["gid"], out["user"], out["group"], out["size"]) == (1000, 100, "ann",
                                                                               "users", 9)
    assert out["mtime"] == jsonout.rfc3339_ns(MTIME_NS) and out["message_type"] == "node"
    assert "linktarget" not in out and "chunks" not in out
    with_chunks = round_trip(jsonout.node((ODD,), node, 4, ["a:1", "b:2"]))
    assert with_chunks["chunks"] == 4 and with_chunks["servers"] == ["a:1", "b:2"]
    link = round_trip(jsonout.node((b"l",), Node(name=b"l", type="symlink", mode=0o777,
                                                 target=b"to/\xff")))
    assert unescape(link["linktarget"]) == b"to/\xff" and link["permissions"] == "lrwxrwxrwx"


def test_backup_and_restore_summaries_say_whether_they_are_complete():
    result = BackupResult(SID, files=5, dirs=2, bytes=1000, new_bytes=600, warnings=["cannot read x"],
                          unchanged=3, parent=PARENT, notes=["skipped a socket"])
    out = round_trip(jsonout.backup_summary(result, 1.23456))
    assert out == {"message_type": "summary", "snapshot_id": SID, "parent": PARENT,
                   "files_unmodified": 3, "total_files_processed": 5, "total_dirs_processed": 2,
                   "total_bytes_processed": 1000, "data_added": 600, "total_duration": 1.235,
                   "warnings": ["cannot read x"], "notes": ["skipped a socket"], "complete": False}
    first = BackupResult(SID, files=1, dirs=0, bytes=1, new_bytes=1, warnings=[])
    assert jsonout.backup_summary(first, 0)["parent"] is None
    assert jsonout.backup_summary(first, 0)["complete"] is True

    restored = round_trip(jsonout.restore_summary(
        RestoreResult(SID, files=4, folders=2, others=1, bytes=99, errors=["x: bad"]), "out", 2.0))
    assert restored["total_files"] == 7 and restored["files_restored"] == 4
    assert restored["dirs_restored"] == 2 and restored["others_restored"] == 1
    assert restored["bytes_restored"] == 99 and restored["verified"] is False
    assert restored["errors"] == ["x: bad"] and restored["target"] == "out"


def test_status_and_check_hold_every_count():
    reply = ClusterStatus(request_id=1, state="ready", replicas=2, snapshots=4, chunks=10,
                          under_replicated=1, missing=0, servers=[
                              ServerState("tcp:127.0.0.1:1", True, 100, 7, 1_700_000_000.0),
                              ServerState("tcp:127.0.0.1:2", False, 0, 3, 1_699_999_000.0)])
    out = round_trip(jsonout.status(reply))
    assert out["servers_alive"] == 1 and out["under_replicated"] == 1 and out["snapshots"] == 4
    assert [(s["address"], s["alive"], s["chunks"]) for s in out["servers"]] == [
        ("tcp:127.0.0.1:1", True, 7), ("tcp:127.0.0.1:2", False, 3)]
    report = CheckReport(request_id=1, servers_checked=["tcp:a:1"], servers_unreachable=[],
                         chunks=9, missing=1, snapshots=2, trees=5, damaged=[SID])
    checked = round_trip(jsonout.check(report, read_data=True))
    assert checked["data_lost"] is True and checked["degraded"] is False
    assert checked["damaged"] == [SID] and checked["trees"] == 5 and checked["read_data"] is True


def test_forget_groups_are_restics_with_each_kept_snapshots_reasons():
    new = retention.Item(SID, 2000.0, "h", ("docs",), ("t",))
    old = retention.Item(PARENT, 1000.0, "h", ("docs",), ("t",))
    (decision,) = retention.decide([new, old], retention.Policy(last=1), ("host", "paths"), 3000.0)
    group = round_trip(jsonout.forget_group(decision, decision.remove))
    assert group["host"] == "h" and group["paths"] == ["docs"] and group["tags"] is None
    assert [s["id"] for s in group["keep"]] == [SID]
    assert [s["id"] for s in group["remove"]] == [PARENT]
    assert group["reasons"] == [{"snapshot": group["keep"][0], "matches": ["last snapshot"]}]
    by_id = jsonout.forget_group(None, [old])
    assert by_id["keep"] == [] and [s["id"] for s in by_id["remove"]] == [PARENT]
    out = round_trip(jsonout.forget([group], "keep 1 latest snapshots", False, 1))
    assert out["forgotten"] == 1 and out["already_forgotten"] == 0 and out["dry_run"] is False


def test_status_lines_have_totals_and_time_left_only_when_known():
    backup = round_trip(jsonout.status_line(Counts(bytes=2048, files=3, elapsed=2.5)))
    assert backup == {"message_type": "status", "seconds_elapsed": 2, "files_done": 3,
                      "bytes_done": 2048}
    restore = round_trip(jsonout.status_line(Counts(bytes=250, files=1, elapsed=1.0, total_bytes=1000,
                                                    total_files=4, current="a\\nb")))
    assert restore["percent_done"] == 0.25 and restore["seconds_remaining"] == 3
    assert (restore["total_bytes"], restore["total_files"]) == (1000, 4)
    assert restore["current_files"] == ["a\\nb"]
    assert round_trip(jsonout.status_line(Counts(0, 0, 0.0, total_bytes=10)))["seconds_remaining"] is None


def test_json_status_prints_one_whole_line_a_second_and_nothing_at_the_end():
    out = io.StringIO()
    status = JsonStatus(stream=out)
    status.bytes, status.files = 100, 2
    status.draw(status.started + 0.5)
    assert out.getvalue() == ""  # a short command prints its summary only
    status.draw(status.started + 1.0)
    status.draw(status.started + 1.5)
    status.draw(status.started + 2.1)
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["seconds_elapsed"] for line in lines] == [1, 2]
    status.finish()
    status.interrupted()
    assert out.getvalue().splitlines() == lines
