"""What ``sdbackup ... --json`` prints: pure formatting, no I/O.

The shapes follow restic's ``--json`` where restic has one (``snapshots``: a list of
snapshot objects; ``ls``: one object per line, the snapshot then each node; ``backup`` and
``restore``: a ``summary`` object), with sdbackup's extra facts as extra keys. Names and
paths are bytes in sdbackup: JSON carries them escaped as ``sdbackup.names.escape`` does
(``\\xe9`` for a byte that is not UTF-8, ``\\n``, ``\\\\``), which ``sdbackup.names.unescape``
turns back into exactly the same bytes. Times are RFC 3339 in local time with the offset;
a node's times keep their nanoseconds.
"""

import datetime
import json
import stat

from sdbackup import retention
from sdbackup.client.listing import _TYPE_BITS, mode_string
from sdbackup.client.progress import Counts
from sdbackup.names import escape
from sdbackup.objects import Node
from sdbackup.paths import display_path
from sdbackup.protocols.messages import CheckReport, ClusterStatus, SnapshotSummary

#: Characters of a snapshot id in ``short_id`` (as the text output shows it).
SHORT_ID = 8


def dumps(value) -> str:
    """One line of JSON (ASCII only, so any terminal or pipe encoding carries it)."""
    return json.dumps(value, separators=(",", ":"))


def rfc3339(seconds: float) -> str:
    """``2026-11-27T21:00:59.123456+01:00``: a POSIX time in local time, with its offset."""
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat()


def rfc3339_ns(ns: int) -> str:
    """``rfc3339`` with the nanoseconds a file's times carry: ``...T21:00:59.123456789+01:00``."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    local = datetime.datetime.fromtimestamp(seconds).astimezone()
    return f"{local.replace(tzinfo=None).isoformat()}.{fraction:09d}{local.isoformat()[19:]}"


def _hex(value: str | bytes) -> str:
    return value.hex() if isinstance(value, bytes) else value


def snapshot(summary: SnapshotSummary) -> dict:
    """restic's snapshot object; ``paths`` are escaped (the manager's summary holds them so)."""
    out = {"id": summary.snapshot_id, "short_id": summary.snapshot_id[:SHORT_ID],
           "time": rfc3339(summary.time), "hostname": summary.host, "paths": list(summary.paths),
           "tags": list(summary.tags), "tree": summary.tree}
    if summary.parent:
        out["parent"] = summary.parent
    out["summary"] = {"total_files_processed": summary.files, "total_dirs_processed": summary.dirs,
                      "total_bytes_processed": summary.bytes}
    return out


def item(entry: retention.Item) -> dict:
    """A snapshot as ``forget`` reads it (no tree: the policy does not need one)."""
    return {"id": entry.snapshot_id, "short_id": entry.snapshot_id[:SHORT_ID],
            "time": rfc3339(entry.time), "hostname": entry.host, "paths": list(entry.paths),
            "tags": list(entry.tags)}


def node(path: tuple, entry: Node, chunks: int | None = None, servers: list | None = None) -> dict:
    """restic's ``ls --json`` node; ``mode`` is the POSIX ``st_mode`` (type bits included),
    ``permissions`` as ``ls -l`` shows it."""
    out = {"message_type": "node", "struct_type": "node", "name": escape(entry.name),
           "type": entry.type, "path": display_path(path), "uid": entry.uid, "gid": entry.gid,
           "user": entry.user, "group": entry.group, "size": entry.size,
           "mode": _TYPE_BITS[entry.type] | stat.S_IMODE(entry.mode), "permissions": mode_string(entry),
           "mtime": rfc3339_ns(entry.mtime_ns), "atime": rfc3339_ns(entry.atime_ns),
           "ctime": rfc3339_ns(entry.ctime_ns), "inode": entry.inode}
    if entry.type == "symlink":
        out["linktarget"] = escape(entry.target)
    if entry.type in ("chardev", "blockdev"):
        out["device"] = entry.rdev
    if chunks is not None:
        out["chunks"] = chunks
        out["servers"] = list(servers or [])
    return out


def listed_snapshot(summary: SnapshotSummary) -> dict:
    """The first line of ``ls --json``: the snapshot listed."""
    return {"message_type": "snapshot", "struct_type": "snapshot", **snapshot(summary)}


def status_line(counts: Counts) -> dict:
    """restic's ``status`` message of a backup or restore under way; the totals, percentage
    and time left only where they are known (a restore's)."""
    out = {"message_type": "status", "seconds_elapsed": int(counts.elapsed),
           "files_done": counts.files, "bytes_done": counts.bytes}
    if counts.total_bytes or counts.total_files:
        rate = counts.bytes / max(counts.elapsed, 1e-6)
        out.update(total_files=counts.total_files, total_bytes=counts.total_bytes,
                   percent_done=min(counts.bytes / counts.total_bytes, 1.0) if counts.total_bytes else 1.0,
                   seconds_remaining=int(max(counts.total_bytes - counts.bytes, 0) / rate) if rate > 0
                   else None)
    if counts.current:
        out["current_files"] = [counts.current]
    return out


def backup_summary(result, seconds: float) -> dict:
    """restic's backup ``summary`` message, from a ``BackupResult``."""
    return {"message_type": "summary", "snapshot_id": _hex(result.snapshot_id),
            "parent": _hex(result.parent) or None,
            "files_unmodified": result.unchanged, "total_files_processed": result.files,
            "total_dirs_processed": result.dirs, "total_bytes_processed": result.bytes,
            "data_added": result.new_bytes, "total_duration": round(seconds, 3),
            "warnings": list(result.warnings), "notes": list(result.notes),
            "complete": not result.warnings}


def restore_summary(result, target: str, seconds: float) -> dict:
    """restic's restore ``summary`` message, from a ``RestoreResult``."""
    restored = result.files + result.folders + result.others
    return {"message_type": "summary", "snapshot_id": _hex(result.snapshot_id), "target": target,
            "seconds_elapsed": round(seconds, 3), "total_files": restored,
            "files_restored": result.files, "dirs_restored": result.folders,
            "others_restored": result.others, "total_bytes": result.bytes,
            "bytes_restored": result.bytes, "errors": list(result.errors),
            "notes": list(result.notes), "verified": not result.errors}


def status(reply: ClusterStatus) -> dict:
    """The manager's state and one object per storage server."""
    return {"state": reply.state, "replicas": reply.replicas, "snapshots": reply.snapshots,
            "chunks": reply.chunks, "under_replicated": reply.under_replicated,
            "missing": reply.missing, "servers_alive": sum(s.alive for s in reply.servers),
            "servers": [{"address": s.address, "alive": s.alive, "free_bytes": s.free_bytes,
                         "chunks": s.chunks, "last_seen": rfc3339(s.last_seen)}
                        for s in reply.servers]}


def check(report: CheckReport, read_data: bool) -> dict:
    """What ``check`` found; ``data_lost`` and ``degraded`` say which exit status follows."""
    return {"read_data": read_data, "servers_checked": list(report.servers_checked),
            "servers_unreachable": list(report.servers_unreachable), "snapshots": report.snapshots,
            "trees": report.trees, "chunks": report.chunks, "missing": report.missing,
            "under_replicated": report.under_replicated, "corrupt": report.corrupt,
            "damaged": list(report.damaged),
            "data_lost": bool(report.missing or report.damaged),
            "degraded": bool(report.under_replicated or report.corrupt or report.servers_unreachable)}


def forget_group(decision: retention.Decision | None, remove: list) -> dict:
    """restic's ``forget --json`` group: ``keep``, ``remove`` and the reasons for each kept
    one; without a decision (snapshots named by id), every one is removed and none kept."""
    key = dict(decision.key) if decision is not None else {}
    keep = decision.keep if decision is not None else []
    reasons = decision.reasons if decision is not None else {}
    return {"host": key.get("host"),
            "paths": list(key["paths"]) if "paths" in key else None,
            "tags": list(key["tags"]) if "tags" in key else None,
            "keep": [item(i) for i in keep], "remove": [item(i) for i in remove],
            "reasons": [{"snapshot": item(i), "matches": list(reasons.get(i.snapshot_id, []))}
                        for i in keep]}


def forget(groups: list, policy: str | None, dry_run: bool, forgotten: int | None,
           already: int = 0) -> dict:
    """``forget --json``: restic's groups, and how many snapshots were forgotten (``null``
    with ``--dry-run``)."""
    return {"policy": policy, "dry_run": dry_run, "groups": groups, "forgotten": forgotten,
            "already_forgotten": already}
