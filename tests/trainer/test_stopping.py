"""Signals during training (trainer/stopping.py), with real signals in a fresh interpreter: the first SIGINT,
SIGTERM or SIGUSR1 only asks for a stop at the next step boundary, a second stops at once, the previous handlers come
back, and an inherited SIG_IGN, another thread or (for SIGINT) a run of several ranks leave the signal alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import os, signal, sys, threading
from sftgo.trainer.stopping import Interrupted, graceful_interrupt

def say(*a): print(*a, flush=True)

mode, sig = sys.argv[1], getattr(signal, sys.argv[2])
default = signal.getsignal(sig)
if mode == "steps":
    with graceful_interrupt(1) as stop:
        os.kill(os.getpid(), sig)  # delivered before the next bytecode: no exception here
        say("asked", stop.should_stop(1, None) == sig)
    say("restored", signal.getsignal(sig) is default)
elif mode == "twice":
    with graceful_interrupt(1) as stop:
        os.kill(os.getpid(), sig)
        try:
            os.kill(os.getpid(), sig)
            say("not raised")
        except Interrupted as exc:
            say("second raised", exc.signum == sig, isinstance(exc, KeyboardInterrupt))
    say("restored", signal.getsignal(sig) is default)
elif mode == "ignored":
    signal.signal(sig, signal.SIG_IGN)
    with graceful_interrupt(1) as stop:
        os.kill(os.getpid(), sig)
        say("asked", stop.requested, signal.getsignal(sig) is signal.SIG_IGN)
elif mode == "nested":  # the CLI's signals_interrupt around the run, the loop's stop at step boundaries inside it
    from sftgo.core.errors import signals_interrupt
    with signals_interrupt():
        with graceful_interrupt(1) as stop:
            os.kill(os.getpid(), sig)
            say("asked", stop.should_stop(1, None) == sig)
        try:
            os.kill(os.getpid(), sig)
            say("not raised")
        except Interrupted as exc:
            say("outside the loop raised", exc.signum == sig)
    say("restored", signal.getsignal(sig) is default)
elif mode == "ranks":
    with graceful_interrupt(2) as stop:
        say("default", signal.getsignal(sig) is default)
elif mode == "thread":
    def work():
        with graceful_interrupt(1) as stop:
            say("default", signal.getsignal(sig) is default)
    t = threading.Thread(target=work); t.start(); t.join()
"""


def run(mode, sig):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, sig], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines(), proc.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_the_first_signal_asks_for_a_stop_at_the_step_boundary(sig):
    out, err = run("steps", sig)
    assert out == ["asked True", "restored True"]
    assert err == (
        f"Note: {sig} received; stopping after the current step with a checkpoint (send it again to stop now).\n"
    )


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_second_signal_stops_at_once(sig):
    out, _ = run("twice", sig)
    assert out == ["second raised True True", "restored True"]


def test_an_ignored_signal_stays_ignored_and_threads_keep_the_default():
    assert run("ignored", "SIGTERM")[0] == ["asked False True"]
    assert run("thread", "SIGTERM")[0] == ["default True"]


def test_several_ranks_leave_sigint_to_torchrun_but_take_sigterm():
    assert run("ranks", "SIGINT")[0] == ["default True"]
    assert run("ranks", "SIGTERM")[0] == ["default False"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_the_loops_stop_takes_over_from_the_clis_interrupt_and_gives_it_back(sig):
    """sftgo-train stops on SIGTERM while it loads (Interrupted at once) and at a step boundary while it trains."""
    out, _ = run("nested", sig)
    assert out == ["asked True", "outside the loop raised True", "restored True"]
