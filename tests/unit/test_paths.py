"""Path rules: how local paths are named in a snapshot, names, paths typed by users."""


import pytest

from sdbackup.paths import (
    UnsafePath,
    check_name,
    display_path,
    parse_path,
    snapshot_path,
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
        ("-rf", "-rf"),  # names that sort before "." are names too
        ("!x", "!x"),
        (" x", " x"),
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


# --- check_name -------------------------------------------------------------------------


def test_names_are_any_bytes_but_slash_and_nul():
    for name in (b"a", b"..hidden", b"...", b"new\nline", b"back\\slash", b"\xff\xfe", b"x" * 255, b" "):
        assert check_name(name) == name


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", "text"])
def test_names_that_are_not_names_are_refused(name):
    with pytest.raises(UnsafePath):
        check_name(name)


# --- parse_path and display_path -----------------------------------------------------------


def test_paths_typed_as_ls_shows_them(subtests):
    for text, names in [
        ("", ()),
        ("/", ()),
        ("a", (b"a",)),
        ("a/b/c", (b"a", b"b", b"c")),
        ("/a//b/", (b"a", b"b")),
        ("caf\\xc3\\xa9/\\xff", ("café".encode(), b"\xff")),
        ("new\\nline/back\\\\slash", (b"new\nline", b"back\\slash")),
        ("..hidden/...", (b"..hidden", b"...")),
    ]:
        with subtests.test(text=text):
            assert parse_path(text) == names


@pytest.mark.parametrize("text", ["..", "a/../b", "./a", "a/.", "a\\x00b"])
def test_paths_with_dot_names_are_refused(text):
    with pytest.raises(UnsafePath):
        parse_path(text)


def test_display_path_is_what_parse_path_reads():
    names = (b"home", b"new\nline", b"\xff\xfe", b"back\\slash", "日本".encode())
    text = display_path(names)
    assert "\n" not in text
    assert parse_path(text) == names
