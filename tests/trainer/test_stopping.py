"""Ctrl-C during training (trainer/stopping.py), with real signals in a fresh interpreter: the first SIGINT
only asks for a stop at the next step boundary, a second stops at once, the previous handler comes back, and an
inherited SIG_IGN, another thread or a run of several ranks leave SIGINT alone."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, signal, sys, threading
from sftgo.trainer.stopping import graceful_interrupt

def say(*a): print(*a, flush=True)

mode = sys.argv[1]
if mode == "steps":
    with graceful_interrupt(1) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode: no exception here
        say("asked", stop.requested)
        try:
            stop.check()
        except KeyboardInterrupt:
            say("check raised")
    say("restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
elif mode == "twice":
    with graceful_interrupt(1) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            say("not raised")
        except KeyboardInterrupt:
            say("second raised")
    say("restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
elif mode == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with graceful_interrupt(1) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        say("asked", stop.requested, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
elif mode == "ranks":
    with graceful_interrupt(2) as stop:
        say("default", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
elif mode == "thread":
    def work():
        with graceful_interrupt(1) as stop:
            say("default", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    t = threading.Thread(target=work); t.start(); t.join()
"""


def run(mode):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines(), proc.stderr


def test_the_first_interrupt_asks_for_a_stop_at_the_step_boundary():
    out, err = run("steps")
    assert out == ["asked True", "check raised", "restored True"]
    assert err == "Note: interrupt received; stopping after the current step (press Ctrl-C again to stop now).\n"


def test_a_second_interrupt_stops_at_once():
    out, _ = run("twice")
    assert out == ["second raised", "restored True"]


def test_an_ignored_interrupt_stays_ignored_and_several_ranks_or_threads_keep_the_default():
    assert run("ignored")[0] == ["asked False True"]
    assert run("ranks")[0] == ["default True"]
    assert run("thread")[0] == ["default True"]
