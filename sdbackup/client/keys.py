"""Repositories from the client's side: the password, opening a repository's key,
``sdbackup init`` and ``sdbackup key list|add|remove|passwd``.

A repository (``--repo NAME``, else ``$SDBACKUP_REPO``, else ``default``) must be
initialised before anything is backed up to or read from it, as restic's and
borg's are. ``sdbackup init`` makes it encrypted: its key objects hold its
master key, wrapped under each password, and every command opens the master key
with the password before it reads or stores anything; a wrong one ends the
command (exit 1) with nothing written. ``sdbackup init --encryption none`` (borg's
``--encryption=none``) makes it plaintext on purpose: its one key object is a
mark that holds no key. A client never falls back to plaintext by itself: a
repository with no key object is refused, and so is one whose keys mix the two
kinds, or a plaintext one given a password (a sign the user expects encryption),
so that nobody can make a client store plaintext by hiding or adding keys.

The password comes from ``--password-file``, ``$SDBACKUP_PASSWORD``,
``$SDBACKUP_PASSWORD_FILE``, or a prompt on a terminal, the first given; a new
one (``init``, ``key add``, ``key passwd``) from ``--new-password-file``,
``$SDBACKUP_NEW_PASSWORD``, or a prompt asked twice.
"""

import datetime
import getpass
import os
import pwd
import socket
import sys

import attrs
from twisted.internet.threads import deferToThread

from sdbackup import hashing, sealing
from sdbackup.client import jsonout
from sdbackup.client.repository import Repository
from sdbackup.client.session import ClientError, Session
from sdbackup.client.uploader import Signal, Uploader
from sdbackup.objects import Kind, ObjectFormatError
from sdbackup.protocols.messages import CommitKey, ListKeys, RemoveKey

#: Bytes of a password file read at most.
MAX_PASSWORD = 4096


@attrs.frozen
class OpenedKey:
    """A key object of the repository, as listed."""

    key_id: str
    key: sealing.KeyObject


def repo_name(args) -> str:
    name = getattr(args, "repo", None) or os.environ.get("SDBACKUP_REPO") or sealing.DEFAULT_REPO
    problem = sealing.repo_problem(name)
    if problem:
        raise ClientError(f"--repo: {problem}")
    return name


def _read_password_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD + 1)
    except OSError as e:
        raise ClientError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if len(data) > MAX_PASSWORD:
        raise ClientError(f"the {what} file {path} is longer than {MAX_PASSWORD} bytes")
    password = data.rstrip(b"\r\n")
    if not password:
        raise ClientError(f"the {what} file {path} is empty")
    return password


def given_password(args) -> bytes | None:
    """The password given without a prompt, or None: the command line's ``--password-file``
    first, then ``$SDBACKUP_PASSWORD``, then ``$SDBACKUP_PASSWORD_FILE``."""
    if getattr(args, "password_file", None):
        return _read_password_file(args.password_file, "password")
    if os.environ.get("SDBACKUP_PASSWORD"):
        return os.environ["SDBACKUP_PASSWORD"].encode()
    if os.environ.get("SDBACKUP_PASSWORD_FILE"):
        return _read_password_file(os.environ["SDBACKUP_PASSWORD_FILE"], "password")
    return None


def _prompt(text: str) -> bytes:
    if not sys.stdin.isatty():
        raise ClientError("the repository is encrypted: give its password with $SDBACKUP_PASSWORD, "
                          "$SDBACKUP_PASSWORD_FILE or --password-file (no terminal to ask on)")
    password = getpass.getpass(text).encode()
    if not password:
        raise ClientError("an empty password")
    return password


def new_password(args) -> bytes:
    """A new password: ``--new-password-file``, ``$SDBACKUP_NEW_PASSWORD``, or asked twice."""
    path = getattr(args, "new_password_file", None)
    if path:
        return _read_password_file(path, "new password")
    if os.environ.get("SDBACKUP_NEW_PASSWORD"):
        return os.environ["SDBACKUP_NEW_PASSWORD"].encode()
    first = _prompt("new password: ")
    if _prompt("the new password again: ") != first:
        raise ClientError("the two passwords differ")
    return first


async def list_keys(session: Session, repo: str) -> list[OpenedKey]:
    """The repository's key objects, each read from the cluster and checked."""
    reply = await session.ask(ListKeys(repo=repo))
    repository = Repository(session)
    found = []
    for key_id in reply.key_ids:
        data = await repository.fetch_object(Kind.KEY, key_id)
        try:
            key = sealing.decode_key(data)
        except ObjectFormatError as e:
            raise ClientError(f"key {key_id[:8]} of repository {repo} cannot be read: {e}") from None
        if key.repo != repo:
            raise ClientError(f"key {key_id[:8]} is of repository {key.repo!r}, not {repo!r}")
        found.append(OpenedKey(key_id, key))
    return found


async def _unwrap_any(keys: list[OpenedKey], password: bytes) -> tuple[OpenedKey, bytes]:
    for opened in keys:
        try:
            return opened, await deferToThread(sealing.unwrap, opened.key, password)
        except sealing.WrongPassword:
            continue
    raise ClientError(f"wrong password for repository {keys[0].key.repo}: no key of it opens "
                      f"with it")


def _not_initialised(repo: str) -> ClientError:
    flag = "" if repo == sealing.DEFAULT_REPO else f" --repo {repo}"
    return ClientError(f"repository {repo} is not initialised: run sdbackup init{flag} (encrypted, "
                       f"the default), or sdbackup init{flag} --encryption none for a plaintext one")


async def open_repository(session: Session, args) -> str | None:
    """Put the repository's sealer on the session; the id of the key in use (None for a
    plaintext repository)."""
    repo = repo_name(args)
    keys = await list_keys(session, repo)
    if not keys:
        raise _not_initialised(repo)
    plain = [k for k in keys if k.key.encryption == sealing.NONE]
    if plain and len(plain) < len(keys):
        raise ClientError(f"repository {repo} has both encryption keys and a plaintext mark "
                          f"(key {plain[0].key_id[:8]}): it cannot be both; if you did not make the "
                          f"mark, remove it with sdbackup key remove {plain[0].key_id[:8]}")
    password = given_password(args)
    if plain:
        if password is not None:
            raise ClientError(f"repository {repo} is plaintext (initialised with --encryption "
                              f"none), yet a password was given: give no password for it")
        session.sealer = sealing.PlainSealer(repo)
        return None
    opened, master = await _unwrap_any(keys, password or _prompt(f"password for repository {repo}: "))
    session.sealer = sealing.Sealer(repo, master)
    return opened.key_id


async def _store_key(session: Session, key: sealing.KeyObject, first: bool = False) -> str:
    """Store a key object and have the manager list it; ``first``: the repository's first
    (the manager refuses it when another client initialised the repository meanwhile)."""
    data = sealing.encode_key(key)
    key_id = sealing.key_id(data)
    signal = Signal()
    uploader = Uploader(session, signal, lambda text: print(f"sdbackup: {text}", file=sys.stderr))
    await uploader.store_now(Kind.KEY, bytes.fromhex(key_id), data, hashing.checksum(data))
    await session.ask(CommitKey(key_id=key_id, first=first))
    return key_id


def _say(args, text: str, **fields):
    """A command's outcome: ``text``, or with ``--json`` one object (restic's shapes)."""
    print(jsonout.dumps(fields) if getattr(args, "json", False) else text)


def _key_json(opened: OpenedKey, current: str) -> dict:
    """A key as ``key list --json`` shows it (restic's fields)."""
    key = opened.key
    return {"current": opened.key_id == current, "id": opened.key_id, "userName": key.user,
            "hostName": key.host, "created": jsonout.rfc3339_ns(key.created_ns)}


def _who() -> tuple[str, str]:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return socket.gethostname()[:255], user[:255]


async def _new_key(session: Session, repo: str, master: bytes, password: bytes,
                   first: bool = False) -> str:
    host, user = _who()
    key = await deferToThread(sealing.wrap, master, repo, password, host, user)
    return await _store_key(session, key, first)


async def cmd_init(session: Session, args) -> int:
    repo = repo_name(args)
    if await list_keys(session, repo):
        raise ClientError(f"repository {repo} is initialised already (see sdbackup key list)")
    if args.encryption == sealing.NONE:
        if given_password(args) is not None:
            raise ClientError("--encryption none: a plaintext repository has no password; give none")
        key_id = await _store_key(session, sealing.plaintext_mark(repo, *_who()), first=True)
        _say(args, f"created plaintext repository {repo} (mark {key_id[:8]}): file names and "
                   f"contents are stored as they are, readable by whoever can read the servers' disks",
             message_type="initialized", repository=repo, id=key_id, encryption=sealing.NONE)
        return 0
    password = given_password(args) or new_password(args)
    key_id = await _new_key(session, repo, sealing.new_master_key(), password, first=True)
    _say(args, f"created encrypted repository {repo} with key {key_id[:8]}; keep the password safe: "
               f"without it nothing in the repository can be read",
         message_type="initialized", repository=repo, id=key_id, encryption=sealing.ENCRYPTED)
    return 0


async def cmd_key(session: Session, args) -> int:
    repo = repo_name(args)
    keys = await list_keys(session, repo)
    if not keys:
        raise _not_initialised(repo)
    encrypted = [k for k in keys if k.key.encryption != sealing.NONE]
    if not encrypted:
        raise ClientError(f"repository {repo} is plaintext (initialised with --encryption none): "
                          f"it has no keys to manage")
    # A plaintext mark beside the keys (slipped in by another client) is listed, and a password
    # that opens a key may remove it.
    password = given_password(args) or _prompt(f"password for repository {repo}: ")
    current, master = await _unwrap_any(encrypted, password)
    if args.key_command == "list" and getattr(args, "json", False):
        ordered = sorted(keys, key=lambda k: k.key.created_ns)
        print(jsonout.dumps([_key_json(k, current.key_id) for k in ordered]))
        return 0
    if args.key_command == "list":
        print(f"{'':1} {'ID':8}  {'created':19}  {'host':20}  user")
        for opened in sorted(keys, key=lambda k: k.key.created_ns):
            key = opened.key
            created = datetime.datetime.fromtimestamp(key.created_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
            mark = "*" if opened.key_id == current.key_id else " "
            plain = "  (plaintext mark: remove it)" if key.encryption == sealing.NONE else ""
            print(f"{mark} {opened.key_id[:8]}  {created}  {key.host[:20]:20}  {key.user}{plain}")
        return 0
    if args.key_command == "add":
        key_id = await _new_key(session, repo, master, new_password(args))
        _say(args, f"added key {key_id[:8]} to repository {repo}", message_type="key_added",
             repository=repo, id=key_id)
        return 0
    if args.key_command == "passwd":
        key_id = await _new_key(session, repo, master, new_password(args))
        await session.ask(RemoveKey(key_id=current.key_id))
        _say(args, f"changed the password of repository {repo}: key {key_id[:8]} added, "
                   f"key {current.key_id[:8]} removed", message_type="password_changed",
             repository=repo, id=key_id, removed=current.key_id)
        return 0
    matches = [k for k in keys if k.key_id.startswith(args.id)]
    if len(matches) != 1:
        raise ClientError(f"no key {args.id!r} in repository {repo}" if not matches
                          else f"{args.id!r} names several keys")
    if matches[0].key_id == current.key_id:
        raise ClientError(f"key {args.id} is the one this password opens: remove it with another "
                          f"password (or use sdbackup key passwd)")
    await session.ask(RemoveKey(key_id=matches[0].key_id))
    _say(args, f"removed key {matches[0].key_id[:8]} from repository {repo}",
         message_type="key_removed", repository=repo, id=matches[0].key_id)
    return 0
