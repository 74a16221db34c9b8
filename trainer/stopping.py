"""Ctrl-C during training stops the run between two steps, not inside one.

Input: the training loop wraps itself in `graceful_interrupt()` and calls `check()` after each step's work
(optimizer step, log, eval, save). Output: the first SIGINT only asks for a stop (one line on stderr says so);
`check()` then raises KeyboardInterrupt at the step boundary, so the interrupt never lands inside a library's
lock (TensorBoard's writer, a queue, a Parquet read) where it can hang or abort the process. A second SIGINT
stops at once (Python's default: KeyboardInterrupt wherever the program is). Cost: one flag read per step.

Installed only where it is safe and wanted: in the main thread (Python delivers signals there), in a run of one
process (under torchrun every rank must stop at the same step, and torchrun itself answers Ctrl-C by
terminating the ranks), and only over Python's own default handler: an inherited SIG_IGN (nohup, `cmd &`) or
a handler the embedding program installed is left alone. The previous handler is put back afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class StopRequest:
    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a handler that prints while the main thread is inside a print raises
        os.write(2, b"Note: interrupt received; stopping after the current step (press Ctrl-C again to stop now).\n")

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_interrupt(world: int):
    """Yields a StopRequest; its handler is installed for the block when that is safe (see the module)."""
    stop = StopRequest()
    if (
        world != 1
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop.handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
