"""The ``sdbackup`` command line.

    sdbackup backup [PATH...] [--parent ID] [--force] [--tag TAG]... [--host NAME]
                                       back up files and folders (asks when none given)
    sdbackup snapshots                 list snapshots
    sdbackup ls [SNAPSHOT] [PATH] [-l] list what a snapshot holds (at PATH)
    sdbackup restore SNAPSHOT --target DIR [--include PATH]...
    sdbackup status                    the manager's state and one line per storage server
    sdbackup check [--read-data]       verify every snapshot's objects and chunks (--read-data:
                                       admin only under TLS)
    sdbackup forget [ID...] [--keep-last N] [--keep-hourly N] [--keep-daily N] [--keep-weekly N]
                    [--keep-monthly N] [--keep-yearly N] [--keep-within DURATION]
                    [--keep-tag TAG[,TAG]]... [--host H]... [--path P]... [--tag TAG[,TAG]]...
                    [--group-by host,paths,tags] [--dry-run]
                                       unlist snapshots, by id or by restic's policies (admin
                                       only under TLS; no space is freed until prune exists)
    sdbackup tls ca --dir DIR          create a cluster CA: DIR/ca.crt, DIR/ca.key
    sdbackup tls cert --dir DIR --role ROLE --name NAME [--host HOST]...
                                       issue DIR/NAME.crt and DIR/NAME.key for a role

The manager is ``--manager ENDPOINT``, else ``$SDBACKUP_MANAGER``, else
``tcp:localhost:5000``. ``--tls-ca/--tls-cert/--tls-key`` (else
``$SDBACKUP_TLS_CA/CERT/KEY``) make every link mutual TLS; without them only
loopback addresses are reached, unless ``--insecure``. Names in paths are shown, and typed, escaped as
``sdbackup.names.escape`` does (a backslash, a control character or a byte
that is not UTF-8 becomes ``\\``, ``\\n``, ``\\xff``...).

``--json`` (before or after the command) prints results as JSON on stdout and nothing else,
in restic's shapes (``sdbackup.client.jsonout``): instead of a bar, backup and restore print a
status line a second, then a summary; notes, warnings and errors stay text on stderr, with the
same exit statuses.
"""

import argparse
import datetime
import os
import shlex
import signal
import sys

from twisted.internet import defer, task

from sdbackup import __version__, pki, retention
from sdbackup.client import jsonout
from sdbackup.client.backup import Backup
from sdbackup.client.listing import entry_line
from sdbackup.client.progress import Progress, human_bytes
from sdbackup.client.repository import Repository
from sdbackup.client.restore import Restore
from sdbackup.client.session import ClientError, Session
from sdbackup.client.treereader import Enter, Entry, TreeReader
from sdbackup.limits import MAX_IDS
from sdbackup.objects import Kind, Node, ObjectFormatError, decode_chunk_list
from sdbackup.paths import UnsafePath, parse_path
from sdbackup.protocols.messages import CheckRequest, ForgetSnapshots, StatusRequest
from sdbackup.protocols.peer import RemoteError
from sdbackup.tlsconfig import TLSConfigError, Transport, load_identity

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


def wants_json(args) -> bool:
    return getattr(args, "json", False)


def print_json(value):
    print(jsonout.dumps(value))


class JsonStatus(Progress):
    """restic's ``--json`` status lines on stdout instead of a bar: one a second at most, the
    first after a second (a short command prints its summary only)."""

    INTERVAL = 1.0

    def __init__(self, stream=None):
        super().__init__(0, 0, stream=stream or sys.stdout, enabled=True)
        self._last_status = self.started

    def draw(self, now: float):
        if now - self._last_status >= self.INTERVAL:
            self._last_status = now
            self.stream.write(jsonout.dumps(jsonout.status_line(self.counts(now))) + "\n")
            self.stream.flush()

    def finish(self):
        """Nothing: the summary follows."""

    def interrupted(self):
        """Nothing: every line written is whole."""


def progress_for(args) -> Progress:
    return JsonStatus() if wants_json(args) else Progress(0, 0)


def ask_on_stderr(prompt: str) -> str:
    """``input`` with the prompt on stderr: with ``--json``, stdout carries JSON only."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def ask_for_paths(stdin=None, ask=input) -> list[str]:
    """The files or folders to back up, typed at a prompt: several, separated by spaces (quote a
    name holding one), with ``~`` expanded as a shell would."""
    stdin = stdin or sys.stdin
    if not stdin.isatty():
        raise ClientError("give the files or folders to back up")
    try:
        answer = ask("File names to back up: ")
    except EOFError:
        raise ClientError("no file name given") from None
    try:
        paths = [os.path.expanduser(p) for p in shlex.split(answer)]
    except ValueError as e:
        raise ClientError(f"cannot read those names: {e}") from None
    if not paths:
        raise ClientError("no file name given")
    return paths


async def cmd_backup(session: Session, args) -> int:
    progress = progress_for(args)
    result = await Backup(session, args.paths, progress=progress, parent=args.parent, force=args.force,
                          tags=tuple(args.tag), host=args.host).run()
    progress.finish()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if wants_json(args):
        print_json(jsonout.backup_summary(result, progress.elapsed))
        return EXIT_INCOMPLETE if result.warnings else 0
    print(f"snapshot {_short(result.snapshot_id)} saved: {result.files} files, {result.dirs} folders, "
          f"{human_bytes(result.bytes)} ({human_bytes(result.new_bytes)} new) in {progress.elapsed:.1f}s"
          + (f"; {result.unchanged} unchanged files not read again" if result.unchanged else "")
          + (f"; parent {_short(result.parent)}" if result.parent else ""))
    return EXIT_INCOMPLETE if result.warnings else 0


async def cmd_snapshots(session: Session, args) -> int:
    snapshots = await Repository(session).snapshots()
    if wants_json(args):
        print_json([jsonout.snapshot(s) for s in snapshots])
        return 0
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

    async def show(path: tuple, entry: Node, holders: dict | None):
        """One line of the listing: text as ``ls`` shows it, or one JSON object."""
        chunks = (await _chunk_holders(repository, entry, holders)
                  if args.chunks and entry.type == "file" else None)
        if wants_json(args):
            out.write(jsonout.dumps(jsonout.node(path, entry, *(chunks or (None, None)))) + "\n")
            return
        suffix = (f"  {chunks[0]} chunk{'' if chunks[0] == 1 else 's'}  [{' '.join(chunks[1])}]"
                  if chunks else "")
        out.write(entry_line(path, entry, args.long) + suffix + "\n")

    node = None
    if names:
        node = await repository.find(snapshot.tree, b"/".join(names))
        if node is None:
            raise ClientError(f"{args.path}: not in snapshot {_short(summary.snapshot_id)}")
    if wants_json(args):
        out.write(jsonout.dumps(jsonout.listed_snapshot(summary)) + "\n")
    if node is not None and node.type != "dir":
        await show(names, node, None)
        return 0
    errors = 0
    async for event in reader.walk(node.subtree if node else snapshot.tree, prefix=names, node=node):
        if isinstance(event, Entry):
            await show(event.path, event.node, event.holders)
        elif isinstance(event, Enter) and event.node is not None:
            await show(event.path, event.node, None)
            if event.error:
                out.flush()
                print(f"error: {event.error}", file=sys.stderr)
                errors += 1
    return EXIT_INCOMPLETE if errors else 0


async def _chunk_holders(repository: Repository, node: Node, holders: dict | None):
    """How many chunks a file has, and the servers holding them (sorted addresses)."""
    ids = [c.hex() for c in node.content]
    for list_id in node.content_lists:
        data = await repository.fetch_object(Kind.LIST, list_id.hex())
        ids.extend(c.hex() for c in decode_chunk_list(data))
    missing = [i for i in dict.fromkeys(ids) if holders is None or i not in holders]
    located = dict(holders or {})
    if missing:
        located.update(await repository.locate(missing))
    return len(ids), sorted({display_address(h) for i in ids for h in located.get(i, [])})


async def cmd_restore(session: Session, args) -> int:
    progress = progress_for(args)
    result = await Restore(session, args.snapshot, args.target, args.include, progress).run()
    progress.finish()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    if wants_json(args):
        print_json(jsonout.restore_summary(result, args.target, progress.elapsed))
        return EXIT_INCOMPLETE if result.errors else 0
    print(f"snapshot {_short(result.snapshot_id)} restored to {args.target}: {result.files} files, "
          f"{result.folders} folders, {result.others} links and special files, "
          f"{human_bytes(result.bytes)}, "
          + (f"{len(result.errors)} failed" if result.errors else "every byte verified"))
    return EXIT_INCOMPLETE if result.errors else 0


async def cmd_status(session: Session, args) -> int:
    status = await session.ask(StatusRequest())
    if wants_json(args):
        print_json(jsonout.status(status))
        return 0
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
    if wants_json(args):
        print_json(jsonout.check(report, args.read_data))
    else:
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


def _tag_lists(values: list[str]) -> list[tuple[str, ...]]:
    """``--tag a,b --tag c`` -> ``[("a", "b"), ("c",)]``: each entry's tags are all required."""
    return [tuple(t for t in value.split(",") if t) for value in values if value.strip(",")]


def policy_of(args) -> retention.Policy:
    """The ``--keep-*`` options as a policy; ``PolicyError`` says what is wrong."""
    within = retention.Duration.parse(args.keep_within) if args.keep_within else retention.Duration()
    return retention.Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                            weekly=args.keep_weekly, monthly=args.keep_monthly,
                            yearly=args.keep_yearly, within=within, tags=_tag_lists(args.keep_tag))


def _item(summary) -> retention.Item:
    return retention.Item(summary.snapshot_id, summary.time, summary.host, summary.paths,
                          summary.tags)


def _snapshot_table(items: list[retention.Item], reasons: dict | None) -> list[str]:
    """restic's table of a group's kept (with reasons) or removed snapshots, one line for each
    further reason."""
    reason_width = max((len(r) for rs in (reasons or {}).values() for r in rs), default=0)
    reason_head = f"  {'REASONS':<{reason_width}}" if reasons is not None else ""
    lines = [f"{'ID':<8}  {'TIME':<19}  {'HOST':<16}  {'TAGS':<12}{reason_head}  PATHS"]
    for item in items:
        why = (reasons or {}).get(item.snapshot_id, [""])
        reason = f"  {why[0]:<{reason_width}}" if reasons is not None else ""
        lines.append(f"{_short(item.snapshot_id):<8}  {_timestamp(item.time):<19}  "
                     f"{item.host[:16]:<16}  {','.join(item.tags):<12}{reason}  "
                     f"{' '.join(item.paths)}")
        for more in why[1:]:
            lines.append(f"{'':<8}  {'':<19}  {'':<16}  {'':<12}  {more:<{reason_width}}")
    return lines


def _group_title(key: tuple) -> str:
    named = {"host": lambda v: f"host [{v}]", "paths": lambda v: f"paths [{', '.join(v)}]",
             "tags": lambda v: f"tags [{', '.join(v)}]"}
    return ", ".join(named[name](value) for name, value in key)


async def cmd_forget(session: Session, args) -> int:
    """restic's ``forget``: the snapshots named, or those no ``--keep-*`` rule keeps in their
    group. Only the listing changes: the data they reference stays until a prune."""
    as_json = wants_json(args)

    def say(*lines: str):
        if not as_json:
            for line in lines:
                print(line)

    repository = Repository(session)
    groups = []
    if args.ids:
        chosen = {}
        for ref in args.ids:
            summary = await repository.resolve(ref)
            chosen[summary.snapshot_id] = summary
        doomed = retention.newest_first([_item(s) for s in chosen.values()])
        groups.append(jsonout.forget_group(None, doomed))
        say(f"{'would forget' if args.dry_run else 'forgetting'} {len(doomed)} snapshots:",
            *_snapshot_table(doomed, None))
    else:
        items = [_item(s) for s in await repository.snapshots()]
        items = [i for i in items if retention.matches(i, args.host, args.path, _tag_lists(args.tag))]
        say(f"Applying Policy: {args.policy}")
        doomed = []
        for decision in retention.decide(items, args.policy, args.group_by,
                                         session.reactor.seconds()):
            groups.append(jsonout.forget_group(decision, decision.remove))
            if decision.key:
                say(f"snapshots for ({_group_title(decision.key)}):")
            say(f"keep {len(decision.keep)} snapshots:", *_snapshot_table(decision.keep, decision.reasons))
            if decision.remove:
                say(f"remove {len(decision.remove)} snapshots:", *_snapshot_table(decision.remove, None))
            say("")
            doomed.extend(decision.remove)
    policy = None if args.ids else str(args.policy)
    if args.dry_run:
        say(f"{len(doomed)} snapshots would be forgotten (--dry-run: nothing changed)")
        if as_json:
            print_json(jsonout.forget(groups, policy, True, None))
        return 0
    forgotten = 0
    ids = [item.snapshot_id for item in doomed]
    for start in range(0, len(ids), MAX_IDS):
        reply = await session.ask(ForgetSnapshots(snapshot_ids=ids[start : start + MAX_IDS]))
        forgotten += len(reply.snapshot_ids)
    say(f"{forgotten} snapshots forgotten"
        + (f" ({len(ids) - forgotten} were forgotten already)" if forgotten < len(ids) else "")
        + ("; their data stays until a prune, which is not built yet" if forgotten else ""))
    if as_json:
        print_json(jsonout.forget(groups, policy, False, forgotten, len(ids) - forgotten))
    return 0


COMMANDS = {
    "backup": cmd_backup,
    "snapshots": cmd_snapshots,
    "ls": cmd_ls,
    "restore": cmd_restore,
    "status": cmd_status,
    "check": cmd_check,
    "forget": cmd_forget,
}


def cmd_tls(args) -> int:
    """``sdbackup tls ca|cert``: files only, no cluster needed."""
    if args.tls_command == "ca":
        pki.save_ca(args.dir, pki.create_ca(args.name or "sdbackup cluster CA"))
        cert_path, key_path = pki.ca_paths(args.dir)
        print(f"created the cluster CA: {cert_path} (give it to every process with --tls-ca) and "
              f"{key_path} (keep it secret: it can issue certificates)")
        return 0
    issued = pki.issue(pki.load_ca(args.dir), args.role, args.name,
                       tuple(args.host) if args.host else pki.DEFAULT_HOSTS)
    cert_path, key_path = pki.save_certificate(args.dir, args.name, issued)
    hosts = ", ".join(args.host or pki.DEFAULT_HOSTS)
    article = "an" if args.role[0] in "aeiou" else "a"
    print(f"issued {article} {args.role} certificate {cert_path} and key {key_path} for {hosts}")
    return 0


def transport_of(args) -> Transport:
    """TLS from the options, else from ``$SDBACKUP_TLS_CA/CERT/KEY``; else loopback only."""
    files = [getattr(args, f"tls_{name}", None) or os.environ.get(f"SDBACKUP_TLS_{name.upper()}")
             for name in ("ca", "cert", "key")]
    insecure = getattr(args, "insecure", False)
    if not any(files):
        return Transport(insecure=insecure)
    if not all(files):
        raise ClientError("give all of --tls-ca, --tls-cert and --tls-key (or $SDBACKUP_TLS_CA, "
                          "$SDBACKUP_TLS_CERT, $SDBACKUP_TLS_KEY), or none")
    try:
        identity = load_identity(*files)
    except TLSConfigError as e:
        raise ClientError(str(e)) from None
    if identity.role not in ("client", "admin"):
        raise ClientError(f"{files[1]} is a {identity.role}'s certificate; the client needs one "
                          f"issued with --role client or --role admin")
    return Transport(tls=identity, insecure=insecure)


def build_parser() -> argparse.ArgumentParser:
    manager = argparse.ArgumentParser(add_help=False)
    manager.add_argument("--manager", default=argparse.SUPPRESS,
                         help="manager endpoint (default: $SDBACKUP_MANAGER or tcp:localhost:5000)")
    manager.add_argument("--tls-ca", default=argparse.SUPPRESS, metavar="FILE",
                         help="the cluster CA's certificate (default: $SDBACKUP_TLS_CA)")
    manager.add_argument("--tls-cert", default=argparse.SUPPRESS, metavar="FILE",
                         help="this client's certificate (default: $SDBACKUP_TLS_CERT)")
    manager.add_argument("--tls-key", default=argparse.SUPPRESS, metavar="FILE",
                         help="this client's key (default: $SDBACKUP_TLS_KEY)")
    manager.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                         help="without TLS, reach addresses other than loopback (plaintext)")
    manager.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print results as JSON on stdout, nothing else (names escaped as "
                              "in listings; ls: one object per line)")
    parser = argparse.ArgumentParser(prog="sdbackup", parents=[manager],
                                     description="Back up to and restore from an sdbackup cluster.")
    parser.add_argument("--version", action="version", version=f"sdbackup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tls", help="create the cluster CA and certificates")
    tls = p.add_subparsers(dest="tls_command", required=True)
    p = tls.add_parser("ca", help="create a cluster CA: DIR/ca.crt and DIR/ca.key (0600)")
    p.add_argument("--dir", required=True, help="folder for the CA's files")
    p.add_argument("--name", help="the CA's common name")
    p = tls.add_parser("cert", help="issue DIR/NAME.crt and DIR/NAME.key with the CA in DIR")
    p.add_argument("--dir", required=True, help="folder of the CA, and of the new files")
    p.add_argument("--role", required=True, choices=pki.ROLES, help="what the holder may do")
    p.add_argument("--name", required=True, help="the certificate's name (and its files')")
    p.add_argument("--host", action="append", metavar="HOST",
                   help="a host name or IP address the holder is reached at (repeatable; "
                        "default: localhost and 127.0.0.1)")
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
    p = sub.add_parser("forget", parents=[manager],
                       help="unlist snapshots by id or by policy (restic's --keep-* rules)")
    p.add_argument("ids", nargs="*", metavar="ID", help="snapshots to forget (ids or prefixes)")
    for name, what in (("last", "the N newest snapshots"),
                       ("hourly", "the newest snapshot of each of the N newest hours"),
                       ("daily", "the newest snapshot of each of the N newest days"),
                       ("weekly", "the newest snapshot of each of the N newest ISO weeks"),
                       ("monthly", "the newest snapshot of each of the N newest months"),
                       ("yearly", "the newest snapshot of each of the N newest years")):
        p.add_argument(f"--keep-{name}", type=int, default=0, metavar="N",
                       help=f"keep {what} (-1: all of them)")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep every snapshot made within DURATION (such as 1y2m3d4h) of the newest")
    p.add_argument("--keep-tag", action="append", default=[], metavar="TAG[,TAG]",
                   help="keep every snapshot with all of these tags (repeatable)")
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="only snapshots of this host (repeatable)")
    p.add_argument("--path", action="append", default=[], metavar="PATH",
                   help="only snapshots that include this path (repeatable: all of them)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG[,TAG]",
                   help="only snapshots with all of these tags (repeatable: any entry)")
    p.add_argument("--group-by", default="host,paths", metavar="FIELDS",
                   help="apply the policy to each group of snapshots sharing these of host, "
                        "paths, tags (default: host,paths; '' for one group)")
    p.add_argument("--dry-run", action="store_true", help="show what would be forgotten, forget nothing")
    p.add_argument("--prune", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_forget(parser: argparse.ArgumentParser, args):
    """Usage errors of ``forget``, before any connection: a policy that cannot be read, ids
    with a policy, no ids and no policy (restic too refuses to forget everything)."""
    if args.prune:
        parser.error("forget --prune: prune is not built yet (forget unlists snapshots but frees "
                     "no space)")
    try:
        args.policy = policy_of(args)
        args.group_by = retention.parse_group_by(args.group_by)
    except retention.PolicyError as e:
        parser.error(f"forget: {e}")
    if args.ids and (not args.policy.empty or args.host or args.path or args.tag):
        parser.error("forget: give snapshot ids, or --keep-* options (and filters), not both")
    if not args.ids and args.policy.empty:
        parser.error("forget: no snapshot ids and no --keep-* option: refusing to forget every "
                     "snapshot")


def manager_endpoint(text: str) -> str:
    """The manager's client endpoint from what a user may type: ``tcp:HOST:PORT``, ``HOST:PORT``
    or a bare ``PORT`` (on localhost)."""
    text = text.strip()
    if text.isdigit():
        text = f"tcp:localhost:{text}"
    elif not text.startswith("tcp:") and text.count(":") == 1:
        text = f"tcp:{text}"
    kind, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"--manager {text!r}: give PORT, HOST:PORT or tcp:HOST:PORT")
    return text


async def run(reactor, args) -> int:
    manager = getattr(args, "manager", None) or os.environ.get("SDBACKUP_MANAGER") or DEFAULT_MANAGER
    session = Session(reactor, manager_endpoint(manager), transport=transport_of(args))
    try:
        await session.connect()
        return await COMMANDS[args.command](session, args)
    finally:
        await session.close()


#: Exit statuses after SIGINT (Ctrl-C) and SIGTERM, as a shell reports a process they killed.
EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "forget":
        check_forget(parser, args)
    if args.command == "tls":
        if wants_json(args):
            parser.error("tls has no --json output")
        try:
            sys.exit(cmd_tls(args))
        except (pki.CertificateError, OSError) as e:
            print(f"sdbackup: {e}", file=sys.stderr)
            sys.exit(1)
    if args.command == "backup" and not args.paths:
        try:
            args.paths = ask_for_paths(ask=ask_on_stderr if wants_json(args) else input)
        except ClientError as e:
            print(f"\nsdbackup: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(EXIT_ON_SIGNAL[signal.SIGINT])
    status = []
    received = []

    async def go(reactor):
        command = defer.ensureDeferred(run(reactor, args))

        def interrupt(signum, frame):
            # The command is cancelled, so what it holds is closed and cleaned up by its own
            # ``finally`` clauses (a restore's temporary file, the connections) before the exit.
            if received:  # a second one: the user will not wait for the clean-up
                os._exit(EXIT_ON_SIGNAL[signum])
            received.append(signum)
            reactor.callFromThread(command.cancel)

        def install():
            for signum in EXIT_ON_SIGNAL:
                signal.signal(signum, interrupt)

        # Twisted puts its own handlers (which stop the reactor at once) in place just after
        # the reactor starts running: ours go in after them.
        reactor.callLater(0, install)
        try:
            status.append(await command)
        except Exception:
            if not received:
                raise
            # Whatever the cancelled step made of it (a lost connection, an error): interrupted.
            if sys.stderr.isatty():
                sys.stderr.write("\n")  # end the progress line
            print("sdbackup: interrupted", file=sys.stderr)
            status.append(EXIT_ON_SIGNAL[received[0]])

    async def report_errors(reactor):
        try:
            await go(reactor)
        except (ClientError, RemoteError, UnsafePath, ObjectFormatError) as e:
            print(f"sdbackup: {e}", file=sys.stderr)
            status.append(1)
        except BrokenPipeError:
            # The reader (``| head``) went away: stop quietly, as ls and cat do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status.append(0)

    try:
        task.react(lambda reactor: defer.ensureDeferred(report_errors(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(status[0] if status else 1)


if __name__ == "__main__":
    main()
