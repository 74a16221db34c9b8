"""Typed configuration of `sftgo-prep build`.

Input: values from flags and/or a JSON/TOML config file (flags win).
Output: a BuildConfig, validated, whose `params()` is what the manifest records.
Cost: none.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

STRATEGIES = ("tfidf", "reference", "semantic")


@dataclass
class BuildConfig:
    inputs: list[str] = field(default_factory=list)
    """Input files, directories, `datasets` save_to_disk folders or hub dataset names (`hf:NAME`)."""
    out: str = ""
    """Output directory: manifest.json, fitted artifacts and shard-NNNNN.parquet files."""
    strategies: list[str] = field(default_factory=lambda: ["tfidf"])
    """Importance strategies to score; one importance_/group_ column pair each."""
    eta: float = 0.3
    """Fraction of each sample's supervised tokens that form the important group (group 1)."""
    num_groups: int = 2
    """Number of groups. 2: top-eta vs rest. K > 2: K equal-size rank quantiles, K-1 most important."""
    tokenizer: str | None = None
    """Tokenizer (hub id, local dir or .gguf); None = the embedded SmolLM2-135M-Instruct."""
    format: str = "auto"
    """Record format: auto, alpaca, messages, sharegpt or prompt_completion."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Canonical field name -> the name used in the input (e.g. {"output": "answer"})."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict folder."""
    max_length: int = 2048
    """Longest tokenized sample kept; longer ones follow `overflow`."""
    overflow: str = "truncate"
    """What to do with samples longer than max_length: truncate (keep the start) or drop (reject)."""
    tfidf_unit: str = "word"
    """TF-IDF term unit: word (regex words of the response, lowercased) or token (token ids)."""
    tfidf_token_pattern: str = r"(?u)\b\w+\b"
    """Regex defining a word for the word unit (scikit-learn's token_pattern semantics)."""
    reference_model: str | None = None
    """Reference LM of the `reference` strategy (hub id, local dir or .gguf); None = the embedded SmolLM2."""
    reference_mode: str = "loss"
    """`reference` score: loss (the reference LM's per-token loss) or excess (base loss - reference loss, Rho-1)."""
    base_model: str | None = None
    """The base LM of `--reference-mode excess`."""
    score_batch_tokens: int = 8192
    """Token budget of one no-grad forward batch of the model strategies (padded rows x length)."""
    compressor_model: str | None = None
    """LLMLingua-2-compatible token-classification checkpoint for `semantic`; None = embedding occlusion."""
    semantic_encoder: str | None = None
    """Sentence encoder of the occlusion default; None = the packaged all-MiniLM-L6-v2."""
    rows_per_shard: int = 5000
    """Records per input partition; each partition becomes one output shard."""
    workers: int = 2
    """Workers of the local Dask cluster (ignored with `scheduler`)."""
    scheduler: str | None = None
    """Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786."""
    rejects: str | None = None
    """Optional JSONL file that receives every rejected record with its reason."""
    overwrite: bool = False
    """Replace an existing build (finished or not) in `out`."""
    trust_remote_code: bool = False
    """Allow custom tokenizer code from the hub (only when you trust the source)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def validate(self) -> "BuildConfig":
        if not self.inputs:
            raise ValueError("Give at least one INPUT file, folder or dataset name.")
        if not self.out:
            raise ValueError("Give the output directory with --out.")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"Unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}.")
        if not 0.0 < self.eta < 1.0:
            raise ValueError(f"--eta must be between 0 and 1 (exclusive), got {self.eta}.")
        if self.num_groups < 2:
            raise ValueError(f"--num-groups must be at least 2, got {self.num_groups}.")
        if self.max_length < 8:
            raise ValueError(f"--max-length must be at least 8 tokens, got {self.max_length}.")
        if self.overflow not in ("truncate", "drop"):
            raise ValueError(f"--overflow must be truncate or drop, got {self.overflow!r}.")
        if self.tfidf_unit not in ("word", "token"):
            raise ValueError(f"--tfidf-unit must be word or token, got {self.tfidf_unit!r}.")
        if self.reference_mode not in ("loss", "excess"):
            raise ValueError(f"--reference-mode must be loss or excess, got {self.reference_mode!r}.")
        if self.reference_mode == "excess" and not self.base_model:
            raise ValueError("--reference-mode excess needs --base-model (score = base loss - reference loss).")
        if self.score_batch_tokens < 64:
            raise ValueError("--score-batch-tokens must be at least 64.")
        if self.rows_per_shard < 1:
            raise ValueError("--rows-per-shard must be at least 1.")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1.")
        if self.format not in ("auto", "alpaca", "messages", "sharegpt", "prompt_completion"):
            raise ValueError(f"Unknown --format {self.format!r}; choose auto, alpaca, messages, sharegpt or prompt_completion.")
        return self

    def params(self) -> dict:
        """Everything that determines the output bytes (recorded in the manifest)."""
        skip = {"out", "workers", "scheduler", "rejects", "overwrite", "progress"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def load_config_file(path: str, fields=None) -> dict:
    """Values from a JSON or TOML file (by suffix) whose keys are config field names (dashes allowed).

    With `fields` (the dataclass fields), unknown keys are refused. Errors are one-sentence ValueErrors."""
    p = Path(path)
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read config file {path} ({exc}).") from None
    try:
        values = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"Config file {path} is not valid {kind} ({exc}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a table/object of settings.")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(fields)) if fields is not None else []
    if unknown:
        raise ValueError(f"Config file {path} has unknown setting(s): {', '.join(unknown)}.")
    return values
