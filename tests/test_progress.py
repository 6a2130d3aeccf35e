"""Progress bars (swarm/progress.py): a tqdm bar on a terminal, nothing at all anywhere else."""

from __future__ import annotations

import io

from swarm.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_terminal_no_bar_and_no_callback():
    stream = io.StringIO()
    with progress_bar("loading blocks 0:10", stream=stream) as show:
        assert show is None  # callers pass progress=None: not even a call per block
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_bar_that_clears_itself():
    stream = Terminal()
    with progress_bar("loading blocks 0:10", stream=stream) as show:
        for done in range(1, 11):
            show(done, 10)
        drawn = stream.getvalue()
    assert "loading blocks 0:10" in drawn and "/10" in drawn
    cleared = stream.getvalue()[len(drawn) :]
    assert cleared.strip(" \r") == ""  # closed: the line is blanked (leave=False), the next output starts clean


def test_load_span_and_load_head_report_progress(checkpoint):
    from swarm.model import load_head, load_span

    seen = []
    load_span(checkpoint, 0, 2, progress=lambda done, total: seen.append(("span", done, total)))
    load_head(checkpoint, progress=lambda done, total: seen.append(("head", done, total)))
    assert seen == [("span", 1, 2), ("span", 2, 2), ("head", 0, 2), ("head", 1, 2), ("head", 2, 2)]
