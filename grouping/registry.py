"""Importance strategies as plug-ins: the protocol every strategy implements, and the registry.

Input: a strategy name (as given to `--strategy`).
Output: the strategy object, whose methods `sftgo-prep build` and `sftgo-prep score` call (one
orchestration for both, pipeline/finalize.py).  The built-ins (tfidf, reference, semantic) are one
file each and are imported lazily (a tfidf build never imports torch); others register with
`register(obj)` before the build starts (in the driver process; the object is shipped to the
Dask workers with each task, so it must be picklable and its module importable there).
Cost: none.

The protocol, per strategy:
  name                                    the column suffix: importance_<name>, group_<name>
  params(cfg) -> dict                     the settings that determine its scores (manifest)
  stage(cols, cfg, tokenizer) -> columns  pass 1, one partition held in memory: Arrow columns to
                                          stage (a model strategy stages its importance itself)
  importance(staged, artifacts, folder)   pass 2: float32 importance per token (list array)
optional, for strategies fitted on the whole corpus:
  artifacts: tuple of file names          files fit() writes (committed with the shards)
  partition_stats(staged) -> pa.Table     pass 1: what fit() needs of one partition
  fit(stats, documents, folder) -> dict   between the passes: write the artifacts into `folder`
                                          and return their manifest entry
"""
from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import pyarrow as pa

_BUILTIN = {
    "tfidf": "sftgo.grouping.tfidf:STRATEGY",
    "reference": "sftgo.grouping.reference:STRATEGY",
    "semantic": "sftgo.grouping.semantic:STRATEGY",
}
_REGISTERED: dict[str, "Strategy"] = {}


@runtime_checkable
class Strategy(Protocol):
    name: str

    def params(self, cfg) -> dict: ...

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict[str, pa.Array]: ...

    def importance(self, staged: pa.Table, artifacts: dict, folder: str) -> pa.ListArray: ...


def register(strategy) -> "Strategy":
    """Make `strategy` available by its name (a built-in name cannot be taken)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"{strategy!r} does not implement the strategy protocol (name, params, stage, importance).")
    name = strategy.name
    if not name or not name.replace("_", "").isalnum() or not name.isascii() or name in _BUILTIN:
        raise ValueError(f"Cannot register a strategy named {name!r}: use a new name of ASCII letters, digits and _.")
    if hasattr(strategy, "fit") != hasattr(strategy, "partition_stats"):
        raise TypeError(f"Strategy {name!r} must define both partition_stats and fit, or neither.")
    _REGISTERED[name] = strategy
    return strategy


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_BUILTIN) + tuple(_REGISTERED)


def get(name: str) -> "Strategy":
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"Unknown strategy {name!r}; choose from {', '.join(names())}.")
    module, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def fitted(strategy) -> bool:
    """Whether the strategy fits artifacts over the whole corpus between the passes."""
    return hasattr(strategy, "fit")


def artifact_files(strategy) -> tuple[str, ...]:
    return tuple(getattr(strategy, "artifacts", ()))


def artifacts_of(strategies) -> list[str]:
    """The artifact files of the named (known) strategies, sorted: what a build writes beside its shards."""
    known = names()
    return sorted({f for name in strategies if name in known for f in artifact_files(get(name))})
