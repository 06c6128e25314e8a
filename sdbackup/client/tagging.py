"""Tags and snapshot filters: ``sdbackup tag`` and the filters of ``sdbackup snapshots``.

A snapshot object is content-addressed and cannot change, so ``tag``, as restic's,
writes a new snapshot object with the new tags and everything else as it was, its
``original`` naming the first snapshot of the line, and asks the manager to list it
instead of the old one (``ReplaceSnapshot``). The manager does that in one catalog
transaction, only when both hold the same root tree, host and paths, deletes the old
object on every server and remembers it as forgotten, so an index rebuilt from the
servers lists the new one only. The new snapshot has a new id.

The filters are ``forget``'s (``sdbackup.retention.matches``): ``--host`` any of
those given, ``--path`` all of those given, ``--tag a,b`` all of a and b, any of the
``--tag`` options; ``--latest N`` keeps the N newest of each host and set of paths.
"""

import sys

import attrs

from sdbackup import hashing, objects, retention
from sdbackup.client import jsonout
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError, Session
from sdbackup.client.uploader import Signal, Uploader
from sdbackup.limits import snapshot_problem
from sdbackup.objects import Kind
from sdbackup.protocols.messages import ReplaceSnapshot, SnapshotSummary


def tag_values(values: list[str]) -> list[str]:
    """``--add a,b --add c`` -> ``["a", "b", "c"]`` (restic takes both forms)."""
    return [t for value in values for t in value.split(",") if t]


def tag_lists(values: list[str]) -> list[tuple[str, ...]]:
    """``--tag a,b --tag c`` -> ``[("a", "b"), ("c",)]``: each entry's tags are all required."""
    return [tuple(t for t in value.split(",") if t) for value in values if value.strip(",")]


def select(snapshots: list[SnapshotSummary], hosts=(), paths=(), tags=(), latest: int = 0
           ) -> list[SnapshotSummary]:
    """The snapshots (oldest first) the filters select; ``latest``: only the N newest of each
    host and set of paths."""
    chosen = [s for s in snapshots if retention.matches(
        retention.Item(s.snapshot_id, s.time, s.host, s.paths, s.tags), hosts, paths, tags)]
    if latest > 0:
        seen: dict[tuple, int] = {}
        newest = []
        for s in reversed(chosen):
            key = (s.host, tuple(sorted(s.paths)))
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= latest:
                newest.append(s)
        chosen = newest[::-1]
    return chosen


def new_tags(tags, add=(), remove=(), set_to=None) -> tuple[str, ...]:
    """The tags after a change: ``set_to`` replaces them all, else ``add`` then ``remove``;
    sorted, each once (as the snapshot object stores them)."""
    result = set(tags) if set_to is None else set(set_to)
    result |= set(add)
    result -= set(remove)
    return tuple(sorted(result))


def retagged(snapshot: objects.Snapshot, snapshot_id: str, tags: tuple) -> objects.Snapshot:
    """The snapshot with ``tags``, its ``original`` the first of its line (restic's), one
    generation on."""
    return attrs.evolve(snapshot, tags=tags, original=snapshot.original or bytes.fromhex(snapshot_id),
                        generation=snapshot.generation + 1)


@attrs.frozen
class TagChange:
    old_id: str
    new_id: str
    tags: tuple


async def change_tags(session: Session, refs: list[str], add=(), remove=(), set_to=None
                      ) -> tuple[list[TagChange], list[str]]:
    """Retag each snapshot named: the changes made, and the ids of those already so tagged."""
    repository = Repository(session)
    chosen: dict[str, SnapshotSummary] = {}
    for ref in refs:
        summary = await repository.resolve(ref)
        chosen[summary.snapshot_id] = summary
    warnings: list[str] = []
    uploader = Uploader(session, Signal(), warnings.append)
    changes, unchanged = [], []
    for snapshot_id in chosen:
        snapshot = await repository.load_snapshot(snapshot_id)
        tags = new_tags(snapshot.tags, add, remove, set_to)
        if tags == tuple(sorted(snapshot.tags)):
            unchanged.append(snapshot_id)
            continue
        problem = snapshot_problem(chosen[snapshot_id].host, chosen[snapshot_id].paths, list(tags))
        if problem:
            raise ClientError(f"cannot tag {snapshot_id[:8]}: the snapshot's {problem}")
        data = objects.encode_snapshot(retagged(snapshot, snapshot_id, tags))
        sealer = getattr(session, "sealer", None)  # (an encrypted repository's, as backup's)
        if sealer is not None:
            data = sealer.seal(Kind.SNAPSHOT, data)
        new_id = objects.object_id(Kind.SNAPSHOT, data)
        await uploader.store_now(Kind.SNAPSHOT, bytes.fromhex(new_id), data, hashing.checksum(data))
        reply = await session.ask(ReplaceSnapshot(snapshot_id=new_id, replaces=snapshot_id))
        changes.append(TagChange(snapshot_id, reply.snapshot.snapshot_id, tags))
    return changes, unchanged


async def cmd_tag(session: Session, args) -> int:
    changes, unchanged = await change_tags(
        session, args.snapshots, tag_values(args.add), tag_values(args.remove),
        None if args.set is None else tag_values(args.set))
    if getattr(args, "json", False):
        for change in changes:
            print(jsonout.dumps({"message_type": "changed", "old_snapshot_id": change.old_id,
                                 "new_snapshot_id": change.new_id, "tags": list(change.tags)}))
        print(jsonout.dumps({"message_type": "summary", "changed_snapshots": len(changes),
                             "unchanged_snapshots": len(unchanged)}))
        return 0
    for change in changes:
        print(f"old snapshot ID: {change.old_id[:8]} -> new snapshot ID: {change.new_id[:8]} "
              f"(tags: {','.join(change.tags) or '-'})")
    for snapshot_id in unchanged:
        print(f"snapshot {snapshot_id[:8]}: tags unchanged", file=sys.stderr)
    print(f"modified tags on {len(changes)} snapshots")
    return 0
