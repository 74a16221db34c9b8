"""GPU training benchmark: sftgo-train's step against the Hugging Face `Trainer` and TRL's `SFTTrainer`
(Liger kernel, padding-free) on randomly initialised models of published shapes, with MFU.

Input: nothing to download.  Models are built from a config and saved once (bf16 safetensors, random
weights): Llama-3.2-1B, Qwen2.5-1.5B and an 8-layer slice of Llama-3.1-8B (untied head).  The data is
generated once per model as sftgo shards (random token ids, SFT-like lengths, a prompt then a supervised
response, two tfidf-style groups) with a tokenizer of the model's vocabulary size.
Output: OUT/results.json, rewritten after every configuration (a timeout keeps what finished): the
card's measured bf16 matmul rate, then one row per configuration with tokens/s, the timed seconds,
torch.cuda.max_memory_allocated and MFU (trainer/flops.py), or the reason it was skipped or failed.
Cost: `all` runs within --budget seconds (450 on a GPU: about 8 minutes with start-up), every
configuration in a fresh process; what does not fit is a skipped row that says so.  --dry-run: tiny
models on the CPU, the whole chain in about a minute.

Fairness: every trainer trains the same samples in every step.  The steps are sftgo's own micro-batches
(its length-bucketed batcher over the shards, --batch-tokens 16,384 or 4,096), and:
- HF Trainer: bf16 autocast, sdpa attention, the step's samples as right-padded rows with an attention
  mask and labels -100 where no loss is taken, fused AdamW;
- TRL SFTTrainer: use_liger_kernel=True, padding_free=True (the step's samples flattened into one row,
  position ids restarting), completion-only loss, flash attention when flash_attn is importable (else
  sdpa, recorded); its data loader yields exactly the step's samples;
- sftgo: set_up() and one_step() of trainer/loop.py (the loop sftgo-train runs: model wrapper, objective,
  clipping, fused AdamW, schedule), its batcher fed the same steps; the padded layout (its default), and
  where the trainer has them, its padding-free layout and torch.compile (recorded in each row).
All hold fp32 weights and AdamW state and compute in bf16 autocast.  3 warm-up steps, then --steps timed
steps between two torch.cuda.synchronize() calls; tokens/s = real (non-pad) tokens of the timed steps
over that time.

Usage: python bench/gpu/gpubench.py all --out DIR [--dry-run] [--budget S]   (bench/gpu/run.sh runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # bench/: bench_train's helpers

MAX_LENGTH = 4096  # the longest generated sample; sftgo-train's --max-length for every run
LLAMA_ROPE = {"rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
MODELS = {  # published shapes (config.json of each model), random weights
    "llama-3.2-1b": (
        "llama",
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64, **LLAMA_ROPE),
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
             max_position_embeddings=32768, rms_norm_eps=1e-6),
    ),
    "llama-3.1-8b-8layers": (
        "llama",
        dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128, **LLAMA_ROPE),
    ),
    # --dry-run: the same code on the CPU
    "tiny-llama": (
        "llama",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096),
    ),
}  # fmt: skip
TRAINERS = ("sftgo", "hf_trainer", "trl_sft")


# ------------------------------------------------------------------------------------------ the plan
def sftgo_features() -> dict:
    """The optional sftgo-train settings this checkout has (TrainConfig fields): torch.compile, padding-free."""
    from sftgo.trainer.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {"compile": "compile" in names, "padding_free": "padding_free" in names}


def plan(dry_run: bool, features: dict) -> list[dict]:
    """The configurations, most wanted first: a budget that runs out skips the tail (each skip is a row)."""
    best = {"layout": "padding_free" if features["padding_free"] else "padded", "compile": features["compile"]}
    if dry_run:
        best["compile"] = False  # compiling on the CPU would take the dry run's whole budget

    def four(model, tokens):
        return [
            {"model": model, "batch_tokens": tokens, "trainer": "sftgo", "objective": "sft", **best},
            {"model": model, "batch_tokens": tokens, "trainer": "hf_trainer"},
            {"model": model, "batch_tokens": tokens, "trainer": "trl_sft"},
            {"model": model, "batch_tokens": tokens, "trainer": "sftgo", "objective": "sftgo", **best},
        ]

    if dry_run:  # every code path once: sftgo padded and --pack, both objectives, HF, TRL
        f = four("tiny-llama", 512)
        return f[:3] + [{**f[3], "layout": "pack"}]
    out = four("llama-3.2-1b", 16384) + four("qwen2.5-1.5b", 16384)
    plain = {"layout": "padded", "compile": False}
    sft = {"model": "llama-3.2-1b", "batch_tokens": 16384, "trainer": "sftgo", "objective": "sft"}
    if best != plain:  # what the optional settings bring, on one model
        out.append({**sft, **plain})
    if not features["padding_free"]:  # sftgo's --pack: its samples in one row, position ids restarting
        out.append({**sft, "layout": "pack", "compile": best["compile"]})
    out += four("llama-3.2-1b", 4096) + four("qwen2.5-1.5b", 4096) + four("llama-3.1-8b-8layers", 16384)
    return out


def label(c: dict) -> str:
    what = c["trainer"] if c["trainer"] != "sftgo" else f"sftgo --objective {c['objective']} ({c['layout']}"
    if c["trainer"] == "sftgo":
        what += ", compile)" if c.get("compile") else ")"
    return f"{c['model']} @ {c['batch_tokens']:,} tokens: {what}"


# ------------------------------------------------------------------------------------------ model and data
def model_config(key: str):
    from transformers import LlamaConfig, Qwen2Config

    kind, kw = MODELS[key]
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**kw, bos_token_id=1, eos_token_id=1, pad_token_id=0)


def save_tokenizer(folder: Path, vocab: int):
    """A word-level tokenizer whose vocabulary is the model's (token i is 't{i}'): sftgo-train needs one
    with the model, and the shards record its fingerprint."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")
    fast.save_pretrained(folder)


def write_shards(out: Path, vocab: int, fingerprint: str, tokens: int, mean: int, seed: int = 0) -> dict:
    """Random SFT samples (lengths log-normal around `mean` tokens, 16..8 x mean and at most MAX_LENGTH; the
    first 10-40% a prompt,
    the rest supervised; 30% of supervised tokens in group 1) as sftgo shards with a manifest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftgo.core.fileio import file_sha256
    from sftgo.core.shards import write_manifest

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(np.clip(rng.lognormal(np.log(mean), 0.8), 16, min(8 * mean, MAX_LENGTH))))
    out.mkdir(parents=True, exist_ok=True)
    shards, per_shard = [], 256
    for at in range(0, len(lengths), per_shard):
        cols = {k: [] for k in ("id", "input_ids", "loss_mask", "importance_tfidf", "group_tfidf")}
        for i, n in enumerate(lengths[at : at + per_shard], start=at):
            prompt = int(n * rng.uniform(0.1, 0.4))
            mask = np.zeros(n, np.int8)
            mask[prompt:] = 1
            imp = np.where(mask == 1, rng.random(n), 0.0).astype(np.float32)
            group = np.where(mask == 1, (imp > 0.7).astype(np.int8), np.int8(-1)).astype(np.int8)
            cols["id"].append(f"s{i}")
            cols["input_ids"].append(rng.integers(3, vocab, n, dtype=np.int32))
            cols["loss_mask"].append(mask)
            cols["importance_tfidf"].append(imp)
            cols["group_tfidf"].append(group)
        types = {"input_ids": pa.int32(), "loss_mask": pa.int8(), "importance_tfidf": pa.float32()}
        table = {"id": pa.array(cols["id"], pa.string())}
        for k in ("input_ids", "loss_mask", "importance_tfidf", "group_tfidf"):
            table[k] = pa.array([a.tolist() for a in cols[k]], pa.list_(types.get(k, pa.int8())))
        table["num_tokens"] = pa.array([len(a) for a in cols["input_ids"]], pa.int32())
        table["num_loss_tokens"] = pa.array([int(m.sum()) for m in cols["loss_mask"]], pa.int32())
        name = f"shard-{len(shards):05d}.parquet"
        pq.write_table(pa.table(table), out / name, compression="zstd")
        shards.append(
            {
                "path": name,
                "rows": len(cols["id"]),
                "tokens": int(sum(len(a) for a in cols["input_ids"])),
                "loss_tokens": int(sum(int(m.sum()) for m in cols["loss_mask"])),
                "sha256": file_sha256(out / name),
            }
        )
    manifest = {
        "format_version": 1,
        "tokenizer": {
            "name": "generated",
            "fingerprint": fingerprint,
            "chat_template_sha256": "0" * 64,
            "vocab_size": vocab,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
        "params": {"max_length": MAX_LENGTH},
        "strategies": {"tfidf": {"eta": 0.3, "num_groups": 2}},
        "shards": shards,
        "totals": {
            "records_in": len(lengths),
            "records_written": len(lengths),
            "records_rejected": 0,
            "tokens": sum(s["tokens"] for s in shards),
            "loss_tokens": sum(s["loss_tokens"] for s in shards),
        },
        "rejected": {},
    }
    write_manifest(out, manifest)
    return {"records": len(lengths), "tokens": manifest["totals"]["tokens"]}


def prepare(args) -> dict:
    """Build the model (random weights, on the GPU when there is one), save it with its tokenizer, write the
    shards: once per model, read by every configuration."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftgo.core.models import load_tokenizer, tokenizer_fingerprint

    folder, data = Path(args.model_dir), Path(args.data)
    cfg = model_config(args.model)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    save_tokenizer(folder, cfg.vocab_size)
    fingerprint = tokenizer_fingerprint(load_tokenizer(str(folder)))
    shards = write_shards(data, cfg.vocab_size, fingerprint, tokens=args.data_tokens, mean=args.mean_length)
    return {"model": args.model, "parameters": params, "seconds": time.perf_counter() - t0, "data": shards}


# ------------------------------------------------------------------------------------------ timing
class Region:
    """The timed region: torch.cuda.synchronize() at both ends, so that queued GPU work is inside it."""

    def __init__(self):
        self.t0 = self.seconds = None

    @staticmethod
    def sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def start(self):
        self.sync()
        self.t0 = time.perf_counter()

    def stop(self):
        self.sync()
        self.seconds = time.perf_counter() - self.t0


def step_region(region: Region, warmup: int, steps: int):
    """A Trainer callback that opens the region after the warm-up steps and closes it after the timed ones."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        done = 0

        def on_step_end(self, *a, **k):
            self.done += 1
            if self.done == warmup:
                region.start()
            elif self.done == warmup + steps:
                region.stop()

    return Timer()


def gemm(args) -> dict:
    """The card's bf16 matmul rate: median of timed n x n x n products (CUDA events), after a warm-up."""
    import torch

    n = args.gemm_size
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(args.gemm_iters + 5):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t0
        if i >= 5:
            times.append(dt)
    med = statistics.median(times)
    return {"n": n, "iters": len(times), "median_s": med, "flops_per_s": 2 * n**3 / med, "fastest_s": min(times)}


# ------------------------------------------------------------------------------------------ the trainers
def reference_steps(args, pad: int) -> list[list[list[dict]]]:
    """The steps every trainer trains: sftgo's micro-batches (rows of one sample) over the shards."""
    from sftgo.core.shards import group_column, read_manifest
    from sftgo.trainer.config import TrainConfig
    from sftgo.trainer.loop import make_batches

    c = TrainConfig(data=args.data, out="-", batch_tokens=args.tokens, max_length=MAX_LENGTH)
    batches = make_batches(c, args.data, read_manifest(args.data), group_column("tfidf"), pad, 0, 1,
                           shuffle=True, cycle=False)  # fmt: skip
    steps = []
    for rows in batches.row_lists(0):
        steps.append(rows)
        if len(steps) == args.warmup + args.steps:
            return steps
    raise SystemExit(f"the shards hold {len(steps)} steps of {args.tokens} tokens, fewer than warm-up + timed")


def run_sftgo(args, steps, region: Region) -> dict:
    """sftgo-train's own set-up and step (trainer/loop.py), its batcher yielding the reference steps."""

    from sftgo.trainer.config import TrainConfig
    from sftgo.trainer.distributed import setup_distributed
    from sftgo.trainer.loop import one_step, set_up

    layout = args.layout
    extra = {}
    if args.compile:
        extra["compile"] = True
    if layout == "padding_free":
        extra["padding_free"] = True
    cfg = TrainConfig(data=args.data, out=str(Path(args.work) / "run"), model=args.model_dir,
                      objective=args.objective, groups="tfidf", max_steps=len(steps), batch_tokens=args.tokens,
                      max_length=MAX_LENGTH, lr=1e-5, progress=False, tensorboard=False, pack=layout == "pack",
                      **extra)  # fmt: skip
    cfg.validate()
    _, _, device = setup_distributed(False)
    r, _, _ = set_up(cfg, 0, 1, device)
    # the same samples per step as the other trainers: padded, one sample per row; the padding-free layouts
    # (--pack, --padding-free), all of the step's samples in one row, position ids restarting
    shaped = steps if layout == "padded" else [[[s for row in rows for s in row]] for rows in steps]
    r.batches.row_lists = lambda epoch, lengths_only=False: iter(shaped)
    r.memory.start_training()
    it = iter(r.batches)
    tokens = 0
    for i in range(len(steps)):
        if i == args.warmup:
            region.start()
        rec = one_step(r, it)
        tokens += rec["tokens"] if i >= args.warmup else 0  # real (non-pad) tokens
    region.stop()
    if r.log is not None:
        r.log.close()
    model = getattr(r.model, "module", r.model)
    return {
        "timed_tokens": tokens,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "settings": {"layout": layout, **{k: getattr(cfg, k) for k in ("compile", "padding_free", "pack")
                                          if hasattr(cfg, k)}, "precision": cfg.precision},
    }  # fmt: skip


def load_hf(args, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model.train()


def common_args(args, sub: str) -> dict:
    """The TrainingArguments every HF-side trainer gets: those of sftgo-train's defaults."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(Path(args.work) / sub),
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        adam_beta2=0.95,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        gradient_checkpointing=False,
    )


def run_hf(args, steps, region: Region, pad: int) -> dict:
    import torch
    from bench_train import hf_batch
    from transformers import Trainer, TrainingArguments

    batches = [hf_batch(rows, pad) for rows in steps]

    class Steps(torch.utils.data.IterableDataset):
        def __iter__(self):
            for b in batches:
                yield {k: v for k, v in b.items() if k != "num_tokens"}

    model = load_hf(args, "sdpa")
    targs = TrainingArguments(per_device_train_batch_size=1, remove_unused_columns=False, **common_args(args, "hf"))
    trainer = Trainer(model=model, args=targs, train_dataset=Steps(), data_collator=lambda xs: xs[0],
                      callbacks=[step_region(region, args.warmup, args.steps)])  # fmt: skip
    trainer.train()
    return {
        "timed_tokens": sum(b["num_tokens"] for b in batches[args.warmup :]),
        "attn_implementation": model.config._attn_implementation,
        "settings": {
            "layout": "padded, attention mask",
            "bf16": targs.bf16,
            "optim": getattr(targs.optim, "value", str(targs.optim)),
        },
    }


def run_trl(args, steps, region: Region) -> dict:
    import datasets
    import torch
    from torch.utils.data import DataLoader
    from trl import SFTConfig, SFTTrainer

    from sftgo.core.models import load_tokenizer

    liger = importlib.util.find_spec("liger_kernel") is not None
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    rows, index = [], []
    for step in steps:
        index.append(list(range(len(rows), len(rows) + sum(len(r) for r in step))))
        for row in step:
            for s in row:
                sup = s["loss_mask"].astype(bool)
                rows.append({"input_ids": s["input_ids"].tolist(), "completion_mask": sup.astype(int).tolist()})
    attn_note = "flash_attn is not importable" if not flash else ""
    model = None
    if flash:  # TRL's recommended attention for padding-free batches
        try:
            model = load_hf(args, "flash_attention_2")
        except (ImportError, ValueError) as exc:
            attn_note = f"flash_attention_2 refused: {str(exc).splitlines()[0][:200]}"
    if model is None:  # sdpa: transformers derives a block-diagonal mask from the restarting position ids
        model = load_hf(args, "sdpa")

    counted = []  # the tokens of each batch TRL's collator made (padding-free: no pad to leave out)

    class Steps(SFTTrainer):
        def get_train_dataloader(self):  # exactly the reference steps' samples, in order, through TRL's collator
            def collate(examples):
                batch = self.data_collator(examples)
                mask = batch.get("attention_mask")
                counted.append(int(batch["input_ids"].numel() if mask is None else mask.sum()))
                return batch

            return DataLoader(self.train_dataset, batch_sampler=index, collate_fn=collate)

    cfg = SFTConfig(per_device_train_batch_size=max(len(i) for i in index), padding_free=True,
                    use_liger_kernel=liger, max_length=None, completion_only_loss=True, shuffle_dataset=False,
                    **common_args(args, "trl"))  # fmt: skip
    trainer = Steps(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                    processing_class=load_tokenizer(args.model_dir),
                    callbacks=[step_region(region, args.warmup, args.steps)])  # fmt: skip
    trainer.train()
    return {
        "timed_tokens": sum(counted[args.warmup : len(steps)]),
        "attn_implementation": model.config._attn_implementation,
        "settings": {
            "layout": "padding-free (one flattened row)",
            "use_liger_kernel": liger,
            "bf16": cfg.bf16,
            **({"attention_note": attn_note} if attn_note else {}),
        },
    }


def train(args) -> dict:
    """One configuration, in this process: its tokens/s, timed seconds and peak device memory."""
    import torch
    from transformers.utils import logging as hf_logging

    from sftgo.core.models import load_tokenizer

    hf_logging.set_verbosity_error()
    tok = load_tokenizer(args.model_dir)
    pad = tok.pad_token_id
    steps = reference_steps(args, pad)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    region = Region()
    if args.trainer == "sftgo":
        out = run_sftgo(args, steps, region)
    elif args.trainer == "hf_trainer":
        out = run_hf(args, steps, region, pad)
    else:
        out = run_trl(args, steps, region)
    if region.seconds is None:
        raise SystemExit("the timed region never closed: the trainer ran fewer steps than asked")
    timed = steps[args.warmup :]
    lengths = [s["length"] for rows in timed for row in rows for s in row]
    if out["timed_tokens"] != sum(lengths):
        raise SystemExit(f"the trainer trained {out['tokens']} tokens in the timed steps, not {sum(lengths)}")
    return {
        **out,
        "timed_s": region.seconds,
        "tokens_per_s": out["timed_tokens"] / region.seconds,
        "tokens_per_step": out["timed_tokens"] / len(timed),
        "samples_per_step": statistics.mean(len(rows) for rows in timed),
        "padded_fill": sum(lengths) / sum(len(rows) * max(s["length"] for r in rows for s in r) for rows in timed),
        "sample_lengths": lengths,
        "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "warmup": args.warmup,
        "steps": args.steps,
    }


# ------------------------------------------------------------------------------------------ the driver
def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "trl", "liger_kernel", "liger-kernel", "flash_attn", "flash-attn",
                 "datasets", "accelerate", "pyarrow"):  # fmt: skip
        try:
            out[name.replace("-", "_")] = md.version(name)
        except md.PackageNotFoundError:
            out.setdefault(name.replace("-", "_"), None)
    return out


def child(cmd: list[str], timeout: float, env: dict) -> tuple[dict | None, str, float]:
    """Run `python gpubench.py SUB ...` in a fresh process; its JSON (last stdout line), its error, its seconds."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s (--config-limit or the budget left)", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        return None, tail[0][:500], dt
    return json.loads(p.stdout.strip().splitlines()[-1]), "", dt


def run_all(args) -> int:
    from sftgo.trainer import flops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or out / "work")
    deadline = time.monotonic() + args.budget
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's
    features = sftgo_features()
    configs = plan(args.dry_run, features)
    warm, timed = (1, 2) if args.dry_run else (3, args.steps)
    results = {
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": versions(),
        "sftgo_features": features,
        "warmup_steps": warm,
        "timed_steps": timed,
        "gemm": None,
        "models": {},
        "rows": [],
    }
    path = out / ("dryrun.json" if args.dry_run else "results.json")

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)

    def left():
        return deadline - time.monotonic()

    n = 256 if args.dry_run else 8192
    g, err, _ = child(["gemm", "--gemm-size", str(n), "--gemm-iters", "20"], max(left(), 1), env)
    results["gemm"] = g or {"error": err}
    results["device"] = (g or {}).get("device")
    save()
    print(f"bf16 GEMM {n}^3: " + (f"{g['flops_per_s'] / 1e12:.1f} TFLOP/s" if g else err), flush=True)
    spent: dict[str, float] = {}  # the slowest configuration of each model so far: the estimate for the next
    failed = 0
    for c in configs:
        key = c["model"]
        mdir, data = work / key / "model", work / key / "shards"
        row = {**c, "label": label(c)}
        if key not in results["models"]:
            need = 30 if args.dry_run else 60
            if left() < need:
                results["models"][key] = {"error": f"not prepared: {left():.0f} s of budget left"}
            else:
                shutil.rmtree(work / key, ignore_errors=True)
                tokens = 40 * 512 if args.dry_run else 24 * 16384
                mean = "40" if args.dry_run else "500"
                cmd = ["prepare", "--model", key, "--model-dir", str(mdir), "--data", str(data)]
                cmd += ["--data-tokens", str(tokens), "--mean-length", mean]
                p, err, dt = child(cmd, left(), env)
                results["models"][key] = p or {"error": err}
                if p:
                    cfg = model_config(key)
                    p["matmul_parameters"] = flops.matmul_parameters(cfg)
                    p["shape"] = flops.shape(cfg)
                print(f"prepared {key}: " + (f"{p['parameters']:,} parameters in {dt:.0f} s" if p else err), flush=True)
            save()
        prep = results["models"][key]
        if "error" in prep:
            row.update(status="skipped", reason=f"model {key} was not prepared ({prep['error']})")
        elif c["trainer"] == "trl_sft" and importlib.util.find_spec("trl") is None:
            row.update(status="skipped", reason="trl is not importable (see bench/gpu/README.md to carry its wheel)")
        elif c["trainer"] == "trl_sft" and not args.dry_run and importlib.util.find_spec("liger_kernel") is None:
            row.update(status="skipped", reason="liger_kernel is not importable (see bench/gpu/README.md)")
        elif left() < spent.get(key, 30 if args.dry_run else 45):
            row.update(status="skipped", reason=f"budget: {left():.0f} s left, about {spent.get(key, 45):.0f} s needed")
        else:
            cmd = [
                "train",
                "--trainer",
                c["trainer"],
                "--model-dir",
                str(mdir),
                "--data",
                str(data),
                "--tokens",
                str(c["batch_tokens"]),
                "--warmup",
                str(warm),
                "--steps",
                str(timed),
                "--work",
                str(work / "run"),
            ]
            if c["trainer"] == "sftgo":
                cmd += ["--objective", c["objective"], "--layout", c["layout"]]
                cmd += ["--compile"] if c["compile"] else []
            shutil.rmtree(work / "run", ignore_errors=True)
            r, err, dt = child(cmd, min(left(), args.config_limit), env)
            spent[key] = max(spent.get(key, 0.0), dt)
            row["process_s"] = dt
            if r is None and "out of memory" in err.lower():  # a result of the configuration, not a fault
                row.update(status="out_of_memory", reason=err)
            elif r is None:
                failed += 1
                row.update(status="failed", reason=err)
            else:
                fpt = flops.flops_per_token(model_config(key), r.pop("sample_lengths"))
                row.update(status="ok", **r, flops_per_token=fpt)
                if g:
                    row["mfu"] = flops.mfu(r["tokens_per_s"], fpt, g["flops_per_s"])
        results["rows"].append(row)
        save()
        shown = (
            f"{row['tokens_per_s']:,.0f} tok/s, MFU {100 * row.get('mfu', 0):.1f}%, "
            + (f"{row['max_memory_allocated_mb']:,.0f} MB" if row.get("max_memory_allocated_mb") else "CPU")
            if row["status"] == "ok"
            else f"{row['status']}: {row['reason']}"
        )
        print(f"{row['label']}: {shown}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}", flush=True)
    if failed:
        print(f"{failed} configuration(s) failed; their rows say why.", file=sys.stderr, flush=True)
    return 1 if failed or not g else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all", help="the whole benchmark within --budget seconds")
    a.add_argument("--out", required=True)
    a.add_argument("--work", help="models and shards (default OUT/work; removed at the end)")
    a.add_argument("--budget", type=float, default=450.0)
    a.add_argument("--steps", type=int, default=8, help="timed steps per configuration (>= 8 on a GPU)")
    a.add_argument("--config-limit", type=float, default=180.0, help="seconds one configuration's process may take")
    a.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: the whole chain, figures meaningless")
    p = sub.add_parser("prepare")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--data-tokens", type=int, required=True)
    p.add_argument("--mean-length", type=int, default=500, help="typical sample length (log-normal)")
    g = sub.add_parser("gemm")
    g.add_argument("--gemm-size", type=int, default=8192)
    g.add_argument("--gemm-iters", type=int, default=20)
    t = sub.add_parser("train")
    t.add_argument("--trainer", choices=TRAINERS, required=True)
    t.add_argument("--objective", default="sft")
    t.add_argument("--layout", choices=("padded", "pack", "padding_free"), default="padded")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--model-dir", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--tokens", type=int, required=True)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--work", required=True)
    args = ap.parse_args()
    os.environ.setdefault("SFTGO_CACHE", str(Path.home() / ".cache" / "sftgo"))
    if args.cmd == "all":
        if not args.dry_run and args.steps < 8:
            ap.error("--steps must be >= 8 (the dry run takes 2)")
        raise SystemExit(run_all(args))
    if args.cmd == "gemm":
        import torch

        res = gemm(args)
        res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    elif args.cmd == "prepare":
        res = prepare(args)
    else:
        res = train(args)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
