"""The ``sdbackup`` command line.

    sdbackup backup [PATH...] [--parent ID] [--force] [--tag TAG]... [--host NAME]
                    [-e|--exclude PATTERN]... [--iexclude PATTERN]... [--exclude-file FILE]...
                    [--iexclude-file FILE]... [--exclude-caches] [--exclude-if-present NAME[:HEADER]]...
                    [-x|--one-file-system] [--files-from FILE]... [--files-from-verbatim FILE]...
                    [--files-from-raw FILE]...
                                       back up files and folders (asks when none given)
    sdbackup snapshots [--host H]... [--path P]... [--tag TAG[,TAG]]... [--latest N]
                                       list snapshots (those the filters select)
    sdbackup tag (--add T | --remove T | --set T)... SNAPSHOT...
                                       change snapshots' tags (each gets a new id)
    sdbackup diff A B [--metadata]     what changed from snapshot A to B (+ - M T U)
    sdbackup find PATTERN... [--snapshot ID]...
                                       which snapshots hold paths matching the patterns
    sdbackup dump SNAPSHOT PATH        a file's bytes on stdout, or a folder as a tar stream
    sdbackup ls [SNAPSHOT] [PATH] [-l] list what a snapshot holds (at PATH)
    sdbackup restore SNAPSHOT --target DIR [-i|--include PATTERN]... [-e|--exclude PATTERN]...
                     [--iinclude PATTERN]... [--iexclude PATTERN]...
                     [--overwrite always|if-changed|if-newer|never] [--delete] [--dry-run]
    sdbackup status                    the manager's state and one line per storage server
    sdbackup check [--read-data]       verify every snapshot's objects and chunks (--read-data:
                                       admin only under TLS)
    sdbackup forget [ID...] [--keep-last N] [--keep-hourly N] [--keep-daily N] [--keep-weekly N]
                    [--keep-monthly N] [--keep-yearly N] [--keep-within DURATION]
                    [--keep-tag TAG[,TAG]]... [--host H]... [--path P]... [--tag TAG[,TAG]]...
                    [--group-by host,paths,tags] [--dry-run]
                                       unlist snapshots, by id or by restic's policies (admin
                                       only under TLS; no space is freed until prune exists)
    sdbackup server list               every storage server: disk identity, state, copies held
    sdbackup server drain ADDR [--no-wait]
                                       place nothing more on a server, copy its chunks elsewhere
                                       (admin only under TLS)
    sdbackup server retire ADDR        forget a dead or drained server (admin only under TLS)
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
same exit statuses. ``--quiet`` drops the bar, the status lines, notes and the text summary
(warnings and errors stay); ``--verbose`` names each entry a restore writes or deletes.
"""

import argparse
import datetime
import glob
import os
import shlex
import signal
import sys
import time

from twisted.internet import defer, task

from sdbackup import __version__, pki, retention, sealing
from sdbackup.client import diff, dump, find, jsonout, keys, overwrite, prune, servers, tagging
from sdbackup.client.backup import Backup
from sdbackup.client.listing import entry_line
from sdbackup.client.progress import Progress, human_bytes
from sdbackup.client.repository import Repository
from sdbackup.client.restore import Restore
from sdbackup.client.selection import PatternError, RestoreFilter, backup_selection, files_from
from sdbackup.client.session import ClientError, Session
from sdbackup.client.treereader import Enter, Entry, TreeReader
from sdbackup.limits import MAX_IDS
from sdbackup.memory import tune_gc
from sdbackup.objects import Kind, Node, ObjectFormatError, decode_chunk_list
from sdbackup.paths import UnsafePath, display_path, parse_path
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

    def clear(self):
        """Nothing: every line written is whole."""

    def finish(self):
        """Nothing: the summary follows."""

    def interrupted(self):
        """Nothing: every line written is whole."""


def progress_for(args) -> Progress:
    """A bar on a terminal, status lines with ``--json``; nothing with ``--quiet``."""
    if getattr(args, "quiet", False):
        return Progress(0, 0, enabled=False)
    return JsonStatus() if wants_json(args) else Progress(0, 0)


def lister(args, progress: Progress, dry_run: bool = False):
    """With ``--verbose``: a callback printing each entry a command writes or removes (``restored
    PATH``), as text or as restic's ``verbose_status`` lines; None otherwise."""
    if not getattr(args, "verbose", False):
        return None

    def listed(action: str, path: tuple | str):
        """``path``: a snapshot path's names, or a path already escaped for display."""
        progress.clear()
        item = path if isinstance(path, str) else display_path(path)
        if wants_json(args):
            print_json({"message_type": "verbose_status", "action": action, "item": item,
                        "dry_run": dry_run})
        else:
            print(f"{'would ' if dry_run else ''}{_VERBS[action][dry_run]} {item}")

    return listed


#: How --verbose names an action: as done, and as a dry run would do it.
_VERBS = {"restored": ("restored", "restore"), "deleted": ("deleted", "delete"),
          "new": ("new", "new"), "modified": ("modified", "modified")}


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
                          tags=tuple(args.tag), host=args.host, selection=args.selection,
                          listed=lister(args, progress)).run()
    progress.finish()
    quiet = getattr(args, "quiet", False)
    for note in () if quiet else result.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if wants_json(args):
        print_json(jsonout.backup_summary(result, progress.elapsed))
        return EXIT_INCOMPLETE if result.warnings else 0
    if quiet:
        return EXIT_INCOMPLETE if result.warnings else 0
    print(f"snapshot {_short(result.snapshot_id)} saved: {result.files} files, {result.dirs} folders, "
          f"{human_bytes(result.bytes)} ({human_bytes(result.new_bytes)} new) in {progress.elapsed:.1f}s"
          + (f"; {result.unchanged} unchanged files not read again" if result.unchanged else "")
          + (f"; parent {_short(result.parent)}" if result.parent else ""))
    return EXIT_INCOMPLETE if result.warnings else 0


async def cmd_snapshots(session: Session, args) -> int:
    snapshots = tagging.select(await Repository(session).snapshots(), args.host, args.path,
                               tagging.tag_lists(args.tag), args.latest)
    if wants_json(args):
        print_json([jsonout.snapshot(s) for s in snapshots])
        return 0
    # ENTRIES: every entry, folders too (the snapshot counts folders and the rest, not each type).
    print(f"{'ID':<8}  {'TIME':<19}  {'HOST':<16}  {'TAGS':<12}  {'ENTRIES':>7}  {'SIZE':>10}  PATHS")
    for s in snapshots:
        print(f"{_short(s.snapshot_id):<8}  {_timestamp(s.time):<19}  {s.host[:16]:<16}  "
              f"{','.join(s.tags):<12}  {s.files + s.dirs:>7}  {human_bytes(s.bytes):>10}  "
              f"{' '.join(s.paths)}")
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
    restore = Restore(session, args.snapshot, args.target, args.include, progress,
                      overwrite=args.overwrite, delete=args.delete, dry_run=args.dry_run,
                      listed=lister(args, progress, args.dry_run), excludes=args.exclude,
                      iincludes=args.iinclude, iexcludes=args.iexclude)
    result = await restore.run()
    progress.finish()
    quiet = getattr(args, "quiet", False)
    for note in () if quiet else result.notes:
        print(f"note: {note}", file=sys.stderr)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    if wants_json(args):
        summary = jsonout.restore_summary(result, args.target, progress.elapsed)
        summary.update(files_unchanged=result.unchanged, files_skipped=result.unchanged + result.skipped,
                       files_deleted=result.deleted, dry_run=result.dry_run)
        print_json(summary)
        return EXIT_INCOMPLETE if result.errors else 0
    if not quiet:
        print(restore_line(result, args.target))
    return EXIT_INCOMPLETE if result.errors else 0


def restore_line(result, target: str) -> str:
    """The restore's summary: what was written, left and deleted, and whether all of it is
    verified (every byte written is; a failed entry was not written)."""
    left = [f"{result.unchanged} unchanged"] if result.unchanged else []
    if result.skipped:
        left.append(f"{result.skipped} kept (--overwrite)")
    if result.deleted:
        left.append(f"{result.deleted} deleted")
    counts = (f"{result.files} files, {result.folders} folders, {result.others} links and special "
              f"files, {human_bytes(result.bytes)}" + "".join(f", {part}" for part in left))
    if result.dry_run:
        return (f"snapshot {_short(result.snapshot_id)} into {target}, dry run (nothing written or "
                f"deleted): would restore {counts}"
                + (f"; {len(result.errors)} entries would fail" if result.errors else ""))
    if result.errors:
        verdict = f"{len(result.errors)} entries failed and were not restored; what was written is verified"
    else:
        verdict = "every byte verified"
    return f"snapshot {_short(result.snapshot_id)} restored to {target}: {counts}; {verdict}"


async def cmd_status(session: Session, args) -> int:
    status = await session.ask(StatusRequest())
    if wants_json(args):
        print_json(jsonout.status(status))
        return 0
    print(f"{'SERVER':<28} {'STATE':<6} {'FREE':>11} {'CHUNKS':>8}  LAST SEEN")
    now = time.time()
    for s in status.servers:
        state = "alive" if s.alive else "dead"
        dead_for = "" if s.alive else f" (dead for {servers.duration(now - s.last_seen)})"
        print(f"{display_address(s.address):<28} {state:<6} {human_bytes(s.free_bytes):>11} "
              f"{s.chunks:>8}  {_timestamp(s.last_seen)}{dead_for}")
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
        + ("; their data stays until a prune" if forgotten and not args.prune else ""))
    pruned = None
    if args.prune:
        pruned = await prune.run_prune(session, False, sys.stderr.isatty() and not as_json)
    if as_json:
        result = jsonout.forget(groups, policy, False, forgotten, len(ids) - forgotten)
        if pruned is not None:
            result["prune"] = prune.as_json(pruned)
        print_json(result)
    elif pruned is not None:
        return prune.report(pruned, False)
    if pruned is not None and pruned.state == "failed":
        print(f"sdbackup: prune failed: {pruned.error}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {
    "backup": cmd_backup,
    "snapshots": cmd_snapshots,
    "ls": cmd_ls,
    "restore": cmd_restore,
    "status": cmd_status,
    "check": cmd_check,
    "forget": cmd_forget,
    "prune": prune.cmd_prune,
    "server": servers.cmd_server,
    "tag": tagging.cmd_tag,
    "diff": diff.cmd_diff,
    "find": find.cmd_find,
    "dump": dump.cmd_dump,
    "init": keys.cmd_init,
    "key": keys.cmd_key,
}
#: Commands that read or store no snapshot: they open no repository (and need no password).
WITHOUT_REPOSITORY = {"status", "check", "server", "prune", "init", "key"}


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


def tls_files(args) -> list:
    """The CA, certificate and key files: each from its option, else from
    ``$SDBACKUP_TLS_CA/CERT/KEY`` (None where neither gives it)."""
    return [getattr(args, f"tls_{name}", None) or os.environ.get(f"SDBACKUP_TLS_{name.upper()}")
            for name in ("ca", "cert", "key")]


def transport_of(args) -> Transport:
    """TLS from ``tls_files`` (all three: ``main`` refused some), else loopback only."""
    files = tls_files(args)
    insecure = getattr(args, "insecure", False)
    if not any(files):
        return Transport(insecure=insecure)
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
    manager.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                         help="no progress and no summary: only warnings and errors (with --json: "
                              "the summary only)")
    manager.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="backup: name each new or modified file it reads; restore: each "
                              "entry written or deleted (with --dry-run: that would be)")
    manager.add_argument("--repo", default=argparse.SUPPRESS, metavar="NAME",
                         help="the repository (default: $SDBACKUP_REPO or default); one made "
                              "with init is encrypted")
    manager.add_argument("--password-file", default=argparse.SUPPRESS, metavar="FILE",
                         help="the repository's password, in a file (default: $SDBACKUP_PASSWORD, "
                              "$SDBACKUP_PASSWORD_FILE, or asked on the terminal)")
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
    p.add_argument("-e", "--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out what matches PATTERN, as restic does: * ? [abc] within a name, "
                        "** for any folders; /... anchored at the root, else at any depth; "
                        "!PATTERN includes again (repeatable)")
    p.add_argument("--iexclude", action="append", default=[], metavar="PATTERN",
                   help="--exclude, ignoring case (repeatable)")
    p.add_argument("--exclude-file", action="append", default=[], metavar="FILE",
                   help="--exclude each pattern of FILE: one a line, # comments, $VAR and ~ "
                        "expanded (repeatable)")
    p.add_argument("--iexclude-file", action="append", default=[], metavar="FILE",
                   help="--exclude-file, ignoring case (repeatable)")
    p.add_argument("--exclude-caches", action="store_true",
                   help="leave out the contents of folders tagged with a CACHEDIR.TAG file "
                        "(the tag file itself is kept)")
    p.add_argument("--exclude-if-present", action="append", default=[], metavar="NAME[:HEADER]",
                   help="leave out the contents of folders holding a file NAME (that begins with "
                        "HEADER), except that file (repeatable)")
    p.add_argument("-x", "--one-file-system", action="store_true",
                   help="do not cross into other mounted file systems (a mount point is kept, empty)")
    p.add_argument("--files-from", action="append", default=[], metavar="FILE",
                   help="back up the paths in FILE too: one a line, # comments, globs expanded "
                        "(repeatable)")
    p.add_argument("--files-from-verbatim", action="append", default=[], metavar="FILE",
                   help="back up the paths in FILE, every non-empty line as it is (repeatable)")
    p.add_argument("--files-from-raw", action="append", default=[], metavar="FILE",
                   help="back up the paths in FILE, separated by NUL bytes (repeatable)")
    p = sub.add_parser("snapshots", parents=[manager], help="list snapshots")
    add_snapshot_filters(p)
    p.add_argument("--latest", type=int, default=0, metavar="N",
                   help="only the N newest snapshots of each host and set of paths")
    p = sub.add_parser("tag", parents=[manager],
                       help="change snapshots' tags (each gets a new id, as in restic)")
    p.add_argument("snapshots", nargs="+", metavar="SNAPSHOT", help="snapshot ids (or prefixes) or 'latest'")
    p.add_argument("--add", action="append", default=[], metavar="TAG[,TAG]",
                   help="add these tags (repeatable)")
    p.add_argument("--remove", action="append", default=[], metavar="TAG[,TAG]",
                   help="remove these tags (repeatable)")
    p.add_argument("--set", action="append", default=None, metavar="TAG[,TAG]",
                   help="replace every tag with these (repeatable; --set '' removes them all)")
    p = sub.add_parser("diff", parents=[manager], help="show what changed from one snapshot to another")
    p.add_argument("old", metavar="SNAPSHOT", help="the first snapshot (id, prefix or 'latest')")
    p.add_argument("new", metavar="SNAPSHOT", help="the second snapshot (id, prefix or 'latest')")
    p.add_argument("--metadata", action="store_true",
                   help="also show entries whose metadata only changed (U)")
    p = sub.add_parser("find", parents=[manager], help="find which snapshots hold matching paths")
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="a glob on names (a pattern with / on whole paths; ** for any folders)")
    p.add_argument("--snapshot", action="append", default=[], metavar="ID",
                   help="look only in this snapshot (repeatable; default: all)")
    p = sub.add_parser("dump", parents=[manager],
                       help="write a file of a snapshot to stdout, or a folder as a tar stream")
    p.add_argument("snapshot", help="snapshot id (or a prefix) or 'latest'")
    p.add_argument("path", metavar="PATH", help="a path in the snapshot, as ls shows it ('/': all)")
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
    p.add_argument("-i", "--include", action="append", default=[], metavar="PATTERN",
                   help="restore only what matches: a path as ls shows it (from the snapshot's "
                        "root), or a pattern as backup --exclude takes (repeatable)")
    p.add_argument("-e", "--exclude", action="append", default=[], metavar="PATTERN",
                   help="do not restore what matches (repeatable)")
    p.add_argument("--iinclude", action="append", default=[], metavar="PATTERN",
                   help="--include, ignoring case (repeatable)")
    p.add_argument("--iexclude", action="append", default=[], metavar="PATTERN",
                   help="--exclude, ignoring case (repeatable)")
    p.add_argument("--overwrite", choices=overwrite.MODES, default=overwrite.DEFAULT_MODE,
                   help="an entry already at a restored path: always replaced; if-changed: left "
                        "when its type, size and mtime are the snapshot's (default); if-newer: "
                        "replaced when the snapshot's is newer; never: left")
    p.add_argument("--delete", action="store_true",
                   help="delete what the restored folders hold and the snapshot does not "
                        "(only inside the target; links are removed, never followed)")
    p.add_argument("--dry-run", action="store_true",
                   help="write and delete nothing; say what would be (--verbose: each entry)")
    sub.add_parser("status", parents=[manager], help="show the manager's state and the servers")
    p = sub.add_parser("init", parents=[manager],
                       help="initialise the repository (--repo): encrypted, with a new key and "
                            "password, unless --encryption none")
    p.add_argument("--encryption", choices=(sealing.ENCRYPTED, sealing.NONE), default=sealing.ENCRYPTED,
                   help="aes-256-gcm (the default): names and contents are sealed on the client; "
                        "none: a plaintext repository, stored as it is")
    p.add_argument("--new-password-file", metavar="FILE",
                   help="its password, in a file (default: the password as any command takes "
                        "it, else $SDBACKUP_NEW_PASSWORD, else asked twice)")
    p = sub.add_parser("key", help="list, add and remove an encrypted repository's keys (passwords)")
    key = p.add_subparsers(dest="key_command", required=True)
    key.add_parser("list", parents=[manager], help="the repository's keys (* the one in use)")
    for name, what in (("add", "add a key: another password for the repository"),
                       ("passwd", "change the password: add a key and remove the one in use")):
        p = key.add_parser(name, parents=[manager], help=what)
        p.add_argument("--new-password-file", metavar="FILE",
                       help="the new password, in a file (default: $SDBACKUP_NEW_PASSWORD, "
                            "or asked twice)")
    p = key.add_parser("remove", parents=[manager],
                       help="remove a key (never the last one, nor the one in use)")
    p.add_argument("id", metavar="ID", help="the key, as key list shows it")
    p = sub.add_parser("server", help="list, drain and retire storage servers")
    server = p.add_subparsers(dest="server_command", required=True)
    server.add_parser("list", parents=[manager],
                      help="every server the manager knows: disk identity, state, copies held")
    p = server.add_parser("drain", parents=[manager],
                          help="place nothing more on a server and copy its chunks to the others "
                               "(admin only under TLS)")
    p.add_argument("address", metavar="ADDR", help="the server, as server list shows it (or its "
                                                   "port, or host:port)")
    p.add_argument("--no-wait", action="store_true",
                   help="return at once (the drain goes on in the manager)")
    p = server.add_parser("retire", parents=[manager],
                          help="forget a dead or drained server whose chunks all have their "
                               "copies elsewhere (admin only under TLS)")
    p.add_argument("address", metavar="ADDR", help="the server, as server list shows it (or its "
                                                   "port, or host:port)")
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
    add_snapshot_filters(p)
    p.add_argument("--group-by", default="host,paths", metavar="FIELDS",
                   help="apply the policy to each group of snapshots sharing these of host, "
                        "paths, tags (default: host,paths; '' for one group)")
    p.add_argument("--dry-run", action="store_true", help="show what would be forgotten, forget nothing")
    p.add_argument("--prune", action="store_true",
                   help="then prune: delete the data no snapshot references any more")
    p = sub.add_parser("prune", parents=[manager],
                       help="delete data no snapshot references, trim copies above the factor")
    p.add_argument("--dry-run", action="store_true", help="report what would be freed, delete nothing")
    return parser


def add_snapshot_filters(p: argparse.ArgumentParser):
    """``--host``, ``--path`` and ``--tag``, as ``snapshots`` and ``forget`` take them
    (``retention.matches``'s semantics)."""
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="only snapshots of this host (repeatable)")
    p.add_argument("--path", action="append", default=[], metavar="PATH",
                   help="only snapshots that include this path (repeatable: all of them)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG[,TAG]",
                   help="only snapshots with all of these tags (repeatable: any entry)")


def check_forget(parser: argparse.ArgumentParser, args):
    """Usage errors of ``forget``, before any connection: a policy that cannot be read, ids
    with a policy, no ids and no policy (restic too refuses to forget everything)."""
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


def check_selection(parser: argparse.ArgumentParser, args):
    """Read the selection options of backup (the files they name, before any connection) and
    check restore's. A pattern or a file that cannot be read, or a glob of ``--files-from``
    that matches nothing, is a usage error; a path listed that is not there fails as a PATH
    argument does (exit 1)."""
    try:
        if args.command == "restore":
            RestoreFilter(args.include, args.exclude, args.iinclude, args.iexclude)
            return
        args.selection = backup_selection(args)
        listed = files_from(args, glob.glob)
    except PatternError as e:
        parser.error(f"{args.command}: {e}")
    if (args.files_from or args.files_from_verbatim or args.files_from_raw) and not (args.paths or listed):
        parser.error("backup: the --files-from files name no path")
    args.paths = [*args.paths, *listed]


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
    # --quiet: not even "the manager is starting; waiting".
    notice = (lambda text: None) if getattr(args, "quiet", False) else None
    session = Session(reactor, manager_endpoint(manager), notice=notice, transport=transport_of(args))
    try:
        await session.connect()
        if args.command not in WITHOUT_REPOSITORY:
            await keys.open_repository(session, args)
        return await COMMANDS[args.command](session, args)
    finally:
        await session.close()


#: Exit statuses after SIGINT (Ctrl-C) and SIGTERM, as a shell reports a process they killed.
EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        parser.error("--quiet and --verbose contradict each other: give one")
    if args.command == "forget":
        check_forget(parser, args)
    if args.command == "tag" and not (args.add or args.remove or args.set is not None):
        parser.error("tag: give --add, --remove or --set")
    if args.command == "tag" and args.set is not None and (args.add or args.remove):
        parser.error("tag: --set replaces every tag: give it without --add and --remove")
    if args.command != "tls" and any(tls_files(args)) and not all(tls_files(args)):
        parser.error("give all of --tls-ca, --tls-cert and --tls-key (or $SDBACKUP_TLS_CA, "
                     "$SDBACKUP_TLS_CERT, $SDBACKUP_TLS_KEY), or none")
    if args.command == "dump" and wants_json(args):
        parser.error("dump writes the file or a tar stream: it has no --json output")
    if args.command == "tls":
        if wants_json(args):
            parser.error("tls has no --json output")
        try:
            sys.exit(cmd_tls(args))
        except (pki.CertificateError, OSError) as e:
            print(f"sdbackup: {e}", file=sys.stderr)
            sys.exit(1)
    if args.command in ("backup", "restore"):
        check_selection(parser, args)
    if args.command == "backup" and not args.paths:
        try:
            args.paths = ask_for_paths(ask=ask_on_stderr if wants_json(args) else input)
        except ClientError as e:
            print(f"\nsdbackup: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(EXIT_ON_SIGNAL[signal.SIGINT])
    tune_gc()  # (every module is imported by now: frozen out of the collector's work)
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
