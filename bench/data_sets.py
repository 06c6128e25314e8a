"""The benchmark's data sets, made under ``bench_work/data/`` and kept between runs.

* ``big``: a file of random bytes (1 GiB by default) and a copy of it with
  1 MiB of new random bytes inserted near the middle;
* ``tree``: a copy of the running Python's standard library (many small files);
* ``tree50k``: a *generated* tree of about 50,000 files, seeded and so the same
  on every machine, shaped after the operating system's shared-data folder
  (``/usr/share``, measured on Debian 12: 46,236 files, 3,850 symbolic links,
  3,206 folders, up to 10 levels deep): the same histogram of file sizes
  (a quarter under 1 KiB, half between 1 and 4 KiB, a long tail up to tens of
  MiB), folders whose sizes follow a heavy tail (most hold a few entries, one
  holds thousands), about 3.5% of files duplicating another one's bytes, 7.7%
  of entries symbolic links (some to folders, a few dangling), a mix of
  compressible text-like bytes and incompressible ones. Generating rather than
  copying ``/usr/share`` makes the figures comparable between machines;
* ``million``: a generated tree of 1,000,000 tiny files (1-256 bytes, every one
  different), 1,000 folders of 1,000 files, written with two processes.

Each generated tree is checked against a marker file written when it was
complete (its parameters and counts); a tree that does not match is made again.
Every entry of a generated tree has a fixed mtime and an atime in 2100: with the
usual ``relatime`` mount option, reading a file or listing a folder then never
moves an atime (it would when the atime is not after the mtime, or a day old),
so one tool's reads, or the bench's own comparison after a restore, cannot
change the metadata the next backup sees.
"""

import json
import math
import multiprocessing
import os
import random
import shutil
import sysconfig
from dataclasses import dataclass

MiB = 1024 * 1024
#: Bump when the generator changes: trees made by an older one are made again.
GENERATOR_VERSION = 2
TREE_SEED = 20_261_127

#: /usr/share on Debian 12, measured: regular files by size class. Class k > 0 holds the
#: sizes in [2^(k-1), 2^k); class 0 the empty files.
USR_SHARE_SIZES = {
    0: 24, 1: 1, 2: 1, 3: 2, 4: 10, 5: 61, 6: 488, 7: 417, 8: 1733, 9: 4730, 10: 10240,
    11: 13951, 12: 6140, 13: 2659, 14: 1976, 15: 1604, 16: 901, 17: 671, 18: 367, 19: 160,
    20: 73, 21: 17, 22: 6, 23: 1, 24: 1, 25: 1, 27: 1,
}
USR_SHARE_FILES = sum(USR_SHARE_SIZES.values())  # 46,236
#: Its folders by depth below the top (1 = a child of /usr/share).
USR_SHARE_DEPTHS = {1: 106, 2: 1088, 3: 727, 4: 642, 5: 428, 6: 129, 7: 79, 8: 3, 9: 2, 10: 1}
USR_SHARE_FOLDERS = sum(USR_SHARE_DEPTHS.values())
LINK_SHARE = 3_850 / (3_850 + USR_SHARE_FILES)
DUPLICATE_SHARE = 1_633 / USR_SHARE_FILES
TEXT_SHARE = 0.6  # of files: text-like bytes (about 4 bits of entropy a byte), else random
EXECUTABLE_SHARE = 0.05
WORDS = ("doc", "icons", "locale", "man", "lib", "data", "theme", "fonts", "help", "zone", "perl",
         "python", "info", "mime", "sounds", "glib", "gnome", "applications", "pixmaps", "misc")
EXTENSIONS = ("txt", "gz", "png", "svg", "mo", "py", "pm", "xml", "html", "json", "conf", "desktop",
              "css", "js", "1.gz", "")
#: Bytes of text-like files: random bytes mapped onto 16 common characters.
_TEXT = bytes(b"etaoinshrdlu cm\n"[i % 16] for i in range(256))
#: mtimes: within 2023, deterministic per entry.
MTIME_BASE_NS = 1_672_531_200 * 10**9
#: atimes: 2100-01-01, later than any mtime and never a day old (see the module's docstring).
ATIME_NS = 4_102_444_800 * 10**9


@dataclass
class DataSet:
    """What a step backs up: ``rel`` inside ``folder`` (backups run with ``folder`` as cwd)."""

    name: str  # shown in the table
    folder: str
    rel: str
    size: int
    files: int
    detail: str = ""  # how it was made, for the report's header

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.rel)


# -- markers ------------------------------------------------------------------------------------


def _read_marker(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_marker(path: str, content: dict):
    with open(path + ".part", "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
    os.replace(path + ".part", path)


def count_tree(path: str) -> tuple[int, int]:
    """Entries that are not folders (files and links) under ``path``, and their sizes' sum."""
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return files, size


def _fresh(path: str, marker: str, params: dict) -> dict | None:
    """The marker's content when ``path`` is the complete tree those ``params`` make."""
    found = _read_marker(marker)
    if found is None or found.get("params") != params or not os.path.isdir(path):
        return None
    if list(count_tree(path)) != [found["files"], found["bytes"]]:
        return None
    return found


def _start_over(path: str, marker: str):
    if os.path.exists(marker):
        os.unlink(marker)
    shutil.rmtree(path, ignore_errors=True)


# -- big file ------------------------------------------------------------------------------------


def random_file(path: str, size: int) -> bool:
    """Write ``size`` random bytes to ``path`` unless a file of that size is there; True if written."""
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return False
    temp = path + ".part"
    with open(temp, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    os.replace(temp, path)
    return True


def _read_at(path: str, offset: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def edited_file(path: str, original: str, offset: int, written: bool):
    """``original`` with 1 MiB of new random bytes inserted at ``offset``, unless already there."""
    size = os.path.getsize(original)
    if not written and os.path.isfile(path) and os.path.getsize(path) == size + MiB:
        probe = 4096
        if (_read_at(path, offset - probe, probe) == _read_at(original, offset - probe, probe)
                and _read_at(path, offset + MiB, probe) == _read_at(original, offset, probe)
                and _read_at(path, offset, probe) != _read_at(original, offset, probe)
                and _read_at(path, size + MiB - probe, probe) == _read_at(original, size - probe, probe)):
            return
    temp = path + ".part"
    with open(original, "rb") as src, open(temp, "wb") as dst:
        left = offset
        while left:
            block = src.read(min(left, 8 * MiB))
            dst.write(block)
            left -= len(block)
        dst.write(os.urandom(MiB))
        shutil.copyfileobj(src, dst, 8 * MiB)
    os.replace(temp, path)


# -- the standard library -------------------------------------------------------------------------


def stdlib_tree(path: str) -> tuple[int, int]:
    """A copy of the running interpreter's standard library (without site-packages)."""
    marker = path + ".done"
    if os.path.isdir(path) and os.path.isfile(marker):
        with open(marker) as f:
            expected = f.read().split()
        found = count_tree(path)
        if [str(n) for n in found] == expected:
            return found
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(marker):
        os.unlink(marker)
    shutil.copytree(sysconfig.get_paths()["stdlib"], path, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages"))
    found = count_tree(path)
    with open(marker, "w") as f:
        f.write(f"{found[0]} {found[1]}\n")
    return found


# -- a /usr/share-like tree ---------------------------------------------------------------------


def _quota(shares: dict, total: int) -> dict:
    """``total`` split over the keys of ``shares`` in proportion, rounded (largest remainders)."""
    whole = sum(shares.values())
    exact = {k: v * total / whole for k, v in shares.items()}
    counts = {k: int(e) for k, e in exact.items()}
    left = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:left]:
        counts[k] += 1
    return counts


def _file_bytes(seed: int, size: int, text: bool) -> bytes:
    data = random.Random(seed).randbytes(size)
    return data.translate(_TEXT) if text else data


def _plan_tree(entries: int, seed: int):
    """Folders (relative paths, parents first) and the entries to write: the same arguments,
    the same plan. Returns (folders, files, links) where a file is
    ``(path, size, content seed, text, mode, mtime_ns)`` and a link ``(path, target, mtime_ns)``."""
    rng = random.Random(seed)
    links_wanted = round(entries * LINK_SHARE)
    files_wanted = entries - links_wanted
    folders_wanted = max(1, round(entries * USR_SHARE_FOLDERS / (USR_SHARE_FILES + 3_850)))

    # Folders level by level; each picks a parent one level up, parents weighted by a heavy tail.
    folders = []  # relative paths
    weights = []  # how likely a folder is to receive files
    by_depth = {0: [""]}
    serial = 0
    for depth, count in sorted(_quota(USR_SHARE_DEPTHS, folders_wanted).items()):
        parents = by_depth.get(depth - 1) or by_depth[0]
        parent_weights = [rng.paretovariate(1.2) for _ in parents]
        made = []
        for parent in rng.choices(parents, parent_weights, k=count):
            serial += 1
            name = f"{rng.choice(WORDS)}{serial}"
            path = f"{parent}/{name}" if parent else name
            made.append(path)
            folders.append(path)
            weights.append(rng.paretovariate(0.8))
        by_depth[depth] = made
    if not folders:
        folders, weights = ["data1"], [1.0]

    # File sizes: the measured histogram, split exactly (a quota per class), then shuffled.
    sizes = []
    for size_class, count in _quota(USR_SHARE_SIZES, files_wanted).items():
        low, high = (0, 0) if size_class == 0 else (2 ** (size_class - 1), 2**size_class - 1)
        for _ in range(count):
            # log-uniform within the class, as sizes spread within a power of two
            sizes.append(low if low == high else int(math.exp(rng.uniform(math.log(low), math.log(high)))))
    rng.shuffle(sizes)

    homes = rng.choices(folders, weights, k=len(sizes))
    files = []
    originals = []  # (content seed, size, text) of files small enough to be duplicated
    for index, (size, home) in enumerate(zip(sizes, homes, strict=True)):
        extension = rng.choice(EXTENSIONS)
        name = f"{rng.choice(WORDS)}-{index}" + (f".{extension}" if extension else "")
        content = (rng.getrandbits(63), size, rng.random() < TEXT_SHARE)
        if originals and rng.random() < DUPLICATE_SHARE:
            content = rng.choice(originals)  # the same bytes as an earlier file
        elif 0 < size <= MiB:
            originals.append(content)
        mode = 0o755 if rng.random() < EXECUTABLE_SHARE else 0o644
        mtime = MTIME_BASE_NS + rng.randrange(365 * 86_400 * 10**9)
        files.append((f"{home}/{name}", content[1], content[0], content[2], mode, mtime))

    links = []
    for index in range(links_wanted):
        home = rng.choices(folders, weights)[0]
        roll = rng.random()
        if roll < 0.02:
            target = f"missing-{index}"
        elif roll < 0.12:
            target = os.path.relpath(rng.choice(folders), home)
        else:
            target = os.path.relpath(rng.choice(files)[0], home)
        mtime = MTIME_BASE_NS + rng.randrange(365 * 86_400 * 10**9)
        links.append((f"{home}/link-{index}", target, mtime))
    return folders, files, links


def generated_tree(path: str, entries: int, seed: int = TREE_SEED) -> dict:
    """The /usr/share-like tree of ``entries`` files and links at ``path``; its counts."""
    marker = path + ".done"
    params = {"version": GENERATOR_VERSION, "entries": entries, "seed": seed}
    found = _fresh(path, marker, params)
    if found is not None:
        return found
    _start_over(path, marker)
    folders, files, links = _plan_tree(entries, seed)
    os.makedirs(path)
    for folder in folders:
        os.mkdir(os.path.join(path, folder))
    total = 0
    for rel, size, content_seed, text, mode, mtime in files:
        full = os.path.join(path, rel)
        with open(full, "wb") as f:
            f.write(_file_bytes(content_seed, size, text))
        os.chmod(full, mode)
        os.utime(full, ns=(ATIME_NS, mtime))
        total += size
    for rel, target, mtime in links:
        full = os.path.join(path, rel)
        os.symlink(target, full)
        os.utime(full, ns=(ATIME_NS, mtime), follow_symlinks=False)
    # Folders last and deepest first: writing into a folder moves its mtime.
    for index, folder in enumerate(sorted(folders, key=lambda f: f.count("/"), reverse=True)):
        mtime = MTIME_BASE_NS + index * 1_000_000_007
        os.utime(os.path.join(path, folder), ns=(ATIME_NS, mtime))
    os.utime(path, ns=(ATIME_NS, MTIME_BASE_NS))
    files_and_links, size = count_tree(path)
    counts = {"params": params, "files": files_and_links, "bytes": size, "regular": len(files),
              "links": len(links), "folders": len(folders),
              "duplicates": len(files) - len({(f[2], f[1], f[3]) for f in files}),
              "largest": max((f[1] for f in files), default=0)}
    _write_marker(marker, counts)
    return counts


# -- a million tiny files -----------------------------------------------------------------------


PER_FOLDER = 1000


def _tiny_folder(args):
    """Write folder ``index`` of the million tree: PER_FOLDER tiny files, each different."""
    root, index, count = args
    folder = os.path.join(root, f"d{index:04d}")
    os.mkdir(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    pool = random.Random(index).randbytes(4096)
    size_total = 0
    try:
        for number in range(count):
            serial = index * PER_FOLDER + number
            size = 1 + (serial * 2_654_435_761) % 256
            data = (b"%d " % serial + pool[(serial * 7) % 3800 :])[:size]
            name = f"f{number:04d}.txt"
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(out, data)
            os.close(out)
            os.utime(name, ns=(ATIME_NS, MTIME_BASE_NS + serial), dir_fd=fd)
            size_total += len(data)
        os.utime(fd, ns=(ATIME_NS, MTIME_BASE_NS + index))
    finally:
        os.close(fd)
    return size_total


def million_tree(path: str, files: int) -> dict:
    """``files`` tiny files in folders of PER_FOLDER at ``path``; its counts."""
    marker = path + ".done"
    params = {"version": GENERATOR_VERSION, "files": files}
    found = _read_marker(marker)
    # Counting a million files costs seconds: trust the marker (written only once complete)
    # when the folder count matches.
    folders = (files + PER_FOLDER - 1) // PER_FOLDER
    if (found is not None and found.get("params") == params and os.path.isdir(path)
            and len(os.listdir(path)) == folders):
        return found
    _start_over(path, marker)
    os.makedirs(path)
    work = [(path, i, min(PER_FOLDER, files - i * PER_FOLDER)) for i in range(folders)]
    with multiprocessing.Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        size = sum(pool.imap_unordered(_tiny_folder, work, chunksize=8))
    os.utime(path, ns=(ATIME_NS, MTIME_BASE_NS))
    counts = {"params": params, "files": files, "bytes": size, "folders": folders}
    _write_marker(marker, counts)
    return counts
