"""Stopping a training run from outside: Ctrl-C, and the signals cluster schedulers send before a kill.

Input: the training loop wraps itself in `graceful_interrupt(world)` and asks `should_stop()` after each step's
work (optimizer step, log, eval, save).
Output: the first SIGINT, SIGTERM (Slurm, Kubernetes, `kill`) or SIGUSR1 (Slurm's `--signal` warning) only asks
for a stop, with one line on stderr; at the next step boundary `should_stop()` says so on every rank at once, and
the loop saves a checkpoint and raises `Interrupted` (the CLI then exits 128 + the signal's number: 130, 143,
138). So the signal never lands inside a library's lock (TensorBoard's writer, a queue, a Parquet read) where it
can hang or abort the process, and a preempted job continues with --resume. A second signal stops at once
(`Interrupted` wherever the program is, without a checkpoint).
Cost: one flag read per step; under torchrun, one all-reduce of one number per step (every rank must stop at the
same step to save a checkpoint together).

Which signals: in a run of one process all three. Under torchrun, SIGTERM and SIGUSR1 (what torchrun and
schedulers send to each rank); SIGINT is left to torchrun, which answers Ctrl-C by terminating the ranks.
Installed only where Python can deliver them (the main thread) and only over the default disposition: an
inherited SIG_IGN (nohup, `cmd &`) or a handler the embedding program installed is left alone. The previous
handlers are put back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal

import torch

from sftgo.core.errors import Interrupted, signal_handlers


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0  # the first signal received, 0 while none

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def handle(self, signum, frame) -> None:
        if self.signum:
            raise Interrupted(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write, not print: a handler that prints while the main thread is inside a print raises
        os.write(
            2,
            f"Note: {name} received; stopping after the current step with a checkpoint (send it again to "
            "stop now).\n".encode(),
        )

    def should_stop(self, world: int, device) -> int:
        """The signal that stops the run at this step boundary (on every rank alike), or 0 to go on."""
        if world == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's signal stops them all, at the same step
        return int(flag.item())


@contextlib.contextmanager
def graceful_interrupt(world: int):
    """Yields a StopRequest whose handler is installed for the block where that is safe (see the module)."""
    stop = StopRequest()
    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) if world == 1 else (signal.SIGTERM, signal.SIGUSR1)
    with signal_handlers(wanted, stop.handle):
        yield stop
