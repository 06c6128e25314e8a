"""``sdbackup prune [--dry-run]``, and ``forget --prune``: the manager deletes what no snapshot
reaches any more and trims copies above the replication factor.

The manager runs the prune (``sdbackup/services/prune.py``); the client starts it and asks for
its figures every ``POLL`` seconds, drawing a progress line on a terminal, until it is done.
A prune goes on if the client is interrupted (``prune`` again then says one is under way).
"""

import sys

from twisted.internet import task

from sdbackup.client import jsonout
from sdbackup.client.progress import human_bytes, human_duration
from sdbackup.client.session import Session
from sdbackup.protocols.messages import PruneRequest, PruneStatus, PruneStatusRequest

#: Seconds between two looks at the prune's progress.
POLL = 0.5
FINISHED = ("done", "failed")


def progress_text(status: PruneStatus) -> str:
    """One short line (it fits 80 columns) of what the prune is doing."""
    if status.state == "marking":
        return (f"prune: marking: {status.snapshots} snapshots, {status.objects_read} trees and "
                f"chunk lists read")
    if status.state == "sweeping":
        return (f"prune: deleting: {status.swept} of {status.unreachable} unreachable chunks, "
                f"{human_bytes(status.deleted_bytes)} freed")
    return f"prune: trimming extra copies: {status.trimmed_copies} so far"


def summary_lines(status: PruneStatus) -> list[str]:
    would = "would be " if status.dry_run else ""
    lines = [
        f"{status.snapshots} snapshots kept, {status.reachable} chunks and objects reachable "
        f"from them ({status.objects_read} trees and chunk lists read)",
        f"{status.unreachable} unreachable chunks ({human_bytes(status.unreachable_bytes)}) "
        f"{would}deleted: {status.deleted_copies} copies, {human_bytes(status.deleted_bytes)} "
        f"on the servers",
    ]
    if status.recent:
        lines.append(f"{status.recent} unreachable chunks spared: stored or used by a backup in "
                     f"the last {human_duration(status.grace)} (the manager's --prune-grace)")
    lines.append(f"{status.trimmed_copies} copies above the replication factor {would}trimmed "
                 f"({human_bytes(status.trimmed_bytes)})")
    freed = status.deleted_bytes + status.trimmed_bytes
    what = "would be freed (--dry-run: nothing deleted)" if status.dry_run else "freed"
    lines.append(f"{human_bytes(freed)} {what} in {human_duration(status.elapsed)}")
    return lines


def as_json(status: PruneStatus) -> dict:
    """``prune --json``: one summary object (restic's has no fixed shape; bytes are bytes on
    the servers' disks, over all of them)."""
    return {
        "message_type": "summary",
        "dry_run": status.dry_run,
        "state": status.state,
        "error": status.error or None,
        "duration_seconds": round(status.elapsed, 3),
        "grace_seconds": status.grace,
        "snapshots_kept": status.snapshots,
        "objects_read": status.objects_read,
        "reachable_chunks": status.reachable,
        "unreachable_chunks": status.unreachable,
        "unreachable_bytes": status.unreachable_bytes,
        "spared_recent_chunks": status.recent,
        "deleted_chunks": status.deleted_chunks,
        "deleted_copies": status.deleted_copies,
        "deleted_bytes": status.deleted_bytes,
        "trimmed_copies": status.trimmed_copies,
        "trimmed_bytes": status.trimmed_bytes,
        "freed_bytes": status.deleted_bytes + status.trimmed_bytes,
    }


async def run_prune(session: Session, dry_run: bool, show_progress: bool) -> PruneStatus:
    """Start a prune and follow it to its end; its last figures."""
    status = await session.ask(PruneRequest(dry_run=dry_run))
    drawn = False
    try:
        while status.state not in FINISHED:
            if show_progress:
                sys.stderr.write("\r\x1b[K" + progress_text(status))
                sys.stderr.flush()
                drawn = True
            await task.deferLater(session.reactor, POLL)
            status = await session.ask(PruneStatusRequest())
    finally:
        if drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    return status


def report(status: PruneStatus, json_output: bool) -> int:
    """Print the summary (or the JSON object); the exit status."""
    if json_output:
        print(jsonout.dumps(as_json(status)))
    else:
        for line in summary_lines(status):
            print(line)
    if status.state == "failed":
        print(f"sdbackup: prune failed: {status.error}", file=sys.stderr)
        return 1
    return 0


async def cmd_prune(session: Session, args) -> int:
    json_output = getattr(args, "json", False)
    status = await run_prune(session, args.dry_run, sys.stderr.isatty() and not json_output)
    return report(status, json_output)
