"""The training configuration: one typed dataclass, loaded from flags and/or a config file.

Input: keyword values (from click flags) and optionally a JSON, TOML or YAML file (values
type-checked against the field annotations by sftgo.core.config).
Output: a validated `TrainConfig`, or a `ConfigError` with a one-sentence message.
Cost: instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from sftgo.core.config import load_config_file
from sftgo.core.errors import ConfigError  # the one both CLIs raise; importable from here as before
from sftgo.core.storage import is_remote, is_url, local_path, parse_options
from sftgo.trainer import registry

# Importing this module (and trainer/registry.py) imports no torch, so that `sftgo-train` refuses a bad
# setting in a fraction of a second.
SCHEDULES = ("constant", "linear", "cosine")


REDUCES = ("sample", "batch")
PRECISIONS = ("auto", "bf16", "bf16-state", "fp32")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # --report-to name -> package
CHOICES = {"objective": registry.names, "lam_schedule": SCHEDULES, "reduce": REDUCES, "precision": PRECISIONS}

# The valid range of every number of TrainConfig (and of the Hugging Face integration's num_groups):
# (int or float, low, high, low end excluded, why).  A test checks that every numeric field is here;
# NaN and infinities are never valid.
RANGES = {
    "lam": ("float", 0.0, 1.0, False, ""),
    "lam_end": ("float", 0.0, 1.0, False, ""),
    "group_weight": ("float", 0.0, math.inf, True, ""),
    "temperature": ("float", 0.0, math.inf, False, " (0 keeps the plain max)"),
    "dro_step": ("float", 0.0, math.inf, False, " (0 turns Group-DRO off)"),
    "batch_tokens": ("int", 1, math.inf, False, ""),
    "max_length": ("int", 2, math.inf, False, " (a sample needs two tokens to have a target)"),
    "grad_accum": ("int", 1, math.inf, False, ""),
    "shuffle_buffer": ("int", 0, math.inf, False, " (0 keeps the shard order)"),
    "readahead": ("int", 0, math.inf, False, ""),
    "bucket_pool": ("int", 1, math.inf, False, ""),
    "max_steps": ("int", 0, math.inf, False, " (0: --epochs sets the length)"),
    "epochs": ("float", 0.0, math.inf, True, ""),
    "stop_after": ("int", 0, math.inf, False, " (0 = off)"),
    "lr": ("float", 0.0, math.inf, True, ""),
    "min_lr_ratio": ("float", 0.0, 1.0, False, " (the cosine schedule ends at --lr times it)"),
    "warmup_steps": ("int", 0, math.inf, False, ""),
    "weight_decay": ("float", 0.0, math.inf, False, ""),
    "clip_grad": ("float", 0.0, math.inf, False, " (0 = off)"),
    "skip_nonfinite": ("int", 0, math.inf, False, " (0: the first non-finite step stops the run)"),
    "seed": ("int", 0, 2**63 - 1, False, ""),
    "ce_chunk": ("int", 1, math.inf, False, ""),
    "ac_every": ("int", 1, math.inf, False, " (1: every decoder layer)"),
    "lora_r": ("int", 0, math.inf, False, " (0 = no LoRA)"),
    "lora_alpha": ("float", 0.0, math.inf, True, ""),
    "eval_every": ("int", 0, math.inf, False, " (0: only at the start and the end)"),
    "eval_batches": ("int", 0, math.inf, False, " (0 = the whole eval set)"),
    "save_every": ("int", 0, math.inf, False, " (0: only at the end)"),
    "keep_checkpoints": ("int", 1, math.inf, False, ""),
    "log_every": ("int", 1, math.inf, False, ""),
    "num_groups": ("int", 2, math.inf, False, " (the losses need two groups)"),
}


REMOTE_ONLY = ("storage_options", "cache_dir", "cache_limit")  # read only for --data / --eval-data URLs
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
SIZE_UNITS.update({"GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})


def parse_size(value, what: str) -> int:
    """Bytes from a size such as 2GB, 500MB, 1.5G, 64MiB or a plain number of bytes; one sentence otherwise."""
    text = str(value).strip().upper().replace(" ", "") if not isinstance(value, bool) else ""
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        size = float(number) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        size = math.nan
    if not math.isfinite(size) or size < 1:
        raise ConfigError(f"{what} must be a size such as 2GB, 500MB or a number of bytes, not {value!r}.")
    return int(size)


def cli_flag(name: str) -> str:
    """How sftgo-train names a setting: its command-line flag."""
    return "--" + name.replace("_", "-")


def _bound(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _shown(value) -> str:
    return repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)


def check_number(name: str, value, flag=cli_flag):
    """`value` as the int or float setting `name` wants, or a one-sentence ConfigError naming flag(name)."""
    kind, low, high, low_open, why = RANGES[name]
    if kind == "int":
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ConfigError(f"{flag(name)} must be an integer, not {value!r}.")
        value = int(value)
    else:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConfigError(f"{flag(name)} must be a number, not {value!r}.")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{flag(name)} must be a finite number, not {value}.")
    if value < low or (low_open and value == low) or value > high:
        if high != math.inf:
            where = f"lie in [{_bound(low)}, {_bound(high)}]"
        elif low_open:
            where = "be positive" if low == 0 else f"be greater than {_bound(low)}"
        else:
            where = "be 0 or more" if low == 0 else f"be at least {_bound(low)}"
        raise ConfigError(f"{flag(name)} must {where}{why}, not {_shown(value)}.")
    return value


def choices(name: str) -> tuple[str, ...]:
    """The values setting `name` takes (the objectives: those registered, built-in or installed)."""
    values = CHOICES[name]
    return values() if callable(values) else values


def check_choice(name: str, value, flag=cli_flag) -> str:
    if not isinstance(value, str) or value not in choices(name):
        raise ConfigError(f"{flag(name)} must be one of {', '.join(choices(name))}, not {value!r}.")
    return value


def check_betas(betas, flag=cli_flag) -> tuple[float, float]:
    """AdamW's two betas, each a finite number in [0, 1)."""
    ok = (
        isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(
            isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) and 0 <= b < 1 for b in betas
        )
    )
    if not ok:
        raise ConfigError(f"{flag('betas')} must be two finite numbers in [0, 1), not {betas!r}.")
    return tuple(float(b) for b in betas)


@dataclass
class TrainConfig:
    # --- what to train on, and where to put it
    data: str = ""
    """Shard directory written by `sftgo-prep build` (manifest.json + shard-*.parquet)."""
    out: str = ""
    """Run directory: metrics.jsonl, loss_curves.png, checkpoints/, model/ (final weights). It must be new, empty or an
    sftgo-train run (sftgo-run.json), and neither inside nor around --data, --eval-data or a local --model."""
    model: str | None = None
    """Model to fine-tune: None/"embedded" (SmolLM2-135M-Instruct), a local HF dir, a .gguf or a hub id."""
    eval_data: str | None = None
    """Held-out shard directory evaluated every `eval_every` steps (per-group loss)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """For --data/--eval-data URLs (s3://, gs://, ...): the store's options as a JSON object, e.g. '{"endpoint_url":
    "http://127.0.0.1:9000"}' (default: the backend's standard environment, e.g. AWS_*). It may hold credentials, so
    it is never written to the run's config.json, summary or trackers."""
    cache_dir: str | None = None
    """For --data/--eval-data URLs: where each process keeps the shards it streams (a folder of its own inside, removed
    at the end); default: the system's temporary folder."""
    cache_limit: str | None = None
    """For --data/--eval-data URLs: the most bytes each process's cache folder holds, e.g. 2GB, 500MB or a number of
    bytes; at least the largest shard of --data plus that of --eval-data (default: 3 x the largest --data shard, the one
    read and 2 read ahead, plus the largest --eval-data shard)."""

    # --- objective
    objective: str = "sftgo"
    """sftgo (worst-group), sft (plain token-mean CE), rho1 (CE over the important group only), dft (each token's CE
    times its detached probability, arXiv 2508.05629), weighted (CE with weight --group-weight on the important
    group), or an installed plug-in's objective (entry point group sftgo.objectives)."""
    groups: str | None = "tfidf"
    """Strategy whose `group_<name>` column defines the groups; sft and dft only log per-group loss with it (a name the
    shards lack is refused, except this default, which is then a note)."""
    lam: float = 0.9
    """λ, the weight of the worst-group term (0 = plain SFT; the paper uses 0.9)."""
    group_weight: float = 1.0
    """--objective weighted: the weight on the important group's tokens (1 on the others; a weighted token mean). Match
    it to the group-1 weight an sftgo run logs (group_weight)."""
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
    """Token budget of one micro-batch per process (rows x padded length, or rows x row length when packing); a longer
    sample gets a micro-batch of its own, never cut."""
    max_length: int = 2048
    """Samples longer than this are truncated (counted in metrics and summary); the row length when packing."""
    pack: bool = False
    """Pack several samples per row (position ids restart; no attention across samples)."""
    padding_free: bool | None = None
    """Each micro-batch as one flat row of whole samples with no padding, attended sample by sample with varlen
    kernels (the same samples per micro-batch as without it; with --pack, about --batch-tokens tokens each); default:
    on where a fused varlen kernel runs (a GPU in bf16), off elsewhere (forced on there, it runs sdpa per sample:
    correct, slower)."""
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
    skip_nonfinite: int = 0
    """Optimizer steps whose loss or gradient norm is not finite (NaN, inf) that may be skipped (no update; counted
    in metrics and the summary) before the run stops; 0: the first such step stops the run with an error, exports
    no model and keeps the last good checkpoint."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 0
    """Seeds the data order and torch; the same seed gives the same run."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs that support it, fp32 otherwise), bf16 (on a GPU, or a CPU with native bf16:
    AVX512-BF16 or AMX), bf16-state or fp32.  auto and bf16 keep weights, gradients and AdamW's moments in fp32.
    bf16-state (same devices as bf16) keeps all three in bf16, with no fp32 master copy: half their memory, at the
    cost of update precision (an update smaller than about 1/256 of a weight is rounded away, so a low learning
    rate can leave weights unchanged); use it for models whose fp32 state does not fit."""
    ce_chunk: int = 1024
    """Tokens per chunk of the lm_head + cross-entropy (bounds the fp32 logits in memory)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (less memory; each layer's forward runs again in backward)."""
    ac_every: int = 1
    """With --grad-checkpointing: checkpoint every Nth decoder layer only (layers 0, N, 2N, ...): 1 recomputes all,
    larger values trade memory back for speed."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state across the torchrun ranks (FSDP2: one unit per decoder layer, the
    input embedding and the LM head, a tied pair in the root) instead of DDP: for models that do not fit one device."""
    compile: bool | None = None
    """Compile each decoder layer with torch.compile (default: on with CUDA, off on a CPU); the time spent
    compiling is reported apart from the step time (compile_s in metrics.jsonl and summary.json)."""
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
    """Also log to these trackers: tensorboard (out/tb), wandb (offline with WANDB_MODE=offline), mlflow (out/mlruns
    unless MLFLOW_TRACKING_URI is set); each must be installed (pip install 'sftgo[wandb]')."""
    save_adapter: bool = False
    """With --lora-r: also write the peft adapter alone (out/adapter) beside the merged model (out/model)."""
    tensorboard: bool | None = None
    """Also log to TensorBoard (out/tb); default: when the tensorboard package is installed (a note says when not)."""

    def validate(self, flag=None) -> TrainConfig:
        """Every setting checked for its type and range, and the settings against each other, before
        anything is loaded; numbers are normalised (an int where a float is wanted becomes a float).
        `flag(name)`: how a message names a setting (default: the command-line flag, --name-with-dashes)."""
        flag = flag or cli_flag
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in RANGES:
                setattr(self, f.name, check_number(f.name, value, flag))
            elif f.name in CHOICES:
                check_choice(f.name, value, flag)
            elif f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{flag(f.name)} must be true or false, not {value!r}.")
            elif f.type == "bool | None" and value is not None and not isinstance(value, bool):
                raise ConfigError(f"{flag(f.name)} must be true, false or unset, not {value!r}.")
            elif f.type == "str | None" and value is not None and not isinstance(value, str):
                raise ConfigError(f"{flag(f.name)} must be a string, not {value!r}.")
        self.betas = check_betas(self.betas, flag)
        self.storage_options = parse_options(self.storage_options, flag("storage_options"))
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"{flag('cache_dir')} must be a path, not {self.cache_dir!r}.")
        if self.cache_limit is not None:
            self.cache_limit = str(parse_size(self.cache_limit, flag("cache_limit")))
        for name in ("data", "out"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{flag(name)} must be a path, not {getattr(self, name)!r}.")
        for name in ("data", "eval_data", "out", "cache_dir"):  # a file:// URL is the local path it names
            value = getattr(self, name)
            if isinstance(value, str) and is_url(value) and not is_remote(value):
                setattr(self, name, str(local_path(value, flag(name))))
        if not self.data:
            raise ConfigError(f"{flag('data')} is required: the shard directory written by `sftgo-prep build`.")
        if not self.out:
            raise ConfigError(f"{flag('out')} is required: the run directory for metrics and checkpoints.")
        if not isinstance(self.report_to, (list, tuple)) or not all(isinstance(t, str) for t in self.report_to):
            raise ConfigError(f"{flag('report_to')} must be a list of tracker names, not {self.report_to!r}.")
        self.report_to = list(self.report_to)
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError(
                    f"{flag('report_to')} {name!r} is not a tracker sftgo knows; choose from {', '.join(TRACKERS)}."
                )
        if "tensorboard" in self.report_to and self.tensorboard is False:
            raise ConfigError(
                f"{flag('report_to')} tensorboard contradicts {flag('no_tensorboard')}; give one of them."
            )
        if self.save_adapter and self.lora_r == 0:
            raise ConfigError(
                f"{flag('save_adapter')} needs {flag('lora_r')}: without LoRA there is no adapter to save."
            )
        for other in ("grad_checkpointing", "lora_r"):
            if self.compile and getattr(self, other):
                raise ConfigError(
                    f"{flag('compile')} with {flag(other)} is not supported; pass {flag('no_compile')} or drop "
                    f"{flag(other)}."
                )
        if self.fsdp and self.lora_r > 0:
            raise ConfigError(
                f"{flag('fsdp')} with {flag('lora_r')} is not supported: LoRA adapters are small, train them "
                "with DDP (the default)."
            )
        if registry.get(self.objective).groups != "optional" and not self.groups:
            raise ConfigError(
                f"{flag('objective')} {self.objective} needs {flag('groups')} (a strategy of the shards, e.g. tfidf)."
            )
        return self

    def to_json(self) -> str:
        return json.dumps(self.public(), indent=2, sort_keys=True) + "\n"

    def public(self) -> dict:
        """The settings as a dict without those that may hold secrets (SECRET): what config.json and trackers get."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET}


SECRET = ("storage_options",)  # never written anywhere by sftgo-train


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def ignored_settings(cfg: TrainConfig, flag=cli_flag) -> list[str]:
    """One note per setting given (different from its default) that this run does not read."""
    defaults = TrainConfig()
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    reads = registry.get(cfg.objective).settings
    notes = [
        f"{flag(name)} is ignored: only {flag('objective')} {' or '.join(registry.readers(name))} reads it, "
        f"not {cfg.objective}."
        for name in registry.OBJECTIVE_FIELDS
        if name in changed and name not in reads
    ]
    remote_data = any(is_remote(d) for d in (cfg.data, cfg.eval_data) if d)
    sftgo = "lam" in reads  # the rules below are about the worst-group term's settings
    plain = sftgo and cfg.lam == 0 and (cfg.lam_schedule == "constant" or cfg.lam_end == 0)  # λ = 0 throughout
    rules = (
        ("lam_end", sftgo and cfg.lam_schedule == "constant", "the λ schedule is constant"),
        (
            "lam_schedule",
            sftgo and cfg.lam_schedule != "constant" and cfg.lam == cfg.lam_end,
            f"λ starts and ends at {cfg.lam}",
        ),
        ("reduce", plain, "λ is 0 throughout, which is plain SFT"),
        ("temperature", plain, "λ is 0 throughout, which is plain SFT"),
        ("dro_step", plain, "λ is 0 throughout, which is plain SFT"),
        ("temperature", sftgo and not plain and cfg.dro_step > 0, f"{flag('dro_step')} replaces the max"),
        ("reduce", sftgo and not plain and cfg.dro_step > 0, f"{flag('dro_step')} replaces the max"),
        (
            "ac_every",
            not cfg.grad_checkpointing,
            f"there is no activation checkpointing without {flag('grad_checkpointing')}",
        ),
        ("lora_alpha", cfg.lora_r == 0, f"there is no LoRA without {flag('lora_r')}"),
        ("eval_every", not cfg.eval_data, f"there is no {flag('eval_data')}"),
        *((name, not remote_data, f"{flag('data')} and {flag('eval_data')} are local") for name in REMOTE_ONLY),
        ("eval_batches", not cfg.eval_data, f"there is no {flag('eval_data')}"),
        ("bucket_pool", cfg.pack, f"{flag('pack')} fills rows first-fit instead of bucketing"),
        ("epochs", cfg.max_steps > 0, f"{flag('max_steps')} sets the length of training"),
        (
            "stop_after",
            0 < cfg.max_steps <= cfg.stop_after,
            f"the run ends at {flag('max_steps')} {cfg.max_steps} first",
        ),
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
