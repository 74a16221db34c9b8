"""Typed configuration of `sftgo-prep build` and `sftgo-prep score`.

Input: values from flags and/or a JSON/TOML/YAML config file (flags win; sftgo.core.config
checks every value against its field's type).
Output: a BuildConfig, validated, whose `params()` is what the manifest records.  The same
object travels to the Dask workers (no untyped dict in between).  The flags of `sftgo-prep`
read their defaults and help from this class (pipeline/cli.py), so each default is written once.
Cost: none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sftgo.core.config import check_fields
from sftgo.core.errors import ConfigError
from sftgo.core.storage import is_url, parse_options
from sftgo.grouping import registry
from sftgo.grouping.tfidf import WORD_PATTERN, find_terms
from sftgo.pipeline import gpus
from sftgo.pipeline.formats import CANONICAL_FIELDS
from sftgo.pipeline.readers import MAX_RECORD_BYTES

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion")
THRESHOLDS = ("sample", "corpus")
BYTES_PER_TOKEN = 64  # record bytes per --max-length token before a record is too_large: a token is ~4 bytes of
# text, up to ~12 as JSON escapes, and records carry fields that are not tokenized


@dataclass
class BuildConfig:
    inputs: list[str] = field(default_factory=list)
    """Input files, directories, `datasets` save_to_disk folders, hub dataset names (`hf:NAME`) or URLs of an object
    store: an object, a folder or a glob (s3://bucket/data/*.jsonl; also gs://, abfs://, hf://, memory://, file://)."""
    out: str = ""
    """Output directory or object-store URL (s3://bucket/prefix, gs://, abfs://): manifest.json, fitted artifacts
    and shard-NNNNN.parquet files."""
    strategies: list[str] = field(default_factory=lambda: ["tfidf"])
    """Importance strategies to score; one importance_/group_ column pair each."""
    eta: float = 0.3
    """Fraction of each sample's supervised tokens that form the important group (group 1)."""
    num_groups: int = 2
    """Number of groups. 2: top-eta vs rest. K > 2: K equal-size rank quantiles, K-1 most important."""
    threshold: str = "sample"
    """sample: each sample's own top eta (rank quantiles); corpus: cut-offs are quantiles of every supervised token's
    score in the corpus."""
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
    max_record_bytes: int | None = None
    """Largest input record read, in bytes (a JSONL line; the text of a row of other formats); larger ones are
    rejected as too_large without being held whole. None = 64 bytes per --max-length token, at least 16 MiB;
    0 = no limit."""
    tfidf_unit: str = "word"
    """TF-IDF term unit: word (regex words of the response, lowercased) or token (token ids)."""
    tfidf_token_pattern: str = WORD_PATTERN
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
    gpu_workers: str = "auto"
    """Where the model strategies (reference, semantic) run: auto = on the workers that advertise a GPU resource
    (`dask worker ADDRESS --resources GPU=1 --nthreads 1`: one model per worker, one task at a time) if any, else
    on any worker; require = the same, and a cluster without such a worker is an error; off = on any worker;
    cuda = start a local dask-cuda cluster, one worker per visible GPU (needs dask-cuda; not with --scheduler)."""
    rejects: str | None = None
    """Optional JSONL file (or object-store URL) that receives every rejected record with its reason."""
    storage_options: dict = field(default_factory=dict)
    """Options of the object store behind URLs (a JSON object: credentials, endpoint_url, ...); by default each
    store's standard environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)."""
    overwrite: bool = False
    """Replace an existing build (finished or not) in `out`."""
    trust_remote_code: bool = False
    """Allow custom tokenizer code from the hub (only when you trust the source)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    storage_options: dict = field(default_factory=dict)
    """Options of the object store of URL inputs and outputs, as a JSON object (for S3 e.g. {"endpoint_url": ...,
    "key": ..., "secret": ...}); {} = the backend's standard environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
    AZURE_STORAGE_*, HF_TOKEN).  It may hold credentials: it is never written to the manifest or the build's
    records, and it travels to the tasks as data."""

    def validate(self) -> BuildConfig:
        check_fields(self)  # values from Python callers stay typed too
        if not self.inputs:
            raise ConfigError("Give at least one INPUT file, folder or dataset name.")
        if not self.out:
            raise ConfigError("Give the output directory with --out.")
        check_strategies(self.strategies)
        if not 0.0 < self.eta < 1.0:
            raise ConfigError(f"--eta must be between 0 and 1 (exclusive), got {self.eta}.")
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"--threshold must be sample or corpus, got {self.threshold!r}.")
        if not 2 <= self.num_groups <= MAX_GROUPS:
            raise ConfigError(
                f"--num-groups must be between 2 and {MAX_GROUPS} (group ids are stored as int8), "
                f"got {self.num_groups}."
            )
        check_field_map(self.field_map)
        self.storage_options = parse_options(self.storage_options, "storage_options")
        for name in MODEL_SETTINGS:  # recorded in the manifest, read again by inspect/score/train from anywhere
            setattr(self, name, absolute_if_local(getattr(self, name)))
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8 tokens, got {self.max_length}.")
        self.max_record_bytes = self.record_limit()  # the manifest records the limit the build used
        if self.max_record_bytes < 0:
            raise ConfigError(f"--max-record-bytes must be 0 (no limit) or more, got {self.max_record_bytes}.")
        if self.overflow not in ("truncate", "drop"):
            raise ConfigError(f"--overflow must be truncate or drop, got {self.overflow!r}.")
        if self.tfidf_unit not in ("word", "token"):
            raise ConfigError(f"--tfidf-unit must be word or token, got {self.tfidf_unit!r}.")
        find_terms(
            "", [], self.tfidf_token_pattern
        )  # a bad regex is refused here in one sentence, not as a worker failure
        if self.reference_mode not in ("loss", "excess"):
            raise ConfigError(f"--reference-mode must be loss or excess, got {self.reference_mode!r}.")
        if self.reference_mode == "excess" and not self.base_model:
            raise ConfigError("--reference-mode excess needs --base-model (score = base loss - reference loss).")
        if self.score_batch_tokens < 64:
            raise ConfigError("--score-batch-tokens must be at least 64.")
        if self.rows_per_shard < 1:
            raise ConfigError("--rows-per-shard must be at least 1.")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1.")
        gpus.check_mode(self.gpu_workers, self.scheduler)
        if self.format not in FORMATS:
            raise ConfigError(
                f"Unknown --format {self.format!r}; choose auto, alpaca, messages, sharegpt or prompt_completion."
            )
        return self

    def record_limit(self) -> int:
        """--max-record-bytes, or its default when not given."""
        if self.max_record_bytes is None:
            return max(MAX_RECORD_BYTES, BYTES_PER_TOKEN * self.max_length)
        return self.max_record_bytes

    def strategy_objects(self) -> list:
        return [registry.get(s) for s in self.strategies]

    def params(self) -> dict:
        """Everything that determines the output bytes (recorded in the manifest)."""
        skip = {"out", "workers", "scheduler", "gpu_workers", "rejects", "overwrite", "progress", "storage_options"}
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {**params, "max_record_bytes": self.record_limit()}  # the limit used, given or not


MAX_GROUPS = 127  # the shards' group columns are int8, with -1 for unsupervised tokens


MODEL_SETTINGS = ("tokenizer", "reference_model", "base_model", "compressor_model", "semantic_encoder")


def absolute_if_local(name: str | None) -> str | None:
    """A model or tokenizer given as an existing local path, made absolute; other names as given."""
    if not name:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_field_map(field_map: dict[str, str]) -> None:
    """The checks --field-map gets, for a field map from a config file or a Python caller too."""
    for canonical, name in field_map.items():
        if canonical not in CANONICAL_FIELDS:
            raise ConfigError(
                f"Field map names unknown field '{canonical}'; known fields: {', '.join(CANONICAL_FIELDS)}."
            )
        if not name.strip():
            raise ConfigError(f"Field map gives field '{canonical}' an empty name.")


# settings that only one strategy reads: (field, the strategy that uses it)
STRATEGY_SETTINGS = (
    ("reference_model", "reference"),
    ("reference_mode", "reference"),
    ("base_model", "reference"),
    ("score_batch_tokens", "reference"),
    ("compressor_model", "semantic"),
    ("semantic_encoder", "semantic"),
    ("tfidf_unit", "tfidf"),
    ("tfidf_token_pattern", "tfidf"),
)


def ignored_settings(cfg: BuildConfig, strategies: list[str]) -> list[str]:
    """One note per setting given (different from its default) that nothing in this run reads."""
    defaults = BuildConfig()
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    notes = [
        f"{flag(name)} is ignored: it applies to the {used} strategy, which this run does not score."
        for name, used in STRATEGY_SETTINGS
        if name in changed and used not in strategies
    ]
    if "base_model" in changed and "reference" in strategies and cfg.reference_mode != "excess":
        notes.append("--base-model is ignored: it is read only with --reference-mode excess.")
    if "semantic_encoder" in changed and "semantic" in strategies and cfg.compressor_model:
        notes.append("--semantic-encoder is ignored: --compressor-model replaces the embedding-occlusion default.")
    if "tfidf_token_pattern" in changed and "tfidf" in strategies and cfg.tfidf_unit == "token":
        notes.append("--tfidf-token-pattern is ignored: with --tfidf-unit token the terms are token ids.")
    if "storage_options" in changed and not any(is_url(x) for x in [*cfg.inputs, cfg.out]):
        notes.append("--storage-options is ignored: no input or output is a URL of an object store.")
    if "workers" in changed and cfg.scheduler:
        notes.append(f"--workers is ignored: the cluster at --scheduler {cfg.scheduler} runs with its own workers.")
    if "workers" in changed and cfg.gpu_workers == "cuda":
        notes.append("--workers is ignored: --gpu-workers cuda starts one worker per visible GPU.")
    if cfg.gpu_workers in ("require", "off") and not gpus.accelerated([registry.get(s) for s in strategies]):
        notes.append(
            f"--gpu-workers {cfg.gpu_workers} is ignored: no strategy of this run runs a model (reference, semantic)."
        )
    if "eta" in changed and cfg.num_groups > 2:
        notes.append(
            f"--eta is ignored: --num-groups {cfg.num_groups} makes equal quantiles (eta sets group 1 of two)."
        )
    return notes


def check_strategies(names: list[str]) -> None:
    known = registry.names()
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise ConfigError(f"Unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}.")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategy names a strategy twice ({', '.join(names)}).")
