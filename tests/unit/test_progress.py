"""The progress line a user watches: it fits the terminal, clears old redraws, and says what is left."""

import io

from hypothesis import given
from hypothesis import strategies as st

from sdbackup.client.progress import Counts, Progress, progress_line

counts = st.builds(
    Counts,
    bytes=st.integers(0, 2**50), files=st.integers(0, 10**9), elapsed=st.floats(0, 10**6),
    total_bytes=st.integers(0, 2**50), total_files=st.integers(0, 10**9),
    current=st.text(max_size=300),
)


@given(counts, st.integers(20, 300))
def test_the_line_never_wraps(state, width):
    assert len(progress_line(state, width)) <= width


def test_a_restore_line_has_a_total_and_time_left():
    line = progress_line(Counts(bytes=50 * 2**20, files=10, elapsed=5.0, total_bytes=150 * 2**20,
                                total_files=30), 79)
    assert "50.0 MiB/150.0 MiB" in line
    assert "10/30 files" in line
    assert "ETA 0:10" in line  # 100 MiB left at 10 MiB/s
    assert " 33%" in line


def test_the_current_file_is_shown_and_cut_from_the_front_when_long():
    long_name = "/home/user/" + "deep/" * 40 + "report.pdf"
    line = progress_line(Counts(bytes=0, files=1, elapsed=1.0, current=long_name), 79)
    assert line.endswith("report.pdf")
    assert "…" in line
    assert len(line) <= 79


def test_each_redraw_clears_what_the_last_one_left():
    stream = io.StringIO()
    progress = Progress(stream=stream, enabled=True, width=80)
    progress.advance(10, 1, current="a-rather-long-file-name.txt")
    progress.draw(progress.started + 1)
    progress.current = "b"
    progress.draw(progress.started + 2)
    progress.finish()
    redraws = stream.getvalue().split("\r")[1:]
    assert redraws and all(r.rstrip("\n").endswith("\x1b[K") for r in redraws)
    assert stream.getvalue().endswith("\n")
    assert all(len(r.replace("\x1b[K", "").rstrip("\n")) < 80 for r in redraws)


def test_silent_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(stream=stream)
    progress.advance(10, 1)
    progress.finish()
    assert stream.getvalue() == ""
