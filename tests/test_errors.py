"""One error type: every exception class the library raises for the user derives from SftgoError (and
keeps its older parent, so `except ValueError` still catches it), and each CLI turns one into a single
`Error:` line without a traceback."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from sftgo.core.errors import SftgoError

BIN = Path(sys.executable).parent
INTERNAL = {"RecordError"}  # a per-record rejection: caught and counted by the pipeline, never shown alone
OLD_PARENTS = {  # what each class was before SftgoError; `except <parent>` must still catch it
    "ShardError": ValueError,
    "LockedError": RuntimeError,
    "ModelNotFound": ValueError,
    "CacheError": OSError,
    "ConfigError": ValueError,
    "CheckpointError": ValueError,
    "TaskError": RuntimeError,
    "InputError": ValueError,
    "BuildError": RuntimeError,
}


def user_error_classes() -> dict[str, type]:
    """Name -> class of every public exception class defined in a module of the library packages (an interrupt,
    a KeyboardInterrupt, is not an error)."""
    found = {}
    packages = [importlib.import_module(f"sftgo.{name}") for name in ("core", "grouping", "pipeline", "trainer")]
    modules = [
        info.name for package in packages for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]
    for module in map(importlib.import_module, modules):
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, Exception)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
                and name not in INTERNAL
            ):
                found[name] = obj
    return found


def test_every_user_error_is_an_sftgo_error():
    classes = user_error_classes()
    assert set(OLD_PARENTS) <= set(classes), sorted(classes)  # the walk found the library's errors
    for name, cls in classes.items():
        assert issubclass(cls, SftgoError), f"{cls.__module__}.{name} does not derive from SftgoError"
    for name, parent in OLD_PARENTS.items():
        assert issubclass(classes[name], parent), name


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"))
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)


def test_prep_cli_reports_a_user_error_in_one_line(tmp_path):
    line = one_error_line(run(BIN / "sftgo-prep", "inspect", tmp_path / "missing"))
    assert "missing" in line


def test_train_cli_reports_a_user_error_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    line = one_error_line(run(BIN / "sftgo-train", "--data", tmp_path / "data", "--out", tmp_path / "run"))
    assert "manifest.json" in line
