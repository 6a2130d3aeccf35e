"""Progress bars where people wait (a model's blocks loading, its head), drawn only on a terminal.

On a terminal: a tqdm bar on stderr that clears itself when done. Anywhere else (tests,
CI, a pipe, a log file) nothing at all, and the callback is None, so callers skip even
the call. Only the command-line front ends (node/cli.py, client/cli.py) open bars.

    with progress_bar("loading blocks 0:10") as show:   # show(done, total), or None
        span = load_span(checkpoint, 0, 10, progress=show)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress_bar(
    description: str, unit: str = "block", stream: TextIO | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """A `show(done, total)` callback that draws a bar on `stream` (default stderr) while the block
    runs, when `stream` is a terminal; None when it is not."""
    stream = sys.stderr if stream is None else stream
    if not is_terminal(stream):
        yield None
        return
    bar: tqdm | None = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit=unit, file=stream, leave=False, dynamic_ncols=True)
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield show
    finally:
        if bar is not None:
            bar.close()
