"""Encrypted repositories against a real cluster: what is at rest, restores, passwords, keys,
two repositories side by side, and a manager whose catalog was lost."""

import json
import os
import re
from pathlib import Path

MARKER = b"sdbackup-at-rest-marker-6b1f0c"
MARKER_NAME = "secret-name-9d2e7a"
PASSWORD = "correct horse battery staple"
KEY_LINE = re.compile(r"^([* ]) ([0-9a-f]{8})  ", re.MULTILINE)


def _env(cluster, password: str | None = PASSWORD, **more) -> dict:
    env = cluster.client_env()
    for name in ("SDBACKUP_PASSWORD", "SDBACKUP_PASSWORD_FILE", "SDBACKUP_NEW_PASSWORD",
                 "SDBACKUP_REPO"):
        env.pop(name, None)
    if password is not None:
        env["SDBACKUP_PASSWORD"] = password
    env.update(more)
    return env


def _run(run_sdbackup, cluster, *args, cwd: Path, password: str | None = PASSWORD,
         check: bool = True, **more):
    return run_sdbackup(*args, cwd=cwd, env=_env(cluster, password, **more), check=check)


def _make_source(root: Path) -> dict:
    src = root / "src"
    (src / MARKER_NAME).mkdir(parents=True)
    files = {
        f"{MARKER_NAME}/{MARKER_NAME}.txt": MARKER * 3 + b"\n",
        "small.txt": b"hello " + MARKER + b"\n",
        # Several chunks, each block its own random bytes: a block repeated 40 times would be
        # deduplicated to a few chunks, and the servers would rightly hold less than 2.5 MiB.
        "big.bin": b"".join(MARKER + os.urandom(64 * 1024) for _ in range(40)),
        "empty": b"",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


def _restored(target: Path) -> dict:
    found = {}
    for folder, _, names in os.walk(target):
        for name in names:
            path = Path(folder) / name
            found[str(path.relative_to(target))] = path.read_bytes()
    return found


def _files_under(folder: Path):
    for parent, _, names in os.walk(folder):
        for name in names:
            yield Path(parent) / name, name


def _key_ids(listing: str) -> list[tuple[str, str]]:
    return KEY_LINE.findall(listing)


def test_nothing_readable_at_rest_and_an_exact_restore(start_cluster, run_sdbackup, tmp_path):
    cluster = start_cluster(repository=None)
    files = _make_source(tmp_path)
    _run(run_sdbackup, cluster, "init", cwd=tmp_path)
    backup = _run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path)
    snapshot = cluster.snapshot_id(backup.stdout)

    # No byte of any server's data folder, nor of the manager's, holds the content or the name.
    held = 0
    for folder in [server.data for server in cluster.servers] + [cluster.manager_data]:
        for path, name in _files_under(folder):
            assert MARKER_NAME not in name, path
            data = path.read_bytes()
            held += len(data)
            assert MARKER not in data, path
            assert MARKER_NAME.encode() not in data, path
    assert held > 40 * 64 * 1024, "the servers hold less than the backup's data"

    listed = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path).stdout
    assert snapshot[:8] in listed and "src" in listed, listed
    _run(run_sdbackup, cluster, "restore", snapshot, "--target", tmp_path / "out", cwd=tmp_path)
    assert _restored(tmp_path / "out" / "src") == files

    # An unchanged second backup finds its parent among the decrypted snapshots: nothing new.
    again = _run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path)
    assert "(0 B new)" in again.stdout, again.stdout


def test_a_wrong_password_fails_and_writes_nothing(start_cluster, run_sdbackup, tmp_path):
    cluster = start_cluster(repository=None)
    _make_source(tmp_path)
    _run(run_sdbackup, cluster, "init", cwd=tmp_path)
    snapshot = cluster.snapshot_id(_run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path).stdout)
    stored = cluster.data_bytes()

    for args in (("restore", snapshot, "--target", tmp_path / "out"), ("backup", "src"),
                 ("snapshots",)):
        result = _run(run_sdbackup, cluster, *args, cwd=tmp_path, password="wrong", check=False)
        assert result.returncode == 1, result.describe()
        assert "wrong password" in result.stderr, result.describe()
    assert not (tmp_path / "out").exists()
    assert cluster.data_bytes() == stored

    # No password at all, and no terminal to ask on: a clear error too.
    result = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path, password=None, check=False)
    assert result.returncode == 1 and "password" in result.stderr, result.describe()
    # Nor can the repository be initialised a second time.
    result = _run(run_sdbackup, cluster, "init", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "initialised already" in result.stderr, result.describe()


def test_keys_added_listed_removed_and_a_password_changed(start_cluster, run_sdbackup, tmp_path):
    cluster = start_cluster(repository=None)
    _make_source(tmp_path)
    _run(run_sdbackup, cluster, "init", cwd=tmp_path)
    snapshot = cluster.snapshot_id(_run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path).stdout)
    (tmp_path / "second").write_text("second password\n")
    _run(run_sdbackup, cluster, "key", "add", "--new-password-file", tmp_path / "second",
         cwd=tmp_path)

    listing = _run(run_sdbackup, cluster, "key", "list", cwd=tmp_path).stdout
    keys = _key_ids(listing)
    assert len(keys) == 2 and [mark for mark, _ in keys].count("*") == 1, listing
    first = next(key for mark, key in keys if mark == "*")
    second = next(key for mark, key in keys if mark == " ")
    # The second password opens the same repository.
    by_file = _run(run_sdbackup, cluster, "snapshots", "--password-file", tmp_path / "second",
                   cwd=tmp_path, password=None).stdout
    assert snapshot[:8] in by_file, by_file

    refused = _run(run_sdbackup, cluster, "key", "remove", first, cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "opens" in refused.stderr, refused.describe()
    _run(run_sdbackup, cluster, "key", "remove", second, cwd=tmp_path)
    listing = _run(run_sdbackup, cluster, "key", "list", cwd=tmp_path).stdout
    assert [key for _, key in _key_ids(listing)] == [first], listing
    gone = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path, password="second password",
                check=False)
    assert gone.returncode == 1 and "wrong password" in gone.stderr, gone.describe()

    # passwd: the new password works, the old one no longer does, the data is the same.
    _run(run_sdbackup, cluster, "key", "passwd", cwd=tmp_path, SDBACKUP_NEW_PASSWORD="third one")
    old = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path, check=False)
    assert old.returncode == 1 and "wrong password" in old.stderr, old.describe()
    _run(run_sdbackup, cluster, "restore", snapshot, "--target", tmp_path / "out", cwd=tmp_path,
         password="third one")
    assert (tmp_path / "out" / "src" / "small.txt").read_bytes() == b"hello " + MARKER + b"\n"
    listing = _run(run_sdbackup, cluster, "key", "list", cwd=tmp_path, password="third one").stdout
    assert len(_key_ids(listing)) == 1, listing


def test_init_and_key_speak_json(start_cluster, run_sdbackup, tmp_path):
    cluster = start_cluster(repository=None)
    made = json.loads(_run(run_sdbackup, cluster, "init", "--json", cwd=tmp_path).stdout)
    assert made["message_type"] == "initialized" and made["repository"] == "default"
    assert made["encryption"] == "aes-256-gcm" and len(made["id"]) == 64
    added = json.loads(_run(run_sdbackup, cluster, "key", "add", "--json", cwd=tmp_path,
                            SDBACKUP_NEW_PASSWORD="second").stdout)
    assert added["message_type"] == "key_added"
    keys = json.loads(_run(run_sdbackup, cluster, "key", "list", "--json", cwd=tmp_path).stdout)
    assert sorted(k["id"] for k in keys) == sorted([made["id"], added["id"]])
    assert [k["id"] for k in keys if k["current"]] == [made["id"]]
    assert all(k["created"][:2] == "20" and k["hostName"] for k in keys), keys
    removed = json.loads(_run(run_sdbackup, cluster, "key", "remove", added["id"][:8], "--json",
                              cwd=tmp_path).stdout)
    assert (removed["message_type"], removed["id"]) == ("key_removed", added["id"])
    plain = json.loads(_run(run_sdbackup, cluster, "init", "--repo", "open", "--encryption", "none",
                            "--json", cwd=tmp_path, password=None).stdout)
    assert (plain["repository"], plain["encryption"]) == ("open", "none")


def test_two_repositories_each_with_its_own_key(start_cluster, run_sdbackup, tmp_path):
    cluster = start_cluster(repository=None)
    files = _make_source(tmp_path)
    _run(run_sdbackup, cluster, "init", "--repo", "alpha", cwd=tmp_path, password="alpha pw")
    _run(run_sdbackup, cluster, "init", "--repo", "beta", cwd=tmp_path, password="beta pw")
    a = cluster.snapshot_id(_run(run_sdbackup, cluster, "backup", "src", "--repo", "alpha",
                                 cwd=tmp_path, password="alpha pw").stdout)
    b = cluster.snapshot_id(_run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path,
                                 password="beta pw", SDBACKUP_REPO="beta").stdout)
    assert a != b  # the same files give other ids under another key

    alpha = _run(run_sdbackup, cluster, "snapshots", "--repo", "alpha", cwd=tmp_path,
                 password="alpha pw").stdout
    beta = _run(run_sdbackup, cluster, "snapshots", "--repo", "beta", cwd=tmp_path,
                password="beta pw").stdout
    assert a[:8] in alpha and b[:8] not in alpha, alpha
    assert b[:8] in beta and a[:8] not in beta, beta
    # beta's password does not open alpha; alpha's snapshot is no snapshot of beta.
    wrong = _run(run_sdbackup, cluster, "snapshots", "--repo", "alpha", cwd=tmp_path,
                 password="beta pw", check=False)
    assert wrong.returncode == 1 and "wrong password" in wrong.stderr, wrong.describe()
    other = _run(run_sdbackup, cluster, "restore", a, "--target", tmp_path / "x", "--repo", "beta",
                 cwd=tmp_path, password="beta pw", check=False)
    assert other.returncode == 1 and not (tmp_path / "x").exists(), other.describe()
    _run(run_sdbackup, cluster, "restore", b, "--target", tmp_path / "b", "--repo", "beta",
         cwd=tmp_path, password="beta pw")
    assert _restored(tmp_path / "b" / "src") == files

    # The default repository, never initialised, takes no backup: a client never falls back
    # to plaintext by itself.
    refused = _run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path, password=None, check=False)
    assert refused.returncode == 1 and "not initialised" in refused.stderr, refused.describe()
    assert "--encryption none" in refused.stderr, refused.describe()
    # Made plaintext on purpose, it works beside them and lists only its own snapshots; a
    # password given for it is refused (the user expects encryption).
    _run(run_sdbackup, cluster, "init", "--encryption", "none", cwd=tmp_path, password=None)
    plain = cluster.snapshot_id(_run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path,
                                     password=None).stdout)
    listed = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path, password=None).stdout
    assert plain[:8] in listed and a[:8] not in listed and b[:8] not in listed, listed
    refused = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "plaintext" in refused.stderr, refused.describe()
    # A plaintext repository has no keys to manage.
    refused = _run(run_sdbackup, cluster, "key", "list", cwd=tmp_path, password=None, check=False)
    assert refused.returncode == 1 and "plaintext" in refused.stderr, refused.describe()


def test_a_lost_catalog_is_rebuilt_with_the_keys(start_cluster, fast_manager_options, run_sdbackup,
                                                 tmp_path):
    cluster = start_cluster(manager_options=fast_manager_options, repository=None)
    files = _make_source(tmp_path)
    _run(run_sdbackup, cluster, "init", cwd=tmp_path)
    snapshot = cluster.snapshot_id(_run(run_sdbackup, cluster, "backup", "src", cwd=tmp_path).stdout)

    marks = cluster.restart_manager(wipe_catalog=True)
    cluster.wait_registered_since(marks)

    listed = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path).stdout
    assert snapshot[:8] in listed, listed
    _run(run_sdbackup, cluster, "restore", snapshot, "--target", tmp_path / "out", cwd=tmp_path)
    assert _restored(tmp_path / "out" / "src") == files
    wrong = _run(run_sdbackup, cluster, "snapshots", cwd=tmp_path, password="wrong", check=False)
    assert wrong.returncode == 1 and "wrong password" in wrong.stderr, wrong.describe()
