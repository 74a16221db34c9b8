"""sftgo-train's data on a store: --data / --eval-data URLs streamed through each process's bounded cache.

Input: a TrainConfig whose --data or --eval-data is a URL (s3://, gs://, ...), with --storage-options, --cache-dir and
--cache-limit; the process's rank.  Output: `manifest(location, options)` (a store's manifest is read once per
process; a local folder's as before), `build(location, options)` (core.remote.RemoteBuild), `check_data` (the
pre-flight checks of a store: manifest, tokenizer, strategies, every shard's footer) and `DataCaches` (one
core.remote.ShardCache per URL, in a folder of this process's own that is removed at the end), whose `summary` the
run's summary.json records (limit, the most the folder held, the shards each rank downloaded).
Cost: a listing, the manifest and each shard's footer once per process; then each rank's shards once per pass (and
once more for the dry pass that counts the steps of --epochs).

Disk: a process's cache folder holds at most --cache-limit bytes: the data's lane holds the shard being read and up to
two read ahead as they fit, the eval data's lane one shard.  The limit is per process (each torchrun rank has its own
folder).  Readers of a store take no lock (a store has none): they trust only what the manifest names and check every
shard's sha256 as it arrives (core.remote).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from sftgo.core import storage
from sftgo.core.remote import RemoteBuild, ShardCache
from sftgo.core.shards import read_manifest
from sftgo.trainer.config import ConfigError, TrainConfig

AHEAD = 2  # --data shards downloaded ahead of the one being read
_BUILDS: dict[tuple[str, str], RemoteBuild] = {}  # per process: a store's manifest and listing are read once


def build(location: str, options: dict | None) -> RemoteBuild:
    """The build at URL `location`, shared within the process (its manifest, listing and footers read once)."""
    key = (str(location).rstrip("/"), json.dumps(options or {}, sort_keys=True, default=str))
    if key not in _BUILDS:
        _BUILDS[key] = RemoteBuild(location, options)
    return _BUILDS[key]


def manifest(location: str, options: dict | None = None) -> dict:
    """The manifest of a build: a store's (read once per process) or a local folder's (core.shards.read_manifest)."""
    return build(location, options).manifest if storage.is_remote(location) else read_manifest(location)


def refuse_url_out(cfg: TrainConfig) -> None:
    """--out is the run's local folder: a URL is refused in one sentence."""
    if storage.is_url(cfg.out):
        raise ConfigError(
            f"--out {cfg.out} is a URL, but the run directory must be a local folder (checkpoints, metrics and the "
            "model are written there; writing runs to a store is not supported yet): copy it to the store afterwards."
        )


def largest_shard(b: RemoteBuild) -> int:
    return max((b.size(s["path"]) for s in b.manifest["shards"]), default=0)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 10**5 else f"{n} bytes"


def remote_roles(cfg: TrainConfig) -> dict[str, str]:
    """{"data": URL, "eval_data": URL} for those of --data / --eval-data that are on a store."""
    given = {"data": cfg.data, "eval_data": cfg.eval_data}
    return {r: loc for r, loc in given.items() if loc and storage.is_remote(loc)}


def cache_lanes(cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """{role: (bytes, shards read ahead)} of each store URL's cache lane within --cache-limit: --eval-data's holds its
    largest shard, --data's the rest (default: its largest shard x (1 + AHEAD)); a limit that cannot hold the largest
    shards is one sentence (checked before torch loads)."""
    need = {r: largest_shard(build(loc, cfg.storage_options)) for r, loc in remote_roles(cfg).items()}
    eval_need = need.get("eval_data", 0)
    lanes = {"eval_data": (eval_need, 0)} if "eval_data" in need else {}
    if cfg.cache_limit is None:
        if "data" in need:
            lanes["data"] = (need["data"] * (1 + AHEAD), AHEAD)
        return lanes
    limit = int(cfg.cache_limit)
    if "data" in need and limit - eval_need < need["data"]:
        beside = f" beside that of --eval-data ({_size(eval_need)})" if eval_need else ""
        raise ConfigError(
            f"--cache-limit {_size(limit)} cannot hold the largest shard of --data ({_size(need['data'])}){beside}; "
            f"give at least {_size(need['data'] + eval_need)} (3 x the largest shard lets it read ahead)."
        )
    if eval_need > limit:
        raise ConfigError(
            f"--cache-limit {_size(limit)} cannot hold the largest shard of --eval-data ({_size(eval_need)}); "
            f"give at least {_size(eval_need)}."
        )
    if "data" in need:
        lanes["data"] = (limit - eval_need, AHEAD)
    return lanes


class DataCaches:
    """This process's cache folder and one ShardCache per store URL the run reads ("data", "eval_data")."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        self.caches: dict[str, ShardCache] = {}
        self.root: Path | None = None
        roles = remote_roles(cfg)
        if not roles:
            return
        builds = {r: build(loc, cfg.storage_options) for r, loc in roles.items()}
        if "data" in builds and len(builds["data"].manifest["shards"]) < world:
            raise ConfigError(
                f"--data {cfg.data} has {len(builds['data'].manifest['shards'])} shard(s) for {world} processes: "
                "from a store each process streams whole shards, so it needs at least one shard per process; "
                "rebuild with smaller shards or use fewer processes."
            )
        lanes = cache_lanes(cfg)
        self.limit = sum(limit for limit, _ in lanes.values())
        if cfg.cache_dir:
            Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f"sftgo-cache-rank{rank}-", dir=cfg.cache_dir or None))
        for role, b in builds.items():
            self.caches[role] = ShardCache(b, self.root / role, *lanes[role])

    def get(self, role: str) -> ShardCache | None:
        """The cache of --data ("data") or --eval-data ("eval_data"); None for a local folder."""
        return self.caches.get(role)

    def close(self) -> None:
        """Remove the cache folder and everything left in it."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def summary(self, world: int) -> dict | None:
        """What summary.json records: the limit, the most each rank's folder held, the shards each rank downloaded in
        each pass over the data (collective under torchrun: every rank calls it)."""
        if not self.caches:
            return None
        mine = {
            "peak_bytes": sum(c.peak_bytes for c in self.caches.values()),
            "shards": {role: c.passes for role, c in self.caches.items()},  # per pass over the data, in order
        }
        ranks = [mine]
        if world > 1:
            import torch.distributed as dist

            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {"limit_bytes": self.limit, "folder": str(self.root), "per_rank": ranks}
