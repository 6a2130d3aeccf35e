"""The thread that runs the model: the process's main thread, with the event loop beside it.

Measured on the 2-core CI box, ten blocks of the default model, one-token steps:
9.2 ms when the main thread loads the weights and computes with them; 12.3 ms
when torch is driven from another thread, and 13.6 ms when the weights were
loaded (dequantized and packed for oneDNN) by a thread that lives on beside the
one computing. A CPU node spends nearly all its time there, so `swarm-node`
loads and computes on its main thread and runs its event loop in a second
thread; the loop hands work over with `MainThreadExecutor`, an ordinary `Executor`.
"""

from __future__ import annotations

import concurrent.futures
import queue
from typing import Any, Callable


class MainThreadExecutor(concurrent.futures.Executor):
    """Calls submitted from any thread run, in order, on the thread inside `run()`."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._shutdown:
            raise RuntimeError("the compute thread has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def run(self, poll_s: float = 0.2) -> None:
        """Run submitted calls until `shutdown`. The timeout only lets signal handlers run promptly."""
        while True:
            try:
                item = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller through the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._shutdown:
            self._shutdown = True
            self._queue.put(None)
