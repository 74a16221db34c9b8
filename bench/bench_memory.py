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
Output: a table on stdout and, with --json PATH, per configuration the peak RSS of its process over
its steps (median of --repeats fresh processes, interleaved), each step's own peak beside it (its
high-water mark, restarted before it: sftgo-train's `peak_rss_mb` metric, and for the other two a
Trainer callback doing the same; the steps hold different samples, TRL's other ones than ours, since
it takes a fixed number of samples per step), the RSS after the model was loaded, and the
difference: what the training steps added (activations, logits, gradients, optimizer state).
Cost: configurations x repeats processes, each a model load plus --steps optimizer steps; about
12 minutes on 2 CPU cores with the defaults (a 4,096-token fp32 step takes about 35 s).

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
CONFIGS = ("sftgo_train", "hf_trainer", "trl_sft", "sftgo_train_pack")
ROWS = CONFIGS[:3]  # the rows; --pack adds sftgo_train_pack (information)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_mb() -> float:
    """The peak since the last restart (restart_peak): torch's most allocated on a GPU, else VmHWM."""
    import torch

    from sftgo.trainer.memory import proc_status_mb

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return proc_status_mb()


def restart_peak() -> None:
    import torch

    from sftgo.trainer.memory import restart_rss_peak

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif not restart_rss_peak():
        raise SystemExit("This bench needs /proc/self/clear_refs (Linux) to measure each step's peak.")


def peak_meter():
    """A Trainer callback that records each optimizer step's peak (HF Trainer and TRL alike), as sftgo-train's
    own `peak_rss_mb` / `peak_cuda_mb` metric does: restarted when the step begins, read when it ends."""
    from transformers import TrainerCallback

    class Peaks(TrainerCallback):
        def __init__(self):
            self.peaks = []

        def on_step_begin(self, *a, **k):
            restart_peak()

        def on_step_end(self, *a, **k):
            self.peaks.append(peak_mb())

    return Peaks()


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
    before = peak_mb()  # the process's peak so far (the load above); each step's is restarted
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    meter = peak_meter()
    key = "peak_cuda_mb" if torch.cuda.is_available() else "peak_rss_mb"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if args.one.startswith("sftgo_train"):  # sftgo-train's own per-step metric
                records = []
                bench_train.run_ours(args, "sft", work, pack=args.one.endswith("_pack"), records=records)
                meter.peaks = [r[key] for r in records if r["split"] == "train"]
            elif args.one == "hf_trainer":
                bench_train.run_hf(args, batches, work, callbacks=[meter])
            else:
                bench_train.run_trl(args, batches, work, callbacks=[meter])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(meter.peaks) != args.steps:
        raise SystemExit(f"{args.one}: {len(meter.peaks)} step peaks, expected {args.steps}")
    tokens = statistics.mean(int(b["num_tokens"]) for b in batches)
    process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if not torch.cuda.is_available() else None
    return {
        "peak_mb": max([before, process or 0.0, *meter.peaks]),
        "step_peaks_mb": meter.peaks,
        "after_load_mb": after_load,
        "tokens_per_step": tokens,
        "step_tokens": [int(b["num_tokens"]) for b in batches],
        "vocab": vocab,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shard directory (default: bench_train's)")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        help="optimizer steps per process (the first makes the optimizer's "
        "state, so the second is the first to hold it beside the activations)",
    )
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    p.add_argument("--pack", action="store_true", help="also sftgo-train --pack (padding-free; information, no row)")
    p.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gradient checkpointing in every configuration (TRL's default), so that what differs is the loss "
        "computation, not the stored activations [default: on]",
    )
    p.add_argument(
        "--same-allocator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run every configuration under MALLOC_MMAP_THRESHOLD_ at the value sftgo-train sets for itself on a "
        "CPU (trainer/hostmem.py), so that the allocator is alike and what differs is the training code "
        "[default: on; off: each as it runs by default]",
    )
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
    configs = CONFIGS if args.pack else ROWS
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    from sftgo.trainer.hostmem import ENV, THRESHOLD

    env = dict(os.environ)
    if args.same_allocator:
        env.setdefault(ENV, str(THRESHOLD))  # a value set by the user wins, as in sftgo-train
    allocator = {ENV: env[ENV]} if ENV in env else {}
    for r in range(args.repeats):
        for c in configs:  # interleaved: every configuration sees the machine in the same state
            cmd = [
                sys.executable,
                __file__,
                "--one",
                c,
                "--data",
                args.data,
                "--batch-tokens",
                str(args.batch_tokens),
                "--steps",
                str(args.steps),
                "--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing",
            ]
            cmd += ["--model", args.model] if args.model else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{c} failed:\n{proc.stderr[-3000:]}")
            runs[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"repeat {r + 1}/{args.repeats} {c:<17} peak {runs[c][-1]['peak_mb']:,.0f} MB (steps: "
                + ", ".join(f"{x:,.0f}" for x in runs[c][-1]["step_peaks_mb"])
                + " MB)",
                flush=True,
            )
    med = {}
    for c in configs:
        med[c] = {
            k: statistics.median(x[k] for x in runs[c])
            for k in ("peak_mb", "after_load_mb", "tokens_per_step", "vocab")
        }
        med[c]["step_peaks_mb"] = [statistics.median(x["step_peaks_mb"][i] for x in runs[c]) for i in range(args.steps)]
        med[c]["steps_added_mb"] = med[c]["peak_mb"] - med[c]["after_load_mb"]
    result = {
        "batch_tokens": args.batch_tokens,
        "steps": args.steps,
        "step_tokens": runs["sftgo_train"][0]["step_tokens"],
        "grad_checkpointing": args.grad_checkpointing,
        "allocator_env": allocator,
        "repeats": args.repeats,
        "median": med,
        "runs": runs,
        "ours_over_hf_peak": med["sftgo_train"]["peak_mb"] / med["hf_trainer"]["peak_mb"],
        "ours_over_trl_peak": med["sftgo_train"]["peak_mb"] / med["trl_sft"]["peak_mb"],
        "full_logits_fp32_mb": med["sftgo_train"]["tokens_per_step"] * med["sftgo_train"]["vocab"] * 4 / 2**20,
    }
    print(f"\n{'config':<17} {'peak MB':>9} {'each step MB':>16} {'after load MB':>14} {'steps added MB':>15}")
    for c in configs:
        each = ", ".join(f"{x:,.0f}" for x in med[c]["step_peaks_mb"])
        print(
            f"{c:<17} {med[c]['peak_mb']:>9,.0f} {each:>16} {med[c]['after_load_mb']:>14,.0f} "
            f"{med[c]['steps_added_mb']:>15,.0f}"
        )
    print(f"ours / HF peak  : {result['ours_over_hf_peak']:.3f}  (target <= 0.7; medians of {args.repeats} processes)")
    print(f"ours / TRL peak : {result['ours_over_trl_peak']:.3f}  (target <= 0.7)")
    print(f"full logits of one step in fp32 would be {result['full_logits_fp32_mb']:,.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
