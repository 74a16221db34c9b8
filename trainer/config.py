"""The training configuration: one typed dataclass, loaded from flags and/or a config file.

Input: keyword values (from click flags) and optionally a JSON, TOML or YAML file (values
type-checked against the field annotations by sftgo.core.config).
Output: a validated `TrainConfig`, or a `ConfigError` with a one-sentence message.
Cost: instant.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from sftgo.core.config import load_config_file


# The names only (trainer.objectives holds the losses): reading them imports no torch, so that
# `sftgo-train` refuses a bad setting in a fraction of a second.
OBJECTIVES = ("sftgo", "sft", "rho1", "dft", "weighted")
SCHEDULES = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class TrainConfig:
    # --- what to train on, and where to put it
    data: str = ""
    """Shard directory written by `sftgo-prep build` (manifest.json + shard-*.parquet)."""
    out: str = ""
    """Run directory: metrics.jsonl, loss_curves.png, checkpoints/, model/ (final weights)."""
    model: str | None = None
    """Model to fine-tune: None/"embedded" (SmolLM2-135M-Instruct), a local HF dir, a .gguf or a hub id."""
    eval_data: str | None = None
    """Held-out shard directory evaluated every `eval_every` steps (per-group loss)."""

    # --- objective
    objective: str = "sftgo"
    """sftgo (worst-group), sft (plain token-mean CE), rho1 (CE over the important group only), dft (each token's CE times its detached probability, arXiv 2508.05629) or weighted (CE with weight --group-weight on the important group)."""
    groups: str | None = "tfidf"
    """Strategy whose `group_<name>` column defines the groups (not needed by `sft`)."""
    lam: float = 0.9
    """λ, the weight of the worst-group term (0 = plain SFT; the paper uses 0.9)."""
    group_weight: float = 1.0
    """--objective weighted: the weight on the important group's tokens (1 on the others; a weighted token mean). Match it to the group-1 weight an sftgo run logs (group_weight)."""
    lam_schedule: str = "constant"
    """constant, linear or cosine decay of λ from `lam` to `lam_end` over training."""
    lam_end: float = 0.0
    """Final λ of a linear/cosine schedule."""
    reduce: str = "sample"
    """sample: per-sample max over groups, then mean; batch: max over batch-level group means."""
    temperature: float = 0.0
    """> 0 replaces the max with a smooth max (log-mean-exp) at this temperature."""
    dro_step: float = 0.0
    """> 0 replaces the max with online Group-DRO weights updated with this step size."""

    # --- data and batching
    batch_tokens: int = 4096
    """Token budget of one micro-batch per process (rows x padded length, or rows x row length when packing); a longer sample gets a micro-batch of its own, never cut."""
    max_length: int = 2048
    """Samples longer than this are truncated (counted in metrics and summary); the row length when packing."""
    pack: bool = False
    """Pack several samples per row (position ids restart; no attention across samples)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    shuffle_buffer: int = 1024
    """Samples held for shuffling (memory bound); 0 keeps the shard order within a shard."""
    readahead: int = 2
    """Parquet record batches read ahead by the background reader (memory bound)."""
    bucket_pool: int = 16
    """Length bucketing sorts pools of about this many micro-batches worth of samples."""

    # --- length of training
    max_steps: int = 0
    """Optimizer steps to train (0: use `epochs`)."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is 0 (whole passes; a fraction rounds the step count)."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this step without changing the schedule, e.g. for time-sliced jobs; 0 = off."""

    # --- optimisation
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 0
    """Seeds the data order and torch; the same seed gives the same run."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs that support it, fp32 otherwise), bf16 (on a GPU, or a CPU with native bf16: AVX512-BF16 or AMX) or fp32."""
    ce_chunk: int = 1024
    """Tokens per chunk of the lm_head + cross-entropy (bounds the fp32 logits in memory)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (less memory, about 30% slower)."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state across the torchrun ranks (FSDP2, per decoder layer) instead of DDP: for models that do not fit one device."""
    lora_r: int = 0
    """> 0 trains LoRA adapters of this rank through peft instead of all weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository (only when you trust it)."""

    # --- evaluation, checkpoints, logging
    eval_every: int = 0
    """Evaluate `eval_data` every N steps (0: only at the start and the end)."""
    eval_batches: int = 0
    """Cap on eval micro-batches per process (0 = the whole eval set)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    resume: bool = False
    """Continue from the latest checkpoint in `out` (same data order, optimizer, schedule, RNG)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    progress: bool = True
    """Show a tqdm progress bar."""
    report_to: list[str] = field(default_factory=list)
    """Also log to these trackers: tensorboard (out/tb), wandb (offline with WANDB_MODE=offline), mlflow (out/mlruns unless MLFLOW_TRACKING_URI is set); each must be installed (pip install 'sftgo[wandb]')."""
    save_adapter: bool = False
    """With --lora-r: also write the peft adapter alone (out/adapter) beside the merged model (out/model)."""
    tensorboard: bool | None = None
    """Also log to TensorBoard (out/tb); default: when the tensorboard package is installed (a note says when not)."""

    def validate(self) -> "TrainConfig":
        if self.save_adapter and self.lora_r == 0:
            raise ConfigError("--save-adapter needs --lora-r: without LoRA there is no adapter to save.")
        if self.fsdp and self.lora_r > 0:
            raise ConfigError("--fsdp with --lora-r is not supported: LoRA adapters are small, train them with DDP (the default).")
        if not self.data:
            raise ConfigError("--data is required: the shard directory written by `sftgo-prep build`.")
        if not self.out:
            raise ConfigError("--out is required: the run directory for metrics and checkpoints.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}.")
        if self.group_weight <= 0:
            raise ConfigError(f"--group-weight must be positive, got {self.group_weight}.")
        if self.objective not in ("sft", "dft") and not self.groups:
            raise ConfigError(f"--objective {self.objective} needs --groups (a strategy of the shards, e.g. tfidf).")
        if self.lam_schedule not in SCHEDULES:
            raise ConfigError(f"--lam-schedule must be one of {', '.join(SCHEDULES)}, not {self.lam_schedule!r}.")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.lam_end <= 1.0:
            raise ConfigError("--lam and --lam-end must lie in [0, 1].")
        if self.reduce not in ("sample", "batch"):
            raise ConfigError(f"--reduce must be 'sample' or 'batch', not {self.reduce!r}.")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32, not {self.precision!r}.")
        for name in ("batch_tokens", "max_length", "grad_accum", "ce_chunk", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ConfigError("Give a positive --max-steps or --epochs.")
        if self.temperature < 0 or self.dro_step < 0:
            raise ConfigError("--temperature and --dro-step must not be negative.")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# settings read only under one objective
OBJECTIVE_SETTINGS = (("lam", "sftgo"), ("lam_schedule", "sftgo"), ("lam_end", "sftgo"), ("reduce", "sftgo"),
                      ("temperature", "sftgo"), ("dro_step", "sftgo"), ("group_weight", "weighted"))


def ignored_settings(cfg: TrainConfig) -> list[str]:
    """One note per setting given (different from its default) that this run does not read."""
    defaults = TrainConfig()
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    notes = [f"{flag(name)} is ignored: only --objective {used} reads it, not {cfg.objective}."
             for name, used in OBJECTIVE_SETTINGS if name in changed and cfg.objective != used]
    rules = (
        ("lam_end", cfg.objective == "sftgo" and cfg.lam_schedule == "constant", "the λ schedule is constant"),
        ("temperature", cfg.objective == "sftgo" and cfg.dro_step > 0, "--dro-step replaces the max"),
        ("reduce", cfg.objective == "sftgo" and cfg.dro_step > 0, "--dro-step replaces the max"),
        ("lora_alpha", cfg.lora_r == 0, "there is no LoRA without --lora-r"),
        ("eval_every", not cfg.eval_data, "there is no --eval-data"),
        ("eval_batches", not cfg.eval_data, "there is no --eval-data"),
        ("bucket_pool", cfg.pack, "--pack fills rows first-fit instead of bucketing"),
        ("epochs", cfg.max_steps > 0, "--max-steps sets the length of training"),
    )
    notes += [f"{flag(name)} is ignored: {why}." for name, applies, why in rules if name in changed and applies]
    return notes


def read_config_file(path: str) -> dict:
    """Values from a JSON or TOML file (keys are TrainConfig field names; dashes allowed)."""
    try:
        values = load_config_file(path, TrainConfig)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return values


def make_config(file_values: dict | None = None, **overrides) -> TrainConfig:
    """File values first, then overrides (the flags the user actually gave)."""
    values = dict(file_values or {})
    values.update(overrides)
    return TrainConfig(**values).validate()
