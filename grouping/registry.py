"""Importance strategies as plug-ins: the protocol every strategy implements, and the registry.

Input: a strategy name (as given to `--strategy`).
Output: the strategy object, whose methods `sftgo-prep build` and `sftgo-prep score` call (one
orchestration for both: pipeline/prepare.py and pipeline/finalize.py).  The built-ins (tfidf,
reference, semantic) are one file each and are imported lazily (a tfidf build never imports torch).
Others come from an installed package's entry point in the group `sftgo.strategies` (then they work
from `sftgo-prep build --strategy NAME` and on every Dask worker that has the package), or register
with `register(obj)` in the driver process before the build starts.  The object is shipped to the Dask
workers with each task, so it must be picklable and its module importable there.
Cost: none.

The protocol, per strategy:
  name                                    the column suffix: importance_<name>, group_<name>
  params(cfg) -> dict                     the settings that determine its scores (manifest)
  stage(cols, cfg, tokenizer) -> columns  pass 1, one partition held in memory: Arrow columns to
                                          stage (a model strategy stages its importance itself)
  importance(staged, artifacts, folder)   pass 2: float32 importance per token (list array)
optional:
  accelerator: bool                       True when stage() runs a model that wants a GPU: the pass-1 tasks then
                                          run on the cluster's GPU workers (--gpu-workers, pipeline/gpus.py)
optional, for strategies fitted on the whole corpus:
  artifacts: tuple of file names          files fit() writes (committed with the shards)
  partition_stats(staged) -> pa.Table     pass 1: what fit() needs of one partition
  fit(stats, documents, folder) -> dict   between the passes: write the artifacts into `folder`
                                          and return their manifest entry
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pyarrow as pa

from sftgo.core.plugins import PluginShapeError, Registry

_BUILTIN = {
    "tfidf": "sftgo.grouping.tfidf:STRATEGY",
    "reference": "sftgo.grouping.reference:STRATEGY",
    "semantic": "sftgo.grouping.semantic:STRATEGY",
}


@runtime_checkable
class Strategy(Protocol):
    name: str

    def params(self, cfg) -> dict: ...

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict[str, pa.Array]: ...

    def importance(self, staged: pa.Table, artifacts: dict, folder: str) -> pa.ListArray: ...


def _fit_pair(strategy, where: str) -> None:
    if hasattr(strategy, "fit") != hasattr(strategy, "partition_stats"):
        raise PluginShapeError(f"{where} must define both partition_stats and fit, or neither.")


REGISTRY = Registry("strategy", "sftgo.strategies", _BUILTIN, Strategy, "name, params, stage, importance", _fit_pair)
names, get, register, unregister = REGISTRY.names, REGISTRY.get, REGISTRY.register, REGISTRY.unregister


def fitted(strategy) -> bool:
    """Whether the strategy fits artifacts over the whole corpus between the passes."""
    return hasattr(strategy, "fit")


def artifact_files(strategy) -> tuple[str, ...]:
    return tuple(getattr(strategy, "artifacts", ()))


def artifacts_of(strategies) -> list[str]:
    """The artifact files of the named (known) strategies, sorted: what a build writes beside its shards."""
    known = names()
    return sorted({f for name in strategies if name in known for f in artifact_files(get(name))})
