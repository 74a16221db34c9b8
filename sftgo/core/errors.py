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
