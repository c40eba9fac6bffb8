"""Progress displays: a tqdm bar on a terminal, plain lines (no carriage returns) in a log."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from shared.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_a_bar_and_a_log_gets_lines():
    assert isinstance(progress(range(3), file=Terminal()), tqdm)
    assert isinstance(progress(range(3), file=io.StringIO()), LineProgress)


def test_plain_lines_at_the_start_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=15, desc="diffusion", unit="iteration", file=out, interval=10,
                       clock=clock)
    for _ in range(15):
        clock.now += 1.5
        bar.update()
    bar.close()
    bar.close()  # once
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "diffusion: iteration 0 of 15"
    assert lines[1] == "diffusion: iteration 7 of 15 (47 %), 10.5 s"  # 7 x 1.5 s >= 10 s
    assert lines[2] == "diffusion: iteration 14 of 15 (93 %), 21.0 s"
    assert lines[3] == "diffusion: iteration 15 of 15 (100 %), done in 22.5 s"
    assert len(lines) == 4


def test_iteration_postfix_unknown_total_and_a_failure():
    out = io.StringIO()
    assert list(progress(iter([1, 2]), desc="encoding", unit="chunk", file=out)) == [1, 2]
    assert out.getvalue().splitlines()[-1].startswith("encoding: chunk 2, done in ")
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(total=4, desc="sending", unit="chunk", file=out) as bar:
            bar.set_postfix_str("sent 1.0 MB")
            bar.update(2)
            raise RuntimeError("link down")
    assert out.getvalue().splitlines()[-1].startswith(
        "sending: chunk 2 of 4 (50 %), sent 1.0 MB, stopped after ")


def test_a_logger_gates_the_display_and_carries_the_lines(caplog):
    logger = logging.getLogger("dlad.test.progress")
    out = io.StringIO()
    logger.setLevel(logging.WARNING)  # as with --quiet
    list(progress(range(3), desc="loading", unit="slice", file=out, logger=logger))
    list(progress(range(3), desc="loading", unit="slice", file=Terminal(), logger=logger))
    assert out.getvalue() == "" and not caplog.records
    logger.setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="dlad.test.progress"):
        list(progress(range(3), desc="loading", unit="slice", file=out, logger=logger))
    assert out.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "loading: slice 0 of 3", "loading: slice 3 of 3 (100 %)"]
