"""`--resume`: what may differ between a run and its continuation, and what may not.

Input: the TrainConfig given now, the run's config.json (the settings it was started or last
resumed with), the checkpoint's trainer_state.json (checked by trainer.checkpoint.read_state), the
run directory's id, and what identifies the data now (`data_identity`: the shards' sha256 lists and
the manifests' entry for the --groups strategy).
Output: nothing when the resume continues the same run, else a ConfigError naming the first
setting that differs; notes (one sentence each) for changes that are applied.
Cost: instant (checksums come from the manifests; trainer.loop verifies the files against them).

A checkpoint belongs to one run: it records the run's id (RUN_DIR/sftgo-run.json) and the
settings that shaped it (SHAPES_RUN), so one copied in from another run, or one whose
settings were edited, is refused instead of overriding the run's own (AdamW's lr and the
schedule live in its state).

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


def settings_of(cfg: TrainConfig) -> dict:
    """The settings a checkpoint records: those that shape the run."""
    now = _plain(dataclasses.asdict(cfg))
    return {key: now[key] for key in SHAPES_RUN}


def data_identity(cfg: TrainConfig, manifest: dict, eval_manifest: dict | None) -> dict:
    """What a checkpoint records of its data: the shards' sha256 lists and the manifests' --groups entries."""
    def entry(m):
        return None if m is None or not cfg.groups else _plain(m.get("strategies", {}).get(cfg.groups))

    return {"data_sha256": shard_checksums(manifest), "eval_data_sha256": shard_checksums(eval_manifest),
            "data_strategy": entry(manifest), "eval_data_strategy": entry(eval_manifest)}


def check_run(cfg: TrainConfig, state: dict, run_id: str | None, path) -> None:
    """Refuse a checkpoint of another run (its id) or written with other settings than the run's."""
    if run_id is None:
        raise ConfigError(f"{cfg.out} has no run id (it was started by an older sftgo-train), so --resume cannot check "
                          f"that {path} belongs to it; start a new --out.")
    if state["run_id"] != run_id:
        raise ConfigError(f"The checkpoint {path} belongs to another run (run id {state['run_id'][:12]}, this run "
                          f"directory's is {run_id[:12]}): it was copied in from elsewhere; resume that run in its own "
                          "directory, or start a new --out.")
    now = settings_of(cfg)
    for key in SHAPES_RUN:
        if state["settings"].get(key) != now[key]:
            raise ConfigError(f"The checkpoint {path} was written with {_flag(key)} {state['settings'].get(key)!r}, not "
                              f"this run's {now[key]!r}: it belongs to another run or was edited; resume from one of "
                              "this run's checkpoints or start a new --out.")


def check_strategy(name: str, cfg: TrainConfig, now, before) -> None:
    if now == before:
        return
    directory = getattr(cfg, name)
    keys = sorted(k for k in set(now or {}) | set(before or {}) if (now or {}).get(k) != (before or {}).get(k))
    raise ConfigError(f"--resume refused: the '{cfg.groups}' entry of {directory}/manifest.json differs from the one "
                      f"this run was trained with ({', '.join(keys) or 'present before, absent now'}), though its shards "
                      f"match; resume with the same {_flag(name)} or start a new --out.")


def check(cfg: TrainConfig, saved: dict, state: dict, data: dict, run_id: str | None, path) -> list[str]:
    """All resume checks, settings first; returns the notes to log.  `data`: data_identity now."""
    step = state["step"]
    notes = check_settings(cfg, saved, step)
    check_run(cfg, state, run_id, path)
    if cfg.stop_after and cfg.stop_after <= step:
        raise ConfigError(f"--stop-after {cfg.stop_after} is not past the checkpoint's step {step}; nothing would be "
                          "trained (raise it, or leave it out to train to the end).")
    check_data("data", data["data_sha256"], state["data_sha256"], cfg.data)
    check_data("eval_data", data["eval_data_sha256"], state.get("eval_data_sha256"), cfg.eval_data)
    check_strategy("data", cfg, data["data_strategy"], state.get("data_strategy"))
    if cfg.eval_data:
        check_strategy("eval_data", cfg, data["eval_data_strategy"], state.get("eval_data_strategy"))
    return notes
