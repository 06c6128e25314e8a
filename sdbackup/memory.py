"""Keep glibc's heap near what a process uses, and Python's collector off what it keeps.

Backup and restore make chunk buffers in threads (reading, sealing, opening) and free
them on the reactor, in another order than they were made; a server reads and writes
chunks in its disk threads. glibc keeps the freed holes, and gives each thread an arena
of its own (up to eight per core). ``limit_arenas`` caps the arenas (the servers);
``tune_malloc`` also maps large blocks of their own, and gives back a function that
hands freed memory back to the system (the client). ``tune_gc`` makes the client's
garbage collector look less often at the objects it keeps for a while.
"""

import ctypes
import gc
import time

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
#: Arenas glibc may make: threads share them.
ARENAS = 2
#: Blocks from this size on are mapped of their own and handed back when freed.
MMAP_THRESHOLD = 1024 * 1024
#: Freed heap memory kept by the allocator past which a confirmed batch hands it back.
TRIM_FREE = 32 * 1024 * 1024
#: Seconds between two looks at the heap at least. ``mallinfo2`` walks every free block: on a
#: backup's fragmented heap it took 2.8 ms a call, 398 calls (1.1 s of the reactor's time) in a
#: first backup of 100,000 small files that never once freed enough to trim.
TRIM_EVERY = 1.0
#: Objects made (net of those freed) between two collections of the youngest generation.
GC_YOUNG = 20_000


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def limit_arenas() -> bool:
    """Let glibc make at most ``ARENAS`` arenas; False where the allocator is not glibc's.

    A server restoring 1 GiB peaked at 93-99 MiB with an arena for each of its disk
    threads, 73-82 MiB with two, at the same speed."""
    try:
        return ctypes.CDLL(None).mallopt(_M_ARENA_MAX, ARENAS) == 1
    except (OSError, AttributeError):
        return False


def tune_malloc(clock=time.monotonic):
    """Keep the process's memory near what it uses; a function that hands freed memory back
    (None where the allocator is not glibc's).

    Chunk buffers are read in threads and freed on the reactor in another order than they
    were made, so glibc's heap keeps freed holes: measured on a copy of /usr/share (50,000
    files), a peak of 122 MiB of which 38 MiB free heap and 28 MiB in use. Two arenas,
    blocks of ``MMAP_THRESHOLD`` and more mapped of their own (glibc's default raises that
    threshold after each large free), and a ``malloc_trim`` after a confirmed batch when more
    than ``TRIM_FREE`` is free bring it to about 104 MiB. A lower threshold (256 KiB) and a
    trim after every batch reach about 95 MiB, but a large file's buffers are then mapped
    and faulted in again for every read: the 1 GiB backup took 20 to 30% longer.

    The function looks at the heap at most once every ``TRIM_EVERY`` seconds of ``clock``,
    however often it is called.
    """
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
        mallinfo2.restype = _MallInfo2
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        return None  # not glibc (or an old one): nothing to tune
    limit_arenas()

    looked = float("-inf")

    def trim():
        nonlocal looked
        now = clock()
        if now - looked < TRIM_EVERY:
            return
        looked = now
        if mallinfo2().fordblks > TRIM_FREE:
            malloc_trim(0)

    return trim


def tune_gc():
    """Collect reference cycles less often, and never look at what start-up made.

    A backup or restore holds tens of thousands of Nodes, ids and buffers for a while
    (the open folders, the parent's trees, batches in flight): CPython's collector, run
    each time 700 more objects are alive, went over them again and again. Measured on
    an unchanged backup of the generated 50,000-file tree, collections took 0.6 to
    0.8 s of the client's 4.5 s of CPU; with start-up's modules and classes frozen out of
    every collection and the youngest generation collected every ``GC_YOUNG`` objects,
    0.16 to 0.26 s (a restore: 0.75 s, then 0.1 s), at the same peak memory. Cycles are
    still collected: a few thousand objects later.
    """
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG), middle, old)
