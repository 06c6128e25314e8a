"""The ``sdbackup`` command line.

    sdbackup backup [PATH...] [--parent ID] [--force] [--tag TAG]... [--host NAME]
                                       back up files and folders (asks when none given)
    sdbackup snapshots                 list snapshots
    sdbackup ls [SNAPSHOT] [PATH] [-l] list what a snapshot holds (at PATH)
    sdbackup restore SNAPSHOT --target DIR [--include PATH]...
    sdbackup status                    the manager's state and one line per storage server
    sdbackup check [--read-data]       verify every snapshot's objects and chunks

The manager is ``--manager ENDPOINT``, else ``$SDBACKUP_MANAGER``, else
``tcp:localhost:5000``. Names in paths are shown, and typed, escaped as
``sdbackup.names.escape`` does (a backslash, a control character or a byte
that is not UTF-8 becomes ``\\``, ``\\n``, ``\\xff``...).
"""

import argparse
import datetime
import os
import sys

from twisted.internet import defer, task

from sdbackup.client.backup import Backup
from sdbackup.client.listing import entry_line
from sdbackup.client.progress import Progress, human_bytes
from sdbackup.client.repository import Repository
from sdbackup.client.restore import Restore
from sdbackup.client.session import ClientError, Session
from sdbackup.client.treereader import Enter, Entry, TreeReader
from sdbackup.objects import Kind, Node, ObjectFormatError, decode_chunk_list
from sdbackup.paths import UnsafePath, parse_path
from sdbackup.protocols.messages import CheckRequest, StatusRequest
from sdbackup.protocols.peer import RemoteError

DEFAULT_MANAGER = "tcp:localhost:5000"
#: Exit status when the command finished but some files were skipped or failed.
EXIT_INCOMPLETE = 3
#: Characters of a snapshot id shown (any unique prefix names a snapshot).
SHORT_ID = 8


def display_address(address: str) -> str:
    """``host:port`` for a ``tcp:host:port`` endpoint, the endpoint itself otherwise."""
    kind, _, rest = address.partition(":")
    return rest if kind == "tcp" and rest.count(":") == 1 else address


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _short(snapshot_id: str | bytes | None) -> str:
    if isinstance(snapshot_id, bytes):
        snapshot_id = snapshot_id.hex()
    return (snapshot_id or "")[:SHORT_ID]


async def cmd_backup(session: Session, args) -> int:
    paths = args.paths
    if not paths:
        if not sys.stdin.isatty():
            raise ClientError("give the files or folders to back up")
        answer = input("File name to back up: ").strip()
        if not answer:
            raise ClientError("no file name given")
        paths = [answer]
    progress = Progress(0, 0)
    result = await Backup(session, paths, progress=progress, parent=args.parent, force=args.force,
                          tags=tuple(args.tag), host=args.host).run()
    progress.finish()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"snapshot {_short(result.snapshot_id)} saved: {result.files} files, {result.dirs} folders, "
          f"{human_bytes(result.bytes)} ({human_bytes(result.new_bytes)} new) in {progress.elapsed:.1f}s"
          + (f"; {result.unchanged} unchanged files not read again" if result.unchanged else "")
          + (f"; parent {_short(result.parent)}" if result.parent else ""))
    return EXIT_INCOMPLETE if result.warnings else 0


async def cmd_snapshots(session: Session, args) -> int:
    snapshots = await Repository(session).snapshots()
    print(f"{'ID':<8}  {'TIME':<19}  {'HOST':<16}  {'TAGS':<12}  {'FILES':>7}  {'SIZE':>10}  PATHS")
    for s in snapshots:
        print(f"{_short(s.snapshot_id):<8}  {_timestamp(s.time):<19}  {s.host[:16]:<16}  "
              f"{','.join(s.tags):<12}  {s.files:>7}  {human_bytes(s.bytes):>10}  {' '.join(s.paths)}")
    return 0


async def cmd_ls(session: Session, args) -> int:
    """Stream the entries at ``PATH`` (the whole snapshot by default), depth first."""
    repository = Repository(session)
    summary = await repository.resolve(args.snapshot)
    snapshot = await repository.load_snapshot(summary.snapshot_id)
    names = parse_path(args.path)
    reader = TreeReader(repository, chunks=args.chunks)
    out = sys.stdout
    node = None
    if names:
        node = await repository.find(snapshot.tree, b"/".join(names))
        if node is None:
            raise ClientError(f"{args.path}: not in snapshot {_short(summary.snapshot_id)}")
        if node.type != "dir":
            suffix = await _chunks_shown(repository, node, None) if args.chunks else ""
            out.write(entry_line(names, node, args.long) + suffix + "\n")
            return 0
    errors = 0
    async for event in reader.walk(node.subtree if node else snapshot.tree, prefix=names, node=node):
        if isinstance(event, Entry):
            suffix = await _chunks_shown(repository, event.node, event.holders) if args.chunks else ""
            out.write(entry_line(event.path, event.node, args.long) + suffix + "\n")
        elif isinstance(event, Enter) and event.node is not None:
            out.write(entry_line(event.path, event.node, args.long) + "\n")
            if event.error:
                out.flush()
                print(f"error: {event.error}", file=sys.stderr)
                errors += 1
    return EXIT_INCOMPLETE if errors else 0


async def _chunks_shown(repository: Repository, node: Node, holders: dict | None) -> str:
    """``  N chunks  [servers]``: how many chunks a file has and which servers hold them."""
    if node.type != "file":
        return ""
    ids = [c.hex() for c in node.content]
    for list_id in node.content_lists:
        data = await repository.fetch_object(Kind.LIST, list_id.hex())
        ids.extend(c.hex() for c in decode_chunk_list(data))
    missing = [i for i in dict.fromkeys(ids) if holders is None or i not in holders]
    located = dict(holders or {})
    if missing:
        located.update(await repository.locate(missing))
    servers = sorted({display_address(h) for i in ids for h in located.get(i, [])})
    return f"  {len(ids)} chunk{'' if len(ids) == 1 else 's'}  [{' '.join(servers)}]"


async def cmd_restore(session: Session, args) -> int:
    progress = Progress(0, 0)
    result = await Restore(session, args.snapshot, args.target, args.include, progress).run()
    progress.finish()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"snapshot {_short(result.snapshot_id)} restored to {args.target}: {result.files} files, "
          f"{result.folders} folders, {result.others} links and special files, "
          f"{human_bytes(result.bytes)}, every byte verified"
          + (f"; {len(result.errors)} failed" if result.errors else ""))
    return EXIT_INCOMPLETE if result.errors else 0


async def cmd_status(session: Session, args) -> int:
    status = await session.ask(StatusRequest())
    print(f"{'SERVER':<28} {'STATE':<6} {'FREE':>11} {'CHUNKS':>8}  LAST SEEN")
    for s in status.servers:
        state = "alive" if s.alive else "dead"
        print(f"{display_address(s.address):<28} {state:<6} {human_bytes(s.free_bytes):>11} {s.chunks:>8}  "
              f"{_timestamp(s.last_seen)}")
    alive = sum(s.alive for s in status.servers)
    print(f"manager {status.state}; {alive} of {len(status.servers)} servers alive; replication factor "
          f"{status.replicas}; {status.snapshots} snapshots; {status.chunks} chunks held, "
          f"{status.under_replicated} under-replicated, {status.missing} missing")
    return 0


async def cmd_check(session: Session, args) -> int:
    report = await session.ask(CheckRequest(read_data=args.read_data))
    what = "re-hashed every chunk" if args.read_data else "listed their chunks"
    print(f"{len(report.servers_checked)} servers {what}: "
          f"{' '.join(display_address(s) for s in report.servers_checked) or '-'}")
    for server in report.servers_unreachable:
        print(f"unreachable: {display_address(server)}")
    print(f"{report.snapshots} snapshots checked, {report.trees} trees and chunk lists walked")
    print(f"snapshots reference {report.missing} missing chunks; {report.chunks} chunks held: "
          f"{report.under_replicated} under-replicated, {report.corrupt} corrupt copies found")
    for snapshot_id in report.damaged:
        print(f"damaged: snapshot {_short(snapshot_id)} references data with no good copy left")
    if report.missing or report.damaged:
        print("some data has no good copy left on a live server", file=sys.stderr)
        return 1
    if report.under_replicated or report.corrupt or report.servers_unreachable:
        print("every chunk has a good copy; the manager is repairing the rest", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


COMMANDS = {
    "backup": cmd_backup,
    "snapshots": cmd_snapshots,
    "ls": cmd_ls,
    "restore": cmd_restore,
    "status": cmd_status,
    "check": cmd_check,
}


def build_parser() -> argparse.ArgumentParser:
    manager = argparse.ArgumentParser(add_help=False)
    manager.add_argument("--manager", default=argparse.SUPPRESS,
                         help="manager endpoint (default: $SDBACKUP_MANAGER or tcp:localhost:5000)")
    parser = argparse.ArgumentParser(prog="sdbackup", parents=[manager],
                                     description="Back up to and restore from an sdbackup cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backup", parents=[manager], help="back up files and folders")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--parent", metavar="ID",
                   help="compare with this snapshot to find unchanged files (default: the latest of "
                        "this host and these paths)")
    p.add_argument("--force", action="store_true", help="read every file again, even unchanged ones")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="a tag for the snapshot (repeatable)")
    p.add_argument("--host", help="host name to record (default: this machine's)")
    sub.add_parser("snapshots", parents=[manager], help="list snapshots")
    p = sub.add_parser("ls", parents=[manager], help="list what a snapshot holds")
    p.add_argument("snapshot", nargs="?", default="latest", help="snapshot id (or a prefix) or 'latest'")
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a path in the snapshot, as ls shows it (default: everything)")
    p.add_argument("-l", "--long", action="store_true", help="show type, mode, owner, group, size, mtime")
    p.add_argument("--chunks", action="store_true",
                   help="show each file's chunk count and the servers holding its chunks")
    p = sub.add_parser("restore", parents=[manager], help="restore a snapshot")
    p.add_argument("snapshot", help="snapshot id (or a prefix) or 'latest'")
    p.add_argument("--target", required=True, help="folder to restore into")
    p.add_argument("--include", action="append", default=[], metavar="PATH",
                   help="restore only this path of the snapshot, as ls shows it (repeatable)")
    sub.add_parser("status", parents=[manager], help="show the manager's state and the servers")
    p = sub.add_parser("check", parents=[manager],
                       help="verify every snapshot against the servers (exit 1: data lost, 3: degraded)")
    p.add_argument("--read-data", action="store_true",
                   help="have every server re-read and re-hash every chunk it holds")
    return parser


async def run(reactor, args) -> int:
    manager = getattr(args, "manager", None) or os.environ.get("SDBACKUP_MANAGER") or DEFAULT_MANAGER
    session = Session(reactor, manager)
    try:
        await session.connect()
        return await COMMANDS[args.command](session, args)
    finally:
        await session.close()


def main(argv=None):
    args = build_parser().parse_args(argv)
    status = []

    async def go(reactor):
        try:
            status.append(await run(reactor, args))
        except (ClientError, RemoteError, UnsafePath, ObjectFormatError) as e:
            print(f"sdbackup: {e}", file=sys.stderr)
            status.append(1)
        except KeyboardInterrupt:
            status.append(130)
        except BrokenPipeError:
            # The reader (``| head``) went away: stop quietly, as ls and cat do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status.append(0)

    try:
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(status[0] if status else 1)


if __name__ == "__main__":
    main()
