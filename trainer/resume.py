"""A checkpoint's state and `--resume`: what a checkpoint records, and what may differ between a run and its
continuation.

Input: the TrainConfig given now, the run's config.json (the settings it was started or last
resumed with), the checkpoint's trainer_state.json, the run directory's id, and what identifies the
data now (`data_identity`: the shards' sha256 lists and the manifests' entry for the --groups strategy).
Output: `CheckpointState`, the one record of the loop's state a checkpoint holds: written by the loop's
save, read and validated here alone (`CheckpointState.read`: every entry's type and range;
`fits`: against the run that resumes it; `check_schedule`: the learning-rate schedule's state).  `check`:
nothing when the resume continues the same run, else a ConfigError naming the first setting that differs;
notes (one sentence each) for changes that are applied.  `restore`: a run continued from a checkpoint (its
optimizer, schedule, RNG, data position and objective state).  A damaged or foreign checkpoint is a
CheckpointError naming the file and the entry.
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
import math
from pathlib import Path

from sftgo.trainer.checkpoint import STEP_DIR, CheckpointError, is_finite
from sftgo.trainer.config import ConfigError, TrainConfig

CUT_KEYS = ("truncated_samples", "truncated_loss_tokens", "skipped_samples")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sums(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def state_error(path: Path, key: str, value, want: str) -> CheckpointError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(
        f"{path / 'trainer_state.json'} has '{key}' = {shown}, not {want}: the checkpoint was "
        "edited or damaged; resume from an intact one or start a new --out."
    )


@dataclasses.dataclass
class CheckpointState:
    """The loop's state in a checkpoint (trainer_state.json); weights, optimizer and RNG are in their own files."""

    step: int
    """Optimizer steps done."""
    data_position: list
    """[epoch, micro-batches taken]: where the data stream continues."""
    worst_group: int | None
    """The last step's worst group (for counting switches)."""
    worst_switches: int
    """How often the worst group changed so far."""
    dro: dict | None
    """Online Group-DRO's weights and step size, or None without --dro-step."""
    world_size: int
    """Processes that trained (each rank's share of the data depends on it)."""
    run_id: str
    """The run directory's id: a checkpoint belongs to one run."""
    settings: dict
    """The settings that shaped the run (SHAPES_RUN)."""
    data_sha256: list
    """The training shards' checksums, in manifest order."""
    eval_data_sha256: list | None = None
    """The same of --eval-data."""
    data_strategy: dict | None = None
    """The manifest's entry for the --groups strategy."""
    eval_data_strategy: dict | None = None
    """The same of --eval-data."""
    truncated_samples: int = 0
    """Run totals of what --max-length cut and what was skipped (CUT_KEYS)."""
    truncated_loss_tokens: int = 0
    skipped_samples: int = 0
    nonfinite_skipped: int = 0
    """Optimizer steps skipped so far because their loss or gradient norm was not finite (--skip-nonfinite)."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def cut(self) -> dict:
        return {key: getattr(self, key) for key in CUT_KEYS}

    @classmethod
    def read(cls, path: Path) -> CheckpointState:
        """Checkpoint `path`'s state, every entry checked for its type and range (one sentence naming the entry):
        a checkpoint is untrusted input.  The checks that need the run are `fits`'."""
        file = path / "trainer_state.json"
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} has no trainer_state.json: the checkpoint is incomplete.") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(
                f"{file} is not valid JSON ({str(exc).splitlines()[0]}): the checkpoint was edited or damaged."
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file} is not a JSON object: the checkpoint was edited or damaged.")
        for key in ("run_id", "settings", "data_sha256"):
            if key not in state:
                raise CheckpointError(
                    f"{file} records no '{key}' (the checkpoint was written by an older "
                    "sftgo-train), so --resume cannot check that it belongs to this run; start a "
                    "new --out."
                )
        for key, (ok, want) in _entry_checks(path, state).items():
            if not ok:
                raise state_error(path, key, state.get(key), want)
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})

    def fits(self, path: Path, *, world: int, total_steps: int, grad_accum: int, groups: int, dro) -> None:
        """Refuse a state that cannot continue this run: other world size, a step past its end, a data position
        other than its steps took, a group it does not have, Group-DRO weights of another shape."""
        if self.world_size != world:  # each rank's share of the data depends on the world size
            raise ConfigError(
                f"{path} was written by {self.world_size} process(es); resume it with the same number, not {world}."
            )
        step, (epoch, taken) = self.step, self.data_position
        if step > total_steps:
            raise state_error(path, "step", step, f"a step of this run's {total_steps}")
        consumed = step * grad_accum  # micro-batches the run has taken
        if taken != consumed if epoch == 0 else max(epoch, taken) > consumed:
            raise state_error(
                path,
                "data_position",
                self.data_position,
                f"a position after {consumed} micro-batches ({step} steps of {grad_accum})",
            )
        if self.worst_group is not None and self.worst_group >= max(groups, 1):
            raise state_error(path, "worst_group", self.worst_group, f"one of this run's {max(groups, 1)} groups")
        if dro is None and self.dro is not None:
            raise state_error(path, "dro", self.dro, "null (this run has no --dro-step)")
        if dro is not None:
            n, mine = dro.weights.numel(), self.dro
            if (
                mine is None
                or len(mine["weights"]) != n
                or abs(sum(mine["weights"]) - 1) > 1e-6
                or mine["step_size"] != dro.step_size
            ):
                raise state_error(
                    path, "dro", mine, f"{n} Group-DRO weights summing to 1 with step size {dro.step_size}"
                )


def _entry_checks(path: Path, state: dict) -> dict:
    """Each entry of trainer_state.json: (whether it is valid, what it should be)."""
    match = STEP_DIR.fullmatch(path.name)
    step, dro = state.get("step"), state.get("dro")
    return {
        "step": (
            _count(step) and (match is None or step == int(match.group(1))),
            f"the step of {path.name}" if match else "a step count",
        ),
        "data_position": (
            isinstance(state.get("data_position"), list)
            and len(state["data_position"]) == 2
            and all(_count(v) for v in state["data_position"]),
            "[epoch, micro-batches taken]",
        ),
        "worst_group": (state.get("worst_group") is None or _count(state.get("worst_group")), "a group id or null"),
        "worst_switches": (_count(state.get("worst_switches")), "a count"),
        "world_size": (_count(state.get("world_size")) and state.get("world_size") >= 1, "a number of processes"),
        "data_sha256": (_sums(state.get("data_sha256")), "a list of sha256 sums"),
        "eval_data_sha256": (
            state.get("eval_data_sha256") is None or _sums(state["eval_data_sha256"]),
            "a list of sha256 sums or null",
        ),
        "data_strategy": (
            state.get("data_strategy") is None or isinstance(state["data_strategy"], dict),
            "a manifest entry or null",
        ),
        "eval_data_strategy": (
            state.get("eval_data_strategy") is None or isinstance(state["eval_data_strategy"], dict),
            "a manifest entry or null",
        ),
        "dro": (
            dro is None
            or (
                isinstance(dro, dict)
                and isinstance(dro.get("weights"), list)
                and all(is_finite(w) and w >= 0 for w in dro["weights"])
                and is_finite(dro.get("step_size"))
            ),
            "Group-DRO weights (finite, not negative) and a step size, or null",
        ),
        "run_id": (isinstance(state.get("run_id"), str), "a run id string"),
        "settings": (isinstance(state.get("settings"), dict), "the run's settings"),
        **{key: (_count(state.get(key, 0)), "a count") for key in (*CUT_KEYS, "nonfinite_skipped")},
    }


def check_schedule(path: Path, scheduler, cfg: TrainConfig, step: int) -> None:
    """Refuse a learning-rate schedule state from another run or edited (its base lr, step, warm-up, floor)."""
    if any(not math.isclose(base, cfg.lr, rel_tol=1e-9) for base in scheduler.base_lrs):
        raise CheckpointError(
            f"{path / 'trainer_state.pt'} holds a learning-rate schedule from lr "
            f"{scheduler.base_lrs[0]!r}, not this run's --lr {cfg.lr!r}: the checkpoint belongs to "
            "another run or was edited."
        )
    for fn in scheduler.lr_lambdas:
        if (
            scheduler.last_epoch != step
            or fn.warmup != cfg.warmup_steps
            or not math.isclose(fn.min_ratio, cfg.min_lr_ratio)
        ):
            raise CheckpointError(
                f"{path / 'trainer_state.pt'} holds a learning-rate schedule at step "
                f"{scheduler.last_epoch} with {fn.warmup} warm-up steps and --min-lr-ratio "
                f"{fn.min_ratio!r}, not this run's step {step}, {cfg.warmup_steps} and "
                f"{cfg.min_lr_ratio!r}: the checkpoint belongs to another run or was edited."
            )


SHAPES_RUN = (
    "model",
    "objective",
    "groups",
    "group_weight",
    "lam",
    "lam_schedule",
    "lam_end",
    "reduce",
    "temperature",
    "dro_step",
    "batch_tokens",
    "max_length",
    "pack",
    "padding_free",
    "grad_accum",
    "shuffle_buffer",
    "bucket_pool",
    "epochs",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "clip_grad",
    "seed",
    "precision",
    "lora_r",
    "lora_alpha",
    "eval_batches",
    "fsdp",
)
BY_CONTENT = ("data", "eval_data")
OPERATIONAL = (
    "out",
    "readahead",
    "stop_after",
    "skip_nonfinite",
    "ce_chunk",
    "grad_checkpointing",
    "compile",
    "ac_every",
    "trust_remote_code",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "resume",
    "log_every",
    "progress",
    "tensorboard",
    "report_to",
    "save_adapter",
    "storage_options",
    "cache_dir",
    "cache_limit",
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
        raise ConfigError(
            f"--resume {state} {_flag(name)} would not continue the same run (it was started "
            f"{'with' if before is not None else 'without'} one)."
        )
    raise ConfigError(
        f"--resume refused: the shards in {path} are not the ones this run was trained on "
        f"({sum(a != b for a, b in zip(now, before)) + abs(len(now) - len(before))} of {len(before)} "
        f"differ by checksum); resume with the same {_flag(name)} or start a new --out."
    )


def check_settings(cfg: TrainConfig, saved: dict, step: int) -> list[str]:
    """Refuse a change of a setting that shapes the run; return notes on applied changes."""
    now = _plain(dataclasses.asdict(cfg))
    for key in SHAPES_RUN:
        if now[key] != saved.get(key):
            raise ConfigError(
                f"--resume with a different {_flag(key)} ({saved.get(key)!r} before, {now[key]!r} now) "
                f"would not continue the same run; use the same value or start a new --out."
            )
    before, after = saved.get("max_steps"), now["max_steps"]
    if after == before:
        return []
    if not (before and after and after > before):
        raise ConfigError(
            f"--resume with a different --max-steps ({before!r} before, {after!r} now) would not "
            f"continue the same run; only raising it (to train longer) is supported."
        )
    if after <= step:
        raise ConfigError(f"--max-steps {after} is not past the checkpoint's step {step}; nothing would be trained.")
    return [
        f"--max-steps raised from {before} to {after}: training continues from step {step} to {after}, and the "
        f"learning-rate schedule (warm-up, cosine decay) and the λ schedule are recomputed for {after} steps, "
        f"so from step {step} on they follow the longer schedule (the lr rises to its value at step {step} of it)."
    ]


def settings_of(cfg: TrainConfig) -> dict:
    """The settings a checkpoint records: those that shape the run."""
    now = _plain(dataclasses.asdict(cfg))
    return {key: now[key] for key in SHAPES_RUN}


def data_identity(cfg: TrainConfig, manifest: dict, eval_manifest: dict | None) -> dict:
    """What a checkpoint records of its data: the shards' sha256 lists and the manifests' --groups entries."""

    def entry(m):
        return None if m is None or not cfg.groups else _plain(m.get("strategies", {}).get(cfg.groups))

    return {
        "data_sha256": shard_checksums(manifest),
        "eval_data_sha256": shard_checksums(eval_manifest),
        "data_strategy": entry(manifest),
        "eval_data_strategy": entry(eval_manifest),
    }


def check_run(cfg: TrainConfig, state: CheckpointState, run_id: str | None, path) -> None:
    """Refuse a checkpoint of another run (its id) or written with other settings than the run's."""
    if run_id is None:
        raise ConfigError(
            f"{cfg.out} has no run id (it was started by an older sftgo-train), so --resume cannot check "
            f"that {path} belongs to it; start a new --out."
        )
    if state.run_id != run_id:
        raise ConfigError(
            f"The checkpoint {path} belongs to another run (run id {state.run_id[:12]}, this run "
            f"directory's is {run_id[:12]}): it was copied in from elsewhere; resume that run in its own "
            "directory, or start a new --out."
        )
    now = settings_of(cfg)
    for key in SHAPES_RUN:
        if state.settings.get(key) != now[key]:
            raise ConfigError(
                f"The checkpoint {path} was written with {_flag(key)} {state.settings.get(key)!r}, not "
                f"this run's {now[key]!r}: it belongs to another run or was edited; resume from one of "
                "this run's checkpoints or start a new --out."
            )


def check_strategy(name: str, cfg: TrainConfig, now, before) -> None:
    if now == before:
        return
    directory = getattr(cfg, name)
    keys = sorted(k for k in set(now or {}) | set(before or {}) if (now or {}).get(k) != (before or {}).get(k))
    raise ConfigError(
        f"--resume refused: the '{cfg.groups}' entry of {directory}/manifest.json differs from the one "
        f"this run was trained with ({', '.join(keys) or 'present before, absent now'}), though its shards "
        f"match; resume with the same {_flag(name)} or start a new --out."
    )


def check(cfg: TrainConfig, saved: dict, state: CheckpointState, data: dict, run_id: str | None, path) -> list[str]:
    """All resume checks, settings first; returns the notes to log.  `data`: data_identity now."""
    step = state.step
    notes = check_settings(cfg, saved, step)
    check_run(cfg, state, run_id, path)
    if cfg.stop_after and cfg.stop_after <= step:
        raise ConfigError(
            f"--stop-after {cfg.stop_after} is not past the checkpoint's step {step}; nothing would be "
            "trained (raise it, or leave it out to train to the end)."
        )
    check_data("data", data["data_sha256"], state.data_sha256, cfg.data)
    check_data("eval_data", data["eval_data_sha256"], state.eval_data_sha256, cfg.eval_data)
    check_strategy("data", cfg, data["data_strategy"], state.data_strategy)
    if cfg.eval_data:
        check_strategy("eval_data", cfg, data["eval_data_strategy"], state.eval_data_strategy)
    return notes


def restore(r, path: Path) -> None:
    """Continue the run `r` (trainer.loop.Run) from checkpoint `path`: optimizer, schedule, RNG, data position,
    objective state.  Every value read is checked against this run (the checkpoint is untrusted input), and the
    learning rate is always this run's --lr on this run's schedule, never the checkpoint's."""
    from sftgo.trainer import checkpoint as ckpt
    from sftgo.trainer import fsdp

    cfg = r.cfg
    fresh = ckpt.optimizer_settings(r.optimizer)
    if cfg.fsdp:
        fsdp.load(path, r.train_net, r.optimizer)  # weights and optimizer state, each rank its shards
    state = CheckpointState.read(path)
    ckpt.load_state(path, r.rank, r.optimizer, r.scheduler, fresh, sharded=cfg.fsdp)
    state.fits(path, world=r.world, total_steps=r.total_steps, grad_accum=cfg.grad_accum, groups=r.k, dro=r.dro)
    step, (epoch, taken) = state.step, state.data_position
    sched = r.scheduler
    check_schedule(path, sched, cfg, step)
    for fn in sched.lr_lambdas:
        fn.total = r.total_steps  # the checkpoint holds the old length; a raised --max-steps recomputes it
    lrs = [cfg.lr * fn(step) for fn in sched.lr_lambdas]
    for group, lr in zip(r.optimizer.param_groups, lrs):
        group["lr"], group["initial_lr"] = lr, cfg.lr
    sched.base_lrs, sched._last_lr = [cfg.lr] * len(lrs), lrs
    r.step = step
    r.batches.position = (epoch, taken)
    r.worst_prev, r.switches = state.worst_group, state.worst_switches
    r.cut = state.cut
    r.nonfinite_skipped = state.nonfinite_skipped
    if r.dro is not None:
        r.dro.load_state_dict(state.dro)
