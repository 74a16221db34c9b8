"""The one error type of sftgo's user-facing failures, and the configuration error both CLIs share.

Input: none (raised by every layer: core, grouping, pipeline, trainer).
Output: `SftgoError`, an error meant for the user whose message is one sentence; each error class
sftgo raises for the user derives from it and keeps its older parent (ValueError, RuntimeError,
OSError), so `except ValueError` still catches a ShardError.  `sftgo-prep`, `sftgo-train` and the
Hugging Face example catch `SftgoError` and print its message as it is; `unexpected` is the one
sentence they print for any other exception.  `ConfigError`: a setting (a flag, a config file, a
Trainer argument) is missing, unknown, malformed or out of range.
Cost: none.
"""

from __future__ import annotations

import contextlib
import signal


class SftgoError(Exception):
    """An error meant for the user: its message is one sentence."""


class ConfigError(SftgoError, ValueError):
    """A configuration value or file is missing, unknown, malformed or out of range."""


class TrainingError(SftgoError, RuntimeError):
    """Training cannot go on (a non-finite loss or gradient norm): the run stops at that step, exports no model."""


def unexpected(exc: BaseException, what: str) -> str:
    """The one sentence a CLI shows for an error that is no SftgoError (a bug, or a failure nobody
    foresaw): its type and the first line of its message, and where the traceback is."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{what} failed with {type(exc).__name__}: {first} (rerun with --debug for the traceback)."


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal (Ctrl-C, SIGTERM, SIGUSR1): `signum` which one, `checkpoint` what it saved
    before stopping (training).  The CLIs exit with 128 + signum, as a shell reports a process a signal stopped."""

    def __init__(self, signum: int = signal.SIGINT, checkpoint: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = signum, checkpoint


def _replaceable(signum: int) -> bool:
    """Whether `signum` still has Python's own disposition (Ctrl-C's KeyboardInterrupt, the others' default) or
    sftgo's signals_interrupt, which a stop at a step boundary may take over for a while."""
    handler = signal.getsignal(signum)
    own = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return handler is own or handler is _raise_interrupted


@contextlib.contextmanager
def signal_handlers(signums, handler):
    """`handler` for the given signals within the block, where that is safe: in the main thread (where Python
    delivers signals) and only over Python's own disposition (or signals_interrupt), so an inherited SIG_IGN
    (nohup, `cmd &`) or a handler the embedding program installed is left alone.  The previous handlers come back
    afterwards."""
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in signums if main and _replaceable(s)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt(signums=(signal.SIGTERM, signal.SIGUSR1)):
    """Within the block, the given signals raise Interrupted, as Ctrl-C raises KeyboardInterrupt, so a command
    killed by a scheduler cleans up as after Ctrl-C (where signal_handlers may install it)."""
    with signal_handlers(signums, _raise_interrupted):
        yield
