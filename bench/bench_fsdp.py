"""Per-rank peak memory of 2-process FSDP2 against 2-process DDP, same model, data and steps.

Usage: python bench/bench_fsdp.py --data SHARD_DIR [--model NAME | --shape smollm2-360m] [--steps 3] [--repeats 3]
                                 [--batch-tokens 256] [--grad-checkpointing] [--json FILE]

Input: a shard directory and a model (default: the embedded SmolLM2-135M-Instruct).  --shape NAME trains a
randomly initialised model of a published architecture instead (written once into bench/_work/models; its
memory is that of the trained model, which this offline host does not have), with the embedded tokenizer.
Output: per repeat and mode, each rank's peak memory as sftgo-train records it in summary.json
(`peak_memory_mb_per_rank`: resident set on CPU, torch's max allocated on a GPU) over the training
phase (after set-up: the model is loaded whole on every rank before FSDP shards it) and over the
whole process, the medians, and the ratio FSDP / DDP of the larger rank's training-phase peak
(target: at most 0.6, set in bench/run_all.py; the whole-process ratio beside it); runs alternate
DDP, FSDP so that both see the same machine load.
Cost: 2 x repeats torchrun runs of `steps` optimizer steps each (about 30 s each for SmolLM2 on
2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(
    data: str, model: str | None, steps: int, fsdp: bool, out: Path, batch_tokens: int, checkpointing: bool
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sftgo.trainer.cli",
        "--data",
        data,
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-tokens",
        str(batch_tokens),
        "--lr",
        "1e-5",
        "--no-progress",
        "--no-tensorboard",
        "--save-every",
        "0",
    ]
    if model:
        cmd += ["--model", model]
    if fsdp:
        cmd.append("--fsdp")
    if checkpointing:
        cmd.append("--grad-checkpointing")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{'fsdp' if fsdp else 'ddp'} run failed:\n{proc.stderr[-6000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary["peak_memory_mb_per_rank"]
    # the training phase (after set-up: model load, sharding, optimizer creation), where FSDP's sharding acts;
    # the whole process's peak beside it
    gpu = "cuda_mb" in ranks[0]
    key, whole = ("train_cuda_mb", "cuda_mb") if gpu else ("train_rss_mb", "rss_mb")
    if ranks[0].get(key) is None:
        key = whole
    return {
        "per_rank_mb": [r[key] for r in ranks],
        "max_rank_mb": max(r[key] for r in ranks),
        "measure": key,
        "whole_process_max_rank_mb": max(r[whole] for r in ranks),
        "whole_measure": whole,
        "train_start_max_rank_mb": max((r.get("train_start_rss_mb") or 0.0) for r in ranks),
    }


# Published configurations (config.json on the Hugging Face hub), for --shape.  SmolLM2-360M: 362 M parameters,
# 32 layers, the same tied 49,152 x 960 embedding family as the embedded 135 M model.
SHAPES = {
    "smollm2-360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
    },
}


def shaped_model(shape: str) -> str:
    """A directory with a randomly initialised Llama of SHAPES[shape] and the embedded tokenizer (made once)."""
    root = Path(__file__).resolve().parents[1]
    out = root / "bench" / "_work" / "models" / f"{shape}-random"
    if not (out / "config.json").exists():
        import shutil

        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from sftgo.core import models

        torch.manual_seed(0)
        tok = models.load_tokenizer(None)
        config = LlamaConfig(
            **SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return str(out)


def default_shards() -> str:
    root = Path(__file__).resolve().parents[1]
    out = root / "bench" / "_work" / "fsdp-shards"
    if not (out / "manifest.json").exists():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "sftgo-prep"),
                "build",
                str(root / "data" / "alpaca.jsonl"),
                str(root / "data" / "chat.jsonl"),
                "--out",
                str(out),
                "--quiet",
                "--overwrite",
            ],
            check=True,
        )
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="shard directory [default: built from data/*.jsonl into bench/_work]")
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="train a randomly initialised model of this published architecture instead of --model",
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--batch-tokens",
        type=int,
        default=256,
        help="tokens per micro-batch: small, so that weights, gradients and Adam state dominate memory",
    )
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.data is None:
        args.data = default_shards()
    if args.shape:
        if args.model:
            raise SystemExit("--shape and --model exclude each other.")
        args.model = shaped_model(args.shape)
    runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in ("ddp", "fsdp"):
                rec = one_run(
                    args.data,
                    args.model,
                    args.steps,
                    mode == "fsdp",
                    Path(tmp) / f"{mode}-{i}",
                    args.batch_tokens,
                    args.grad_checkpointing,
                )
                runs[mode].append(rec)
                print(
                    f"{mode} repeat {i}: per-rank peak {', '.join(f'{m:.0f}' for m in rec['per_rank_mb'])} MB "
                    f"({rec['measure']}; the training phase started at {rec['train_start_max_rank_mb']:.0f} MB)",
                    flush=True,
                )
    med = {m: statistics.median(r["max_rank_mb"] for r in rs) for m, rs in runs.items()}
    whole = {m: statistics.median(r["whole_process_max_rank_mb"] for r in rs) for m, rs in runs.items()}
    result = {
        "ddp_peak_mb": med["ddp"],
        "fsdp_peak_mb": med["fsdp"],
        "ratio": med["fsdp"] / med["ddp"],
        "whole_process": {
            "ddp_peak_mb": whole["ddp"],
            "fsdp_peak_mb": whole["fsdp"],
            "ratio": whole["fsdp"] / whole["ddp"],
            "measure": runs["ddp"][0]["whole_measure"],
        },
        "measure": runs["ddp"][0]["measure"],
        "runs": runs,
        "steps": args.steps,
        "batch_tokens": args.batch_tokens,
        "grad_checkpointing": args.grad_checkpointing,
        "model": args.shape and f"{args.shape} (random init)" or args.model or "embedded",
    }
    print(
        f"median per-rank peak ({result['measure']}): DDP {med['ddp']:.0f} MB, FSDP {med['fsdp']:.0f} MB, ratio "
        f"{result['ratio']:.2f}; "
        f"whole process: DDP {whole['ddp']:.0f} MB, FSDP {whole['fsdp']:.0f} MB, ratio "
        f"{result['whole_process']['ratio']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
