"""Selection patterns (restic's rules), and the walk with excludes, tag files and one file system."""

import os

import pytest

from sdbackup.client.selection import (
    CACHEDIR_SIGNATURE,
    BackupSelection,
    PatternError,
    RestoreFilter,
    compile_excludes,
    compile_pattern,
    expand,
    path_lines,
    path_text,
    pattern_lines,
    raw_paths,
    tag_file,
)
from sdbackup.client.walk import Enter, Leave, Release, Report, Walker, plan


def excluded(patterns, path, ipatterns=()):
    return compile_excludes(patterns, ipatterns).excluded(path)


# --- patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    # restic's documented examples (040_backup, "Excluding files").
    ("*.go", "/home/user/src/main.go", True),
    ("*.go", "/home/user/src/main.goo", False),
    ("foo/*.go", "/home/user/foo/bar.go", True),
    ("foo/*.go", "/home/user/foo/sub/bar.go", False),  # * never crosses a /
    ("foo/**/*.go", "/home/user/foo/sub/deeper/bar.go", True),
    ("foo/**/*.go", "/home/user/foo/bar.go", True),  # ** is any number of folders, none too
    ("/home/user/*", "/home/user/file", True),
    ("/home/user/*", "/srv/home/user/file", False),  # a leading / anchors at the root
    ("home/user/*", "/srv/home/user/file", True),  # without it, at any depth
    # A pattern without / matches a name at any depth, and what is inside.
    ("node_modules", "/p/node_modules", True),
    ("node_modules", "/p/node_modules/x/y.js", True),
    ("node_modules", "/p/my_node_modules", False),
    ("node_modules/", "/p/node_modules", True),  # a final / changes nothing
    ("?.txt", "/a/b.txt", True),
    ("?.txt", "/a/bb.txt", False),
    ("[abc].txt", "/x/b.txt", True),
    ("[!abc].txt", "/x/b.txt", False),
    ("[^abc].txt", "/x/d.txt", True),
    ("[a-c]x", "/bx", True),
    ("[a-c]x", "/dx", False),
    ("a/../b", "/b", True),  # cleaned as restic cleans it
    ("\\*", "/*", True),  # a backslash escapes
    ("\\*", "/x", False),
    ("/", "/anything/at/all", True),
    # ** first or last: at any depth, and everything inside.
    ("**/cache", "/cache", True),
    ("**/cache", "/x/y/cache/z", True),
    ("/**/cache", "/x/cache", True),
    ("/home/**", "/home", True),
    ("/home/**", "/srv/home", False),
    ("a/**/**/b", "/a/x\ny/b", True),  # a name may hold a newline
    ("a/**/b", "/a/xb", False),
])
def test_restic_pattern_rules(pattern, path, expected):
    assert compile_pattern(pattern).matches(path) is expected


def test_a_star_never_matches_an_empty_name_or_a_slash():
    pattern = compile_pattern("a/*/b")
    assert not pattern.matches("/a/b")
    assert not pattern.matches("/a/x/y/b")
    assert pattern.matches("/a/x/b")


def test_names_that_are_not_utf8_match_as_bytes():
    """A byte that is not UTF-8 is typed as ls shows it (\\xff) or comes raw from the shell
    (surrogateescape): either way it matches that byte only."""
    name = path_text([b"data", b"caf\xe9.bin"])  # Latin-1, not UTF-8
    assert name == "/data/caf\udce9.bin"
    assert compile_pattern("caf\\xe9.bin").matches(name)
    assert compile_pattern(os.fsdecode(b"caf\xe9.bin")).matches(name)
    assert compile_pattern("caf?.bin").matches(name)
    assert not compile_pattern("caf\\xe8.bin").matches(name)
    assert not compile_pattern("café.bin").matches(name)  # the UTF-8 é is two other bytes


def test_ignore_case():
    assert excluded([], "/a/Photo.JPG", ipatterns=["*.jpg"])
    assert not excluded(["*.jpg"], "/a/Photo.JPG")
    assert excluded([], "/A/ÉTÉ/x", ipatterns=["/a/été"])


def test_negation_reincludes_the_last_match_decides():
    """restic's example: exclude all of $HOME but some folders."""
    patterns = ["/home/me/*", "!/home/me/work", "*.o"]
    assert excluded(patterns, "/home/me/music")
    assert not excluded(patterns, "/home/me/work")
    assert not excluded(patterns, "/home/me/work/notes.txt")
    assert excluded(patterns, "/home/me/work/a.o")  # a later pattern excludes again
    assert not excluded(patterns, "/home/other")


def test_many_patterns_are_one_expression_without_negation():
    excludes = compile_excludes([f"*.ext{i}" for i in range(50)] + ["/abs/path"], ["*.TMP"])
    assert excludes._combined is not None
    assert excludes.excluded("/x/y.ext49")
    assert excludes.excluded("/x/y.tmp")
    assert excludes.excluded("/abs/path/z")
    assert not excludes.excluded("/x/abs/path")
    assert not excludes.excluded("/x/y.ext50")


@pytest.mark.parametrize("bad", ["[abc", "!", "", "   ", "x\\", "[z-a]"])
def test_patterns_that_cannot_be_read(bad):
    with pytest.raises(PatternError):
        compile_pattern(bad)


# --- files of patterns and paths -----------------------------------------------------------------


def test_exclude_file_lines_comments_and_variables():
    data = (b"# caches\n\n  *.tmp  \n$HOME/.cache\n${HOME}/x$$y\n~/Downloads\n!~/Downloads/keep\n"
            b"/raw/\xff\n")
    environ = {"HOME": "/home/me"}
    assert pattern_lines(data, environ) == [
        "*.tmp", "/home/me/.cache", "/home/me/x$y", os.path.expanduser("~/Downloads"),
        "!" + os.path.expanduser("~/Downloads/keep"), "/raw/\udcff"]


def test_unset_variables_expand_to_nothing_as_in_restic():
    assert expand("/a/$NOPE/b", {}) == "/a//b"


def test_files_from_lines():
    data = b"# list\n a b \n\n/x/\xff\r\n"
    assert path_lines(data) == ["a b", "/x/\udcff"]
    assert path_lines(data, verbatim=True) == ["# list", " a b ", "/x/\udcff"]
    assert raw_paths(b"a\nb\0c\0\0") == ["a\nb", "c"]


def test_tag_file_option():
    assert tag_file("CACHEDIR.TAG:Signature: 8a47") == (b"CACHEDIR.TAG", b"Signature: 8a47")
    assert tag_file(".nobackup") == (b".nobackup", b"")
    with pytest.raises(PatternError):
        tag_file("a/b")


# --- a restore's selection ---------------------------------------------------------------------


def names(text: str) -> tuple:
    return tuple(os.fsencode(n) for n in text.split("/") if n)


def test_plain_include_paths_are_anchored_and_normalised():
    for spelling in ("home/me", "./home/me", "/home/me", "home/me/", "home//me"):
        selection = RestoreFilter([spelling])
        assert selection.selects(names("home/me")), spelling
        assert selection.selects(names("home/me/docs/a.txt")), spelling
        assert not selection.selects(names("srv/home/me")), spelling
        assert not selection.selects(names("home")), spelling
        assert selection.wants(names("home"), True), spelling  # a folder that leads there
        assert not selection.wants(names("srv"), True), spelling


def test_include_globs_match_at_any_depth_unless_anchored():
    floating = RestoreFilter(["*.txt"])
    assert floating.selects(names("a/b/c.txt"))
    assert floating.wants(names("a/b"), True)  # any folder may hold one
    assert not floating.selects(names("a/b"))
    anchored = RestoreFilter(["/docs/*.md"])
    assert anchored.selects(names("docs/x.md"))
    assert not anchored.selects(names("z/docs/x.md"))
    assert anchored.wants(names("docs"), True)
    assert not anchored.wants(names("z"), True)
    deep = RestoreFilter(["/src/**/test_*.py"])
    assert deep.wants(names("src/a/b/c"), True)
    assert deep.selects(names("src/a/b/test_x.py"))
    assert deep.selects(names("src/test_x.py"))


def test_restore_excludes_and_includes_together():
    selection = RestoreFilter(["home"], ["*.tmp", "home/me/cache"])
    assert selection.selects(names("home/me/a.txt"))
    assert not selection.selects(names("home/me/a.tmp"))
    assert not selection.wants(names("home/me/cache"), True)
    assert not selection.wants(names("home/me/cache/x"), False)
    only_excludes = RestoreFilter([], ["*.tmp", "cache", "/top"])
    assert only_excludes.selects(names("x/y"))
    assert not only_excludes.selects(names("x/y.tmp"))
    # Excludes follow restic's rules: without a leading /, at any depth.
    assert not only_excludes.selects(names("x/cache/y"))
    assert not only_excludes.selects(names("top/y"))
    assert only_excludes.selects(names("x/top"))


def test_restore_names_as_ls_shows_them():
    """ls shows \\xff, \\n, \\\\: the same text names the entry in a pattern."""
    selection = RestoreFilter(["docs/\\xff\\nodd\\\\name", "*\\x01*"])
    assert selection.selects((b"docs", b"\xff\nodd\\name"))
    assert not selection.selects((b"docs", b"\xff\nodd\\\\name"))
    assert selection.selects((b"x", b"a\x01b"))


def test_which_includes_match():
    selection = RestoreFilter(["a", "*.txt", "/b/*"])
    assert selection.includes_matching(names("a/x.txt"), {0, 1, 2}) == {0, 1}
    assert selection.includes_matching(names("b/y"), {1, 2}) == {2}
    assert selection.includes_matching((), {0, 1, 2}) == set()


def test_an_include_cannot_be_negated():
    with pytest.raises(PatternError):
        RestoreFilter(["!x"])


# --- the walk, with a selection ------------------------------------------------------------------


def walked(paths, selection, cwd=None) -> tuple[set, Report]:
    """Every path the walk yields, relative to the snapshot's root (text)."""
    report = Report()
    walker = Walker(plan([str(p) for p in paths], cwd and str(cwd)), report, selection=selection)
    found, stack = set(), []
    try:
        while events := walker.next_events():
            for event in events:
                if type(event) is Enter:
                    name = event.entry.name.decode("utf-8", "surrogateescape") if event.entry else ""
                    stack.append(name)
                    found.add("/".join(stack).lstrip("/"))
                elif type(event) is Leave:
                    stack.pop()
                    if event.folder is not None:
                        event.folder.release()
                elif type(event) is Release:
                    event.folder.release()
                else:
                    found.add("/".join([*stack, event.name.decode("utf-8", "surrogateescape")])
                              .lstrip("/"))
    finally:
        walker.close()
    found.discard("")
    return found, report


def make(root, *files):
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_excluded_entries_and_folders_are_not_walked(tmp_path):
    make(tmp_path, "src/a.txt", "src/a.o", "src/node_modules/m/index.js", "src/deep/x.o",
         "src/deep/keep.txt")
    found, report = walked(["src"], BackupSelection(compile_excludes(["*.o", "node_modules"])),
                           tmp_path)
    assert found == {"src", "src/a.txt", "src/deep", "src/deep/keep.txt"}
    assert report.warnings == []


def test_excludes_see_absolute_paths_even_for_relative_arguments(tmp_path):
    make(tmp_path, "src/a/x", "src/b/x")
    anchored = f"{tmp_path}/src/a"
    found, _ = walked(["src"], BackupSelection(compile_excludes([anchored])), tmp_path)
    assert found == {"src", "src/b", "src/b/x"}
    found, _ = walked(["src"], BackupSelection(compile_excludes(["/src/a"])), tmp_path)
    assert "src/a/x" in found  # /src is not this folder: anchored at the file system's root


def test_a_backed_up_path_itself_can_be_excluded(tmp_path):
    make(tmp_path, "a/x", "b/y")
    found, _ = walked(["a", "b"], BackupSelection(compile_excludes(["b"])), tmp_path)
    assert found == {"a", "a/x"}


def test_negation_brings_back_a_name_of_an_excluded_set(tmp_path):
    make(tmp_path, "home/music/a", "home/work/b", "home/work/c.o", "home/photos/d")
    selection = BackupSelection(compile_excludes([f"{tmp_path}/home/*", f"!{tmp_path}/home/work",
                                                  "*.o"]))
    found, _ = walked(["home"], selection, tmp_path)
    assert found == {"home", "home/work", "home/work/b"}


def test_a_name_that_is_not_utf8_is_excluded_by_its_bytes(tmp_path):
    folder = os.fsencode(tmp_path / "d")
    os.mkdir(folder)
    for name in (b"caf\xe9", b"caf\xc3\xa9", b"plain"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x")
    found, _ = walked(["d"], BackupSelection(compile_excludes(["caf\\xe9"])), tmp_path)
    assert found == {"d", "d/café", "d/plain"}


def test_cache_folders_keep_only_their_tag(tmp_path):
    make(tmp_path, "s/cache/big.bin", "s/cache/sub/more.bin", "s/fake/x", "s/other/y")
    (tmp_path / "s/cache/CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE + b"\n# a cache\n")
    (tmp_path / "s/fake/CACHEDIR.TAG").write_bytes(b"Signature: not the right one")
    selection = BackupSelection(tag_files=((b"CACHEDIR.TAG", CACHEDIR_SIGNATURE),))
    found, _ = walked(["s"], selection, tmp_path)
    assert found == {"s", "s/cache", "s/cache/CACHEDIR.TAG", "s/fake", "s/fake/x",
                     "s/fake/CACHEDIR.TAG", "s/other", "s/other/y"}


def test_a_fifo_named_like_a_tag_file_does_not_block_the_walk(tmp_path):
    make(tmp_path, "s/x")
    os.mkfifo(tmp_path / "s/CACHEDIR.TAG")
    found, _ = walked(["s"], BackupSelection(tag_files=((b"CACHEDIR.TAG", CACHEDIR_SIGNATURE),)),
                      tmp_path)
    assert found == {"s", "s/x", "s/CACHEDIR.TAG"}


def test_exclude_if_present_without_header(tmp_path):
    make(tmp_path, "s/skip/.nobackup", "s/skip/data", "s/keep/data")
    found, _ = walked(["s"], BackupSelection(tag_files=((b".nobackup", b""),)), tmp_path)
    assert found == {"s", "s/skip", "s/skip/.nobackup", "s/keep", "s/keep/data"}


def test_one_file_system_keeps_a_mount_point_empty(tmp_path):
    """/dev/shm (tmpfs) is mounted inside /dev (devtmpfs) on Linux: with ``one_file_system``
    the mount point is kept, empty. (/dev's other entries are excluded, to walk little.)"""
    assert os.lstat("/dev").st_dev != os.lstat("/dev/shm").st_dev, "/dev/shm is not a mount point"
    marker = f"/dev/shm/sdbackup-test-{os.getpid()}"
    with open(marker, "wb") as f:
        f.write(b"x")
    try:
        excludes = compile_excludes(["/dev/*", "!/dev/shm"])
        found, _ = walked(["/dev"], BackupSelection(excludes, one_file_system=True))
        assert found == {"dev", "dev/shm"}
        found, _ = walked(["/dev"], BackupSelection(excludes))
        assert "dev/" + marker.removeprefix("/dev/") in found
    finally:
        os.unlink(marker)


def test_the_walks_check_of_an_entry_agrees_with_the_whole_path_check():
    """``excluded_in`` looks at the end of the path only (the folder is known not excluded):
    it must decide as ``excluded`` does, with and without negations."""
    paths = ["/a/b.o", "/a/b.O", "/home/me/x", "/srv/home/me/x", "/p/node_modules", "/a/b/c/d",
             "/x/cache/y", "/caf\udce9", "/a/keep.o", "/q/a/b", "/q/a/bb", "/deep/a/1/2/b"]
    pattern_sets = [
        (["*.o", "/home/me", "node_modules", "cache", "a/b", "/deep/**/b"], ["*.O"]),
        (["caf\\xe9", "c/d"], []),
        (["*.o", "!keep.o", "/home/*"], []),
    ]
    for patterns, ipatterns in pattern_sets:
        excludes = compile_excludes(patterns, ipatterns)
        for path in paths:
            folder, name = path.rsplit("/", 1)
            if folder and excludes.excluded(folder):
                continue  # the walk never looks inside an excluded folder
            assert excludes.excluded_in(folder, name) == excludes.excluded(path), (patterns, path)
