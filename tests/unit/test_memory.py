"""glibc's heap and the collector: threads share two arenas, a trim hands freed memory back
at most once a second, and kept objects are looked at less often."""

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import ctypes, sys, tempfile, threading
    from sdbackup.memory import limit_arenas

    if sys.argv[1] == "limited":
        assert limit_arenas()
    held = []
    started = threading.Barrier(8)

    def work():
        started.wait()  # all eight alive at once, each allocating
        held.extend(bytearray(64 * 1024) for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile() as report:
        stream = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        print(open(report.name).read().count("<heap nr="))
""")


def output(program: str, mode: str) -> str:
    """What ``program`` prints, run in a Python of its own (allocator and collector settings
    are the whole process's)."""
    return subprocess.run([sys.executable, "-c", program, mode], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def heaps(mode: str) -> int:
    """Heaps (arenas) glibc reports after eight threads allocated at once."""
    return int(output(PROGRAM, mode))


def test_threads_share_two_arenas_once_limited():
    assert heaps("free") > 2  # the default: an arena per thread, up to eight per core
    assert heaps("limited") <= 2


GC_PROGRAM = textwrap.dedent("""
    import gc, sys, weakref
    from sdbackup.memory import tune_gc

    if sys.argv[1] == "tuned":
        tune_gc()
    collections = []
    gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info))
    kept = [[i] for i in range(200_000)]  # what a backup holds a while: Nodes, ids
    young = len(collections)

    class Cycle:
        pass

    freed = []
    for _ in range(50_000):  # garbage only the collector can free
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        weakref.finalize(a, freed.append, 1)
    print(young, len(freed))
""")


def collector(mode: str) -> tuple[int, int]:
    """Collections while 200,000 objects were made and kept, and of 50,000 reference cycles
    dropped, how many were freed without an explicit ``gc.collect``."""
    young, freed = output(GC_PROGRAM, mode).split()
    return int(young), int(freed)


def test_the_collector_looks_at_kept_objects_less_often_and_still_frees_cycles():
    default_runs, _ = collector("default")
    tuned_runs, freed = collector("tuned")
    assert tuned_runs * 10 < default_runs
    assert freed > 40_000  # cycles are freed as they pile up, a few thousand objects late


TRIM_PROGRAM = textwrap.dedent("""
    from twisted.internet.task import Clock
    from sdbackup.memory import tune_malloc

    clock = Clock()
    trim = tune_malloc(clock.seconds)

    def resident():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20

    # 2 x 50 MiB of blocks too large for Python's own allocator, below one kept block that
    # holds the heap's top: what they free stays resident unless a trim hands it back.
    first = [bytearray(1000) for _ in range(50_000)]
    second = [bytearray(1000) for _ in range(50_000)]
    kept = bytearray(1000)
    del first
    before = resident()
    trim()
    after_first = resident()
    del second
    freed = resident()
    trim()  # less than TRIM_EVERY after the last look
    too_soon = resident()
    clock.advance(1.0)
    trim()
    print(before, after_first, freed, too_soon, resident())
""")


def test_a_trim_hands_freed_memory_back_at_most_once_a_second():
    # Each look at the heap (mallinfo2) walks every free block: a backup called it after each
    # confirmed batch, 398 times in one of 100,000 small files, for 1.1 s of the reactor's time.
    before, after_first, freed, too_soon, after = map(int, output(TRIM_PROGRAM, "").split())
    assert after_first < before - 40  # the first look hands the freed 50 MiB back
    assert too_soon > freed - 10  # the next, within a second, does not look
    assert after < too_soon - 40  # a second later it does
