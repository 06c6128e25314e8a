"""The ``sdbackup`` command line.

    sdbackup backup PATH...            back up files and folders (asks when none given)
    sdbackup snapshots                 list snapshots
    sdbackup ls [SNAPSHOT]             list a snapshot's files
    sdbackup restore SNAPSHOT --target DIR [--include PATH]...
    sdbackup status                    one line per storage server

The manager is ``--manager ENDPOINT``, else ``$SDBACKUP_MANAGER``, else
``tcp:localhost:5000``.
"""

import argparse
import datetime
import os
import sys

from twisted.internet import defer, task

from sdbackup.client.backup import Backup
from sdbackup.client.progress import Progress, human_bytes
from sdbackup.client.restore import Restore, list_snapshot
from sdbackup.client.session import ClientError, Session
from sdbackup.paths import UnsafePath
from sdbackup.protocols.messages import CheckRequest, ListSnapshots, StatusRequest
from sdbackup.protocols.peer import RemoteError

DEFAULT_MANAGER = "tcp:localhost:5000"
#: Exit status when the command finished but some files were skipped or failed.
EXIT_INCOMPLETE = 3


def display_address(address: str) -> str:
    """``host:port`` for a ``tcp:host:port`` endpoint, the endpoint itself otherwise."""
    kind, _, rest = address.partition(":")
    return rest if kind == "tcp" and rest.count(":") == 1 else address


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


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
    result = await Backup(session, paths, progress).run()
    progress.finish()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"snapshot {result.snapshot_id} saved: {result.entries} files and folders, "
          f"{human_bytes(result.bytes)} ({human_bytes(result.new_bytes)} new) "
          f"in {progress.elapsed:.1f}s" + (f"; {result.unchanged} unchanged files not read again"
                                          if result.unchanged else ""))
    return EXIT_INCOMPLETE if result.warnings else 0


async def cmd_snapshots(session: Session, args) -> int:
    reply = await session.ask(ListSnapshots())
    print(f"{'ID':<10} {'TIME':<19}  {'HOST':<16} {'FILES':>7} {'SIZE':>11}  PATHS")
    for s in reply.snapshots:
        print(f"{s.snapshot_id:<10} {_timestamp(s.time):<19}  {s.host[:16]:<16} {s.files:>7} "
              f"{human_bytes(s.bytes):>11}  {' '.join(s.paths)}")
    return 0


async def cmd_ls(session: Session, args) -> int:
    async for page in list_snapshot(session, args.snapshot):
        for f in page.files:
            where = ""
            if args.long and f.chunks:
                servers = sorted({display_address(h) for c in f.chunks
                                  for h in page.holders.get(c.chunk_id, [])})
                where = "  [" + " ".join(servers) + "]"
            suffix = "/" if f.kind == "dir" else f" -> {f.link_target}" if f.link_target else ""
            if args.long:
                print(f"{f.kind:<7} {f.mode:04o} {f.size:>12} {f.chunk_count:>5} chunks  "
                      f"{f.path}{suffix}{where}")
            else:
                print(f"{f.path}{suffix}")
    return 0


async def cmd_restore(session: Session, args) -> int:
    progress = Progress(0, 0)
    result = await Restore(session, args.snapshot, args.target, args.include, progress).run()
    progress.finish()
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"snapshot {result.snapshot_id} restored to {args.target}: {result.entries} files and folders, "
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
    print(f"{alive} of {len(status.servers)} servers alive; replication factor "
          f"{status.replicas}; {status.chunks} chunks in use, "
          f"{status.under_replicated} under-replicated, {status.missing} missing")
    return 0


async def cmd_check(session: Session, args) -> int:
    report = await session.ask(CheckRequest(read_data=args.read_data))
    what = "re-hashed every chunk" if args.read_data else "listed their chunks"
    print(f"{len(report.servers_checked)} servers {what}: "
          f"{' '.join(display_address(s) for s in report.servers_checked) or '-'}")
    for server in report.servers_unreachable:
        print(f"unreachable: {display_address(server)}")
    print(f"{report.chunks} chunks in use: {report.missing} missing, "
          f"{report.under_replicated} under-replicated, {report.corrupt} corrupt copies found")
    if report.missing:
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
    sub.add_parser("snapshots", parents=[manager], help="list snapshots")
    p = sub.add_parser("ls", parents=[manager], help="list the files of a snapshot")
    p.add_argument("snapshot", nargs="?", default="latest", help="snapshot id or 'latest'")
    p.add_argument("-l", "--long", action="store_true",
                   help="show kind, mode, size, chunks and the servers holding them")
    p = sub.add_parser("restore", parents=[manager], help="restore a snapshot")
    p.add_argument("snapshot", help="snapshot id or 'latest'")
    p.add_argument("--target", required=True, help="folder to restore into")
    p.add_argument("--include", action="append", default=[], metavar="PATH",
                   help="restore only this path of the snapshot (repeatable)")
    sub.add_parser("status", parents=[manager], help="show the cluster's servers")
    p = sub.add_parser("check", parents=[manager],
                       help="verify the catalog against the servers (exit 1: data lost, 3: degraded)")
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
        except (ClientError, RemoteError, UnsafePath) as e:
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
