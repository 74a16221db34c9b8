"""Micro-batches made ahead on a background thread: read, collated, pinned and copied to the device while the
step before them runs.

Input: the run's `Batches` (trainer.batching: an iterable of host Batch with a resumable `position`), the
device and how many batches may wait (`depth`).
Output: an iterator of Batch already on the device.  Its `position` is the one of the last batch handed out,
never of the batches still waiting, so a checkpoint written between steps records exactly what was trained
and a resume continues there (what was prefetched but not used is read again).
Cost: one thread and at most `depth` waiting micro-batches (their host and device memory).  On a GPU the
batches are pinned and copied with non_blocking=True, so the step never waits for collation or a copy.
An error in the thread is raised by the next `next()` as the same exception; `close()` stops the thread and
waits for it (it closes the data reader it ran, in that thread), on an interrupt or an error too.
"""

from __future__ import annotations

import queue
import threading

import torch

DEPTH = 2


class Prefetch:
    def __init__(self, batches, device: torch.device, depth: int = DEPTH):
        self.source, self.device = batches, torch.device(device)
        self.position = tuple(batches.position)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name="sftgo-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)  # pinning and copies in this rank's device context, not GPU 0's
        it = iter(self.source)
        try:
            for batch in it:
                position = tuple(self.source.position)  # right after it was made: what handing it out means
                if cuda:
                    batch = batch.pin_memory()
                if not self._put((batch.to(self.device), position, None)):
                    return
            self._put((None, None, StopIteration()))
        except BaseException as exc:  # raised in the training thread by its next next()
            self._put((None, None, exc))
        finally:
            it.close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        batch, position, exc = self._queue.get()
        if exc is not None:
            self._done = True
            if isinstance(exc, StopIteration):
                raise StopIteration
            raise exc
        self.position = position
        return batch

    def close(self) -> None:
        """Stop the thread and wait for it; the batches waiting are dropped (their position was never given)."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
