"""Path rules: how local paths are named in a snapshot, and where a restore may write."""

import os

import pytest

from sdbackup.paths import (
    UnsafePath,
    check_snapshot_path,
    path_in_include,
    snapshot_path,
    target_path,
)

# --- snapshot_path --------------------------------------------------------------------


def test_relative_paths_keep_their_name(subtests):
    for local, expected in [
        ("docs", "docs"),
        ("some/folder", "some/folder"),
        ("some/folder/", "some/folder"),
        ("./some//folder/./x", "some/folder/x"),
        ("a/b/../c", "a/c"),
        ("ü/日本", "ü/日本"),
    ]:
        with subtests.test(local=local):
            assert snapshot_path(local, cwd="/home/me/work") == expected


def test_other_paths_are_made_absolute_without_the_leading_slash(subtests):
    for local, expected in [
        ("/etc/passwd", "etc/passwd"),
        ("/etc/../var/log/", "var/log"),
        ("//srv/data", "srv/data"),
        ("..", "home/me"),
        ("../other", "home/me/other"),
        ("a/../../x", "home/me/x"),
        (".", "home/me/work"),
        ("./", "home/me/work"),
    ]:
        with subtests.test(local=local):
            assert snapshot_path(local, cwd="/home/me/work") == expected


def test_root_cannot_be_named():
    for local in ("/", "//", "/..", "/etc/.."):
        with pytest.raises(UnsafePath):
            snapshot_path(local)
    with pytest.raises(UnsafePath):
        snapshot_path("../../..", cwd="/home/me/work")


def test_relative_name_uses_the_current_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert snapshot_path("..") == str(tmp_path.parent).lstrip("/")


def test_snapshot_names_pass_the_restore_check():
    for local in ("docs", "/etc/hosts", "../x", ".", "./a/../b//c/"):
        name = snapshot_path(local, cwd="/home/me/work")
        assert check_snapshot_path(name) == name


# --- check_snapshot_path --------------------------------------------------------------


def test_good_snapshot_paths():
    for path in ("a", "a/b/c", "home/me/.bashrc", "..hidden", "a/...", "ü/日本", "a b"):
        assert check_snapshot_path(path) == path


UNSAFE = [
    "",
    "/etc/passwd",
    "/",
    "..",
    "../x",
    "a/../../x",
    "a/..",
    ".",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "/a",
    "a\\b",
    "..\\..\\windows",
    "a\x00b",
    "\x00",
]


def test_unsafe_snapshot_paths(subtests):
    for path in UNSAFE:
        with subtests.test(path=path):
            with pytest.raises(UnsafePath) as raised:
                check_snapshot_path(path)
            assert raised.value.code == "unsafe-path"


# --- target_path ------------------------------------------------------------------------


@pytest.fixture
def target(tmp_path):
    folder = tmp_path / "restore"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def test_nested_paths_land_under_the_target(target):
    root = os.path.realpath(target)
    assert target_path(str(target), "a") == os.path.join(root, "a")
    assert target_path(str(target), "a/b/c.txt") == os.path.join(root, "a", "b", "c.txt")
    (target / "a" / "b").mkdir(parents=True)
    assert target_path(str(target), "a/b/c.txt") == os.path.join(root, "a", "b", "c.txt")


def test_unsafe_names_are_refused(target):
    for path in ("../escape", "/etc/passwd", "a/../../escape", ""):
        with pytest.raises(UnsafePath):
            target_path(str(target), path)


def test_link_to_outside_as_parent_is_refused(target, outside):
    (target / "out").symlink_to(outside)
    with pytest.raises(UnsafePath):
        target_path(str(target), "out/file")
    with pytest.raises(UnsafePath):
        target_path(str(target), "out/deeper/file")
    assert list(outside.iterdir()) == []


def test_link_deeper_in_the_tree_is_refused(target, outside):
    (target / "a" / "b").mkdir(parents=True)
    (target / "a" / "b" / "link").symlink_to(outside)
    with pytest.raises(UnsafePath):
        target_path(str(target), "a/b/link/file")


def test_relative_link_climbing_out_is_refused(target, outside):
    (target / "up").symlink_to(os.path.join("..", "outside"))
    with pytest.raises(UnsafePath):
        target_path(str(target), "up/file")


def test_link_to_a_sibling_sharing_the_targets_name_is_refused(tmp_path, target):
    sibling = tmp_path / "restore-evil"
    sibling.mkdir()
    (target / "x").symlink_to(sibling)
    with pytest.raises(UnsafePath):
        target_path(str(target), "x/file")


def test_link_pointing_inside_the_target_is_accepted(target):
    (target / "real").mkdir()
    (target / "alias").symlink_to(target / "real")
    assert target_path(str(target), "alias/file") == os.path.join(os.path.realpath(target), "alias", "file")


def test_target_reached_through_a_link_is_accepted(tmp_path, target):
    (tmp_path / "via").symlink_to(target)
    assert target_path(str(tmp_path / "via"), "a/b") == os.path.join(os.path.realpath(target), "a", "b")


def test_restoring_into_the_root_folder():
    # ``restore --target /`` puts files back where they came from, as ``tar -C /`` does.
    name = "sdbackup-unit-test-does-not-exist"
    assert target_path("/", f"{name}/file") == f"/{name}/file"
    assert target_path("/", name) == f"/{name}"


# --- path_in_include ----------------------------------------------------------------------


def test_no_includes_means_everything():
    assert path_in_include("any/path", [])


def test_path_in_include(subtests):
    for path, includes, expected in [
        ("home/me", ["home/me"], True),
        ("home/me/docs/a.txt", ["home/me"], True),
        ("home", ["home/me"], True),  # a folder above an include is restored, to hold it
        ("home/me", ["/home/me/"], True),
        ("home/mere", ["home/me"], False),
        ("home/me2/x", ["home/me"], False),
        ("hom", ["home/me"], False),
        ("etc/hosts", ["home/me"], False),
        ("home/you", ["home/me"], False),
        ("etc/hosts", ["home/me", "etc"], True),
        ("var", ["home/me", "etc"], False),
    ]:
        with subtests.test(path=path, includes=includes):
            assert path_in_include(path, includes) is expected
