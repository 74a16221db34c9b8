"""The training data's pre-flight check, without torch: `sftgo-train` runs it before importing
torch and loading a model, so that a bad manifest or shard is refused in a fraction of a second.

Input: a TrainConfig; optionally the model tokenizer's fingerprint and whether to hash the shards.
Output: (manifest, group column or None, number of groups), or a ShardError / ConfigError whose
message is one sentence.
Cost: reads the manifests and every shard's Parquet footer; with checksums, hashes every shard.
"""
from __future__ import annotations

from sftgo.core.shards import group_column, read_manifest, verify_shards
from sftgo.trainer.config import ConfigError, TrainConfig


def check_data(cfg: TrainConfig, fingerprint: str | None = None, checksums: bool = True) -> tuple[dict, str | None, int]:
    """Manifest, the --groups column, every shard's schema, row count and (with `checksums`) sha256,
    and with `fingerprint` the tokenizer; for train and eval data."""
    manifest = read_manifest(cfg.data)
    groups = cfg.groups
    if cfg.objective in ("sft", "dft") and groups and groups not in manifest.get("strategies", {}):
        groups = None  # plain SFT and DFT need no groups; with them they only log per-group loss
    strategies = (groups,) if groups else ()
    verify_shards(cfg.data, manifest, strategies=strategies, checksums=checksums, tokenizer_fingerprint=fingerprint)
    if cfg.eval_data:
        verify_shards(cfg.eval_data, read_manifest(cfg.eval_data), strategies=strategies, checksums=checksums,
                      tokenizer_fingerprint=fingerprint)
    if not manifest["shards"]:
        raise ConfigError(f"{cfg.data} holds no shards (0 records written).")
    k = int(manifest["strategies"][groups].get("num_groups", 2)) if groups else 1
    if cfg.objective in ("rho1", "weighted") and k < 2:
        raise ConfigError(f"--objective {cfg.objective} needs at least 2 groups; '{groups}' has {k}.")
    return manifest, (group_column(groups) if groups else None), k
