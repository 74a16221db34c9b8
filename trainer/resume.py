"""`--resume`: what may differ between a run and its continuation, and what may not.

Input: the TrainConfig given now, the run's config.json (the settings it was started or last
resumed with), the checkpoint's trainer_state.json, and the sha256 lists of the shards now.
Output: nothing when the resume continues the same run, else a ConfigError naming the first
setting that differs; notes (one sentence each) for changes that are applied.
Cost: instant (checksums come from the manifests; trainer.loop verifies the files against them).

Every TrainConfig field is in exactly one class (a test checks this, so a new field forces a
decision):
- SHAPES_RUN: a change would make a different run (data order, objective, optimisation,
  numerics, what the logged eval loss means), or be silently overridden by the checkpoint
  (AdamW's lr/betas/weight decay and the schedule live in its state): refused.
- BY_CONTENT: data directories, compared by their shards' sha256 (a moved copy is fine).
- OPERATIONAL: logging, checkpointing cadence, progress, memory/speed knobs with the same
  mathematics (ce_chunk, grad_checkpointing), readahead, stop_after: allowed.
- max_steps: raising it extends the run; the schedules are recomputed for the new length.
"""
from __future__ import annotations

import dataclasses
import json

from sftgo.trainer.config import ConfigError, TrainConfig

SHAPES_RUN = (
    "model", "objective", "groups", "group_weight", "lam", "lam_schedule", "lam_end", "reduce", "temperature", "dro_step",
    "batch_tokens", "max_length", "pack", "grad_accum", "shuffle_buffer", "bucket_pool", "epochs", "lr",
    "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "clip_grad", "seed", "precision", "lora_r",
    "lora_alpha", "eval_batches", "fsdp",
)
BY_CONTENT = ("data", "eval_data")
OPERATIONAL = (
    "out", "readahead", "stop_after", "ce_chunk", "grad_checkpointing", "trust_remote_code", "eval_every",
    "save_every", "keep_checkpoints", "resume", "log_every", "progress", "tensorboard",
    "report_to", "save_adapter",
)
EXTENSIBLE = ("max_steps",)


def shard_checksums(manifest: dict | None) -> list[str] | None:
    """The manifest's shard sha256 list, in manifest order (None without a directory)."""
    return None if manifest is None else [s["sha256"] for s in manifest["shards"]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as config.json holds them


def check_data(name: str, now: list[str] | None, before: list[str] | None, path: str | None) -> None:
    """Refuse a data directory whose shards are not the ones the run was trained on."""
    if now == before:
        return
    if now is None or before is None:
        state = "without" if now is None else "with"
        raise ConfigError(f"--resume {state} {_flag(name)} would not continue the same run (it was started "
                          f"{'with' if before is not None else 'without'} one).")
    raise ConfigError(f"--resume refused: the shards in {path} are not the ones this run was trained on "
                      f"({sum(a != b for a, b in zip(now, before)) + abs(len(now) - len(before))} of {len(before)} "
                      f"differ by checksum); resume with the same {_flag(name)} or start a new --out.")


def check_settings(cfg: TrainConfig, saved: dict, step: int) -> list[str]:
    """Refuse a change of a setting that shapes the run; return notes on applied changes."""
    now = _plain(dataclasses.asdict(cfg))
    for key in SHAPES_RUN:
        if now[key] != saved.get(key):
            raise ConfigError(f"--resume with a different {_flag(key)} ({saved.get(key)!r} before, {now[key]!r} now) "
                              f"would not continue the same run; use the same value or start a new --out.")
    before, after = saved.get("max_steps"), now["max_steps"]
    if after == before:
        return []
    if not (before and after and after > before):
        raise ConfigError(f"--resume with a different --max-steps ({before!r} before, {after!r} now) would not "
                          f"continue the same run; only raising it (to train longer) is supported.")
    if after <= step:
        raise ConfigError(f"--max-steps {after} is not past the checkpoint's step {step}; nothing would be trained.")
    return [f"--max-steps raised from {before} to {after}: training continues from step {step} to {after}, and the "
            f"learning-rate schedule (warm-up, cosine decay) and the λ schedule are recomputed for {after} steps, "
            f"so from step {step} on they follow the longer schedule (the lr rises to its value at step {step} of it)."]


def check(cfg: TrainConfig, saved: dict, state: dict, data_sha: list[str], eval_sha: list[str] | None) -> list[str]:
    """All resume checks, settings first; returns the notes to log."""
    notes = check_settings(cfg, saved, int(state["step"]))
    if "data_sha256" not in state:
        raise ConfigError("The checkpoint records no shard checksums (written by an older sftgo-train), so --resume "
                          "cannot check its data; start a new --out.")
    check_data("data", data_sha, state["data_sha256"], cfg.data)
    check_data("eval_data", eval_sha, state.get("eval_data_sha256"), cfg.eval_data)
    return notes
