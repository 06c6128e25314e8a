"""The objects of small backups, built with ``sdbackup.objects`` as a client would build them."""

import os

import attrs

from sdbackup import hashing, objects
from sdbackup.objects import Kind, Node


@attrs.define
class Backup:
    """The objects of one small backup: ``/home/me`` with two files, one of them long enough
    to keep its chunks in a chunk list."""

    data: list
    lists: list
    trees: list
    snapshot_id: str
    snapshot: bytes
    tree_id: str


def make_backup(seed: str, host: str = "laptop", time_s: int = 1_700_000_000,
                shared: bytes = b"", paths: tuple = (b"/home/me",)) -> Backup:
    chunks = [os.urandom(3000) for _ in range(3)] + ([shared] if shared else [])
    data = [(hashing.chunk_id(c), c) for c in chunks]
    ids = [bytes.fromhex(i) for i, _ in data]
    chunk_list = objects.encode_chunk_list(ids[1:])
    list_id = objects.object_id(Kind.LIST, chunk_list)
    me = objects.encode_tree(objects.make_tree([
        Node(name=b"small", type="file", size=3000, content=(ids[0],)),
        Node(name=f"long \\ {seed}\n".encode() + b"\xff", type="file",
             size=3000 * (len(ids) - 1), content_lists=(bytes.fromhex(list_id),)),
    ]))
    me_id = objects.object_id(Kind.TREE, me)
    home = objects.encode_tree(objects.make_tree([
        Node(name=b"me", type="dir", mode=0o40755, subtree=bytes.fromhex(me_id))]))
    home_id = objects.object_id(Kind.TREE, home)
    root = objects.encode_tree(objects.make_tree([
        Node(name=b"home", type="dir", mode=0o40755, subtree=bytes.fromhex(home_id))]))
    root_id = objects.object_id(Kind.TREE, root)
    snapshot = objects.encode_snapshot(objects.Snapshot(
        time_ns=time_s * 10**9 + 500_000_000, host=host, paths=paths,
        tree=bytes.fromhex(root_id), tags=(seed,),
        summary={"files": 2, "dirs": 3, "bytes": sum(len(c) for c in chunks)}))
    return Backup(data, [(list_id, chunk_list)],
                  [(me_id, me), (home_id, home), (root_id, root)],
                  objects.object_id(Kind.SNAPSHOT, snapshot), snapshot, root_id)
