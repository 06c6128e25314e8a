"""``--json`` on every command that prints results, against a real cluster: what a script reads
is JSON only, holds what the text output shows, and carries any name's exact bytes."""

import json
import os
import socket

from sdbackup.names import unescape

#: A name that is not UTF-8 and holds a newline: JSON carries it escaped, losslessly.
ODD = b"caf\xe9\n.txt"
MiB = 1024 * 1024


def make_source(root) -> list[str]:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "plain.txt").write_bytes(b"plain\n")
    (docs / "sub" / "big.bin").write_bytes(os.urandom(MiB + 7))
    with open(os.path.join(os.fsencode(docs), ODD), "wb") as f:
        f.write(b"odd name\n")
    return ["docs"]


def json_of(result):
    assert result.stderr == "", result.describe()
    return json.loads(result.stdout)


def summary_of(result) -> dict:
    """A backup's or restore's last line: its summary, after any status lines (one a second)."""
    assert result.stderr == "", result.describe()
    *statuses, summary = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(s["message_type"] == "status" for s in statuses), result.describe()
    assert summary["message_type"] == "summary", result.describe()
    return summary


def test_every_command_prints_json_holding_what_the_text_shows(cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_source(src)

    # backup: a restic summary (--json before the command, as --manager may be).
    summary = summary_of(cluster.sdbackup("--json", "backup", "docs", cwd=src))
    assert summary["message_type"] == "summary"
    assert summary["total_files_processed"] == 3 and summary["total_dirs_processed"] == 2
    assert summary["total_bytes_processed"] == MiB + 7 + len(b"plain\n") + len(b"odd name\n")
    assert summary["data_added"] >= MiB and summary["complete"] is True
    sid = summary["snapshot_id"]
    assert len(sid) == 64

    # snapshots: restic's list of snapshot objects, the values the table shows.
    (listed,) = [s for s in json_of(cluster.sdbackup("snapshots", "--json", cwd=src)) if s["id"] == sid]
    assert listed["short_id"] == sid[:8] and listed["hostname"] == socket.gethostname()
    assert listed["paths"] == ["docs"] and listed["tags"] == [] and len(listed["tree"]) == 64
    assert listed["summary"]["total_files_processed"] == 3
    table = cluster.sdbackup("snapshots", cwd=src).stdout
    (row,) = [line for line in table.splitlines() if line.startswith(sid[:8])]
    assert row.split()[1:3] == listed["time"][:19].split("T")

    # ls: one object a line, the snapshot first; every path unescapes to the file's bytes.
    lines = cluster.sdbackup("ls", sid[:8], "--json", cwd=src).stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert objects[0]["message_type"] == "snapshot" and objects[0]["id"] == sid
    nodes = {unescape(o["path"]): o for o in objects[1:]}
    assert set(nodes) == {b"docs", b"docs/plain.txt", b"docs/sub", b"docs/sub/big.bin",
                          b"docs/" + ODD}
    odd = nodes[b"docs/" + ODD]
    assert odd["name"] == "caf\\xe9\\n.txt" and unescape(odd["name"]) == ODD
    assert odd["type"] == "file" and odd["size"] == len(b"odd name\n")
    assert nodes[b"docs/sub"]["type"] == "dir" and nodes[b"docs/sub"]["permissions"].startswith("d")
    assert nodes[b"docs/sub/big.bin"]["size"] == MiB + 7
    text = cluster.sdbackup("ls", sid[:8], cwd=src).stdout.splitlines()
    assert sorted(text) == sorted(o["path"] + ("/" if o["type"] == "dir" else "") for o in objects[1:])
    chunked = [json.loads(line) for line in
               cluster.sdbackup("ls", sid[:8], "docs/sub/big.bin", "--chunks", "--json",
                                cwd=src).stdout.splitlines()]
    assert chunked[1]["chunks"] >= 1 and len(chunked[1]["servers"]) >= 2

    # restore: restic's summary; the odd name is back with its exact bytes.
    target = tmp_path / "out"
    restored = summary_of(cluster.sdbackup("restore", sid, "--target", target, "--json", cwd=src))
    assert restored["message_type"] == "summary" and restored["snapshot_id"] == sid
    assert restored["files_restored"] == 3 and restored["dirs_restored"] == 2
    assert restored["bytes_restored"] == summary["total_bytes_processed"] and restored["verified"]
    assert (os.fsencode(target / "docs") + b"/" + ODD) in [
        os.path.join(os.fsencode(target / "docs"), n) for n in os.listdir(os.fsencode(target / "docs"))]

    # status and check: the counts their text shows.
    status = json_of(cluster.sdbackup("status", "--json", cwd=src))
    assert status["state"] == "ready" and status["servers_alive"] == len(status["servers"]) == 3
    status_text = cluster.sdbackup("status", cwd=src).stdout
    for server in status["servers"]:
        assert server["alive"] and server["address"].removeprefix("tcp:") in status_text
    checked = json_of(cluster.sdbackup("check", "--json", cwd=src))
    assert checked["data_lost"] is False and checked["missing"] == 0
    assert checked["snapshots"] == status["snapshots"] >= 1
    check_text = cluster.sdbackup("check", cwd=src).stdout
    assert f"{checked['snapshots']} snapshots checked, {checked['trees']} trees" in check_text

    # forget: restic's groups, then how many were forgotten.
    dry = json_of(cluster.sdbackup("forget", sid[:8], "--dry-run", "--json", cwd=src))
    assert dry["dry_run"] is True and dry["forgotten"] is None
    assert [s["id"] for s in dry["groups"][0]["remove"]] == [sid]
    done = json_of(cluster.sdbackup("--json", "forget", sid[:8], cwd=src))
    assert done["forgotten"] == 1 and done["already_forgotten"] == 0
    assert sid not in [s["id"] for s in json_of(cluster.sdbackup("snapshots", "--json", cwd=src))]


def test_forget_by_policy_gives_each_kept_snapshot_its_reasons(cluster, tmp_path):
    (tmp_path / "a.txt").write_bytes(os.urandom(1000))
    first = cluster.backup("a.txt", cwd=tmp_path)
    (tmp_path / "a.txt").write_bytes(os.urandom(1000))
    second = cluster.backup("a.txt", cwd=tmp_path)
    result = json_of(cluster.sdbackup("forget", "--keep-last", "1", "--path", "a.txt", "--json",
                                      cwd=tmp_path))
    assert result["policy"] == "keep 1 latest snapshots" and result["forgotten"] == 1
    (group,) = result["groups"]
    assert group["paths"] == ["a.txt"] and group["host"] == socket.gethostname()
    assert [s["short_id"] for s in group["keep"]] == [second]
    assert [s["short_id"] for s in group["remove"]] == [first]
    assert group["reasons"][0]["matches"] == ["last snapshot"]


def test_an_error_with_json_is_text_on_stderr_and_nothing_on_stdout(cluster, tmp_path):
    result = cluster.sdbackup("restore", "ffffffff", "--target", tmp_path / "t", "--json",
                              cwd=tmp_path, check=False)
    assert result.returncode == 1, result.describe()
    assert result.stdout == ""
    assert result.stderr.startswith("sdbackup: ") and "ffffffff" in result.stderr
    missing = cluster.sdbackup("--json", "backup", "no such file", cwd=tmp_path, check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == "sdbackup: cannot back up no such file: No such file or directory\n"

