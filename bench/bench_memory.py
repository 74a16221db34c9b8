"""Benchmark: peak memory of one training process at 4,096-token batches -- sftgo-train against the
Hugging Face `Trainer` and TRL's `SFTTrainer` (padding-free) on the same model, samples and steps.

Input: a shard directory (--data; default: bench_train's shards of data/*.jsonl), a model (--model,
default the embedded SmolLM2-135M-Instruct), --batch-tokens (4096).
Configurations: sftgo_train (length-bucketed padded rows, its default), sftgo_train_pack (--pack: rows
filled first-fit, padding-free), hf_trainer (the same padded batches), trl_sft (padding-free); all
with gradient checkpointing (TRL's default; --no-grad-checkpointing turns it off in all four), so
that the stored activations are alike and what differs is how the loss is computed; and all under
the glibc setting sftgo-train applies to itself on a CPU (MALLOC_MMAP_THRESHOLD_, trainer/hostmem.py;
--no-same-allocator: each as it runs by default), so that the allocator is alike too.
Output: a table on stdout and, with --json PATH, per configuration the peak RSS of its process
(median of --repeats fresh processes, interleaved), the RSS after the model was loaded, and the
difference: what the training steps added (activations, logits, gradients, optimizer state).
Cost: configurations x repeats processes, each a model load plus --steps optimizer steps; about
8 minutes on 2 CPU cores with the defaults (a 4,096-token fp32 step takes about 20 s).

Why: the Trainer computes the logits of every position, [tokens, vocab] = 4,096 x 49,152 floats
(805 MB in fp32), then their softmax and its gradient.  sftgo-train's chunked CE computes the LM
head only at supervised positions, --ce-chunk rows at a time, and never holds the full logits; the
"steps added" column shows it.  On a GPU the same comparison runs on peak CUDA memory.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ("sftgo_train", "sftgo_train_pack", "hf_trainer", "trl_sft")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(args) -> dict:
    """Train --steps steps of one configuration in this process; return its memory figures."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_train

    from sftgo.core.models import load_causal_lm

    args.warmup = 0
    batches = bench_train.the_batches(args)
    model = load_causal_lm(args.model, dtype=torch.float32)  # the memory of a loaded model, before any step
    if torch.cuda.is_available():  # on a GPU, the weights' share is measured where they train
        model.to("cuda")
        after_load = torch.cuda.memory_allocated() / 2**20
    else:
        after_load = rss_mb()
    vocab = model.config.vocab_size
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if args.one.startswith("sftgo_train"):
                bench_train.run_ours(args, "sft", work, pack=args.one.endswith("_pack"))
            elif args.one == "hf_trainer":
                bench_train.run_hf(args, batches, work)
            else:
                bench_train.run_trl(args, batches, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = statistics.mean(int(b["num_tokens"]) for b in batches)
    return {"peak_mb": peak_mb(), "after_load_mb": after_load, "tokens_per_step": tokens, "vocab": vocab}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shard directory (default: bench_train's)")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing in every configuration (TRL's default), so that what differs is the loss "
                        "computation, not the stored activations [default: on]")
    p.add_argument("--same-allocator", action=argparse.BooleanOptionalAction, default=True,
                   help="run every configuration under MALLOC_MMAP_THRESHOLD_ at the value sftgo-train sets for itself on a "
                        "CPU (trainer/hostmem.py), so that the allocator is alike and what differs is the training code "
                        "[default: on; off: each as it runs by default]")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("SFTGO_CACHE", str(Path.home() / ".cache" / "sftgo"))
    sys.path.insert(0, str(HERE))
    if args.one:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        print(json.dumps(one(args)))
        return
    import bench_train

    args.data = args.data or bench_train.default_shards()
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    from sftgo.trainer.hostmem import ENV, THRESHOLD

    env = dict(os.environ)
    if args.same_allocator:
        env.setdefault(ENV, str(THRESHOLD))  # a value set by the user wins, as in sftgo-train
    allocator = {ENV: env[ENV]} if ENV in env else {}
    for r in range(args.repeats):
        for c in CONFIGS:  # interleaved: every configuration sees the machine in the same state
            cmd = [sys.executable, __file__, "--one", c, "--data", args.data, "--batch-tokens", str(args.batch_tokens),
                   "--steps", str(args.steps), "--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing"]
            cmd += ["--model", args.model] if args.model else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{c} failed:\n{proc.stderr[-3000:]}")
            runs[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1}/{args.repeats} {c:<17} peak {runs[c][-1]['peak_mb']:,.0f} MB", flush=True)
    med = {c: {k: statistics.median(x[k] for x in runs[c]) for k in ("peak_mb", "after_load_mb", "tokens_per_step", "vocab")}
           for c in CONFIGS}
    for c in CONFIGS:
        med[c]["steps_added_mb"] = med[c]["peak_mb"] - med[c]["after_load_mb"]
    result = {"batch_tokens": args.batch_tokens, "steps": args.steps, "grad_checkpointing": args.grad_checkpointing,
              "allocator_env": allocator, "repeats": args.repeats, "median": med, "runs": runs,
              "ours_over_hf_peak": med["sftgo_train"]["peak_mb"] / med["hf_trainer"]["peak_mb"],
              "ours_over_trl_peak": med["sftgo_train"]["peak_mb"] / med["trl_sft"]["peak_mb"],
              "full_logits_fp32_mb": med["sftgo_train"]["tokens_per_step"] * med["sftgo_train"]["vocab"] * 4 / 2**20}
    print(f"\n{'config':<17} {'peak MB':>9} {'after load MB':>14} {'steps added MB':>15}")
    for c in CONFIGS:
        print(f"{c:<17} {med[c]['peak_mb']:>9,.0f} {med[c]['after_load_mb']:>14,.0f} {med[c]['steps_added_mb']:>15,.0f}")
    print(f"ours / HF peak  : {result['ours_over_hf_peak']:.3f}  (target <= 0.7)")
    print(f"ours / TRL peak : {result['ours_over_trl_peak']:.3f}  (target <= 0.7)")
    print(f"full logits of one step in fp32 would be {result['full_logits_fp32_mb']:,.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
