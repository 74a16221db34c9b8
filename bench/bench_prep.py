"""Benchmark: `sftgo-prep build --strategy tfidf` tokens/s against the tokenizer-only ceiling.

Both are measured in this one run, on the same generated corpus and the same machine:
  ceiling  the embedded fast tokenizer batch-encoding the chat-rendered texts of the corpus
           in one process (rendering not timed): `tokenizer(texts)`, and the raw Rust
           `backend_tokenizer.encode_batch(texts)` in one call, and `encode_batch_fast` (ids without
           offsets, which sftgo calls for byte-level tokenizers) in batches of 4,096 texts (in one
           call over 40,000 texts it took 10.5 s against 7.5 s in such batches); the ratio is
           against the faster of the two raw calls
  build    the whole CLI command as a user runs it (local Dask cluster start-up, reading,
           normalising, rendering, tokenizing, TF-IDF, grouping, zstd Parquet, manifest)
Each figure is the median of --repeats runs.

Usage: python bench/bench_prep.py [--records 40000] [--repeats 3] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT))

from generate import generate, write_jsonl  # noqa: E402


def make_corpus(work: Path, records: int) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"alpaca-{records}.jsonl", work / f"chat-{records}.jsonl"]
    for path, kind in zip(paths, ("alpaca", "chat")):
        if not path.exists():
            write_jsonl(generate(records // 2, 123, kind), str(path))
    return [str(p) for p in paths]


def rendered_texts(inputs: list[str]) -> list[str]:
    from sftgo.core import models
    from sftgo.pipeline import formats

    tok = models.load_tokenizer(None)
    texts = []
    for path in inputs:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                texts.append(tok.apply_chat_template(formats.to_messages(json.loads(line), "auto"), tokenize=False))
    return texts


FAST_BATCH = 4096  # encode_batch_fast slows down on very large single calls; this size was its fastest here


def ceiling(texts: list[str], repeats: int) -> dict:
    from sftgo.core import models

    tok = models.load_tokenizer(None)
    tokens = sum(len(ids) for ids in tok(texts[:2000], add_special_tokens=False)["input_ids"])  # warm-up
    runs_hf, runs_raw, runs_fast = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = tok(texts, add_special_tokens=False)
        runs_hf.append(time.perf_counter() - t)
        t = time.perf_counter()
        tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        runs_raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        for at in range(0, len(texts), FAST_BATCH):
            tok.backend_tokenizer.encode_batch_fast(texts[at : at + FAST_BATCH], add_special_tokens=False)
        runs_fast.append(time.perf_counter() - t)
    tokens = sum(len(ids) for ids in out["input_ids"])
    fastest = min(statistics.median(runs_raw), statistics.median(runs_fast))
    return {
        "tokens": tokens,
        "tokenizer_call_s": statistics.median(runs_hf),
        "encode_batch_s": statistics.median(runs_raw),
        "tokenizer_call_tok_s": tokens / statistics.median(runs_hf),
        "encode_batch_tok_s": tokens / statistics.median(runs_raw),
        "encode_batch_fast_s": statistics.median(runs_fast),
        "encode_batch_fast_tok_s": tokens / statistics.median(runs_fast),
        "ceiling_tok_s": tokens / fastest,  # the faster raw call: what the build is held to
    }


def build(inputs: list[str], out: Path, workers: int, repeats: int) -> dict:
    exe = Path(sys.executable).parent / "sftgo-prep"
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run(
            [
                str(exe),
                "build",
                *inputs,
                "--out",
                str(out),
                "--strategy",
                "tfidf",
                "--workers",
                str(workers),
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        runs.append(time.perf_counter() - t)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["totals"]["tokens"]
    return {
        "tokens": tokens,
        "wall_s": statistics.median(runs),
        "runs_s": runs,
        "tok_s": tokens / statistics.median(runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=40000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "bench/_work"))
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    work = Path(args.work)
    inputs = make_corpus(work, args.records)
    texts = rendered_texts(inputs)
    ceil = ceiling(texts, args.repeats)
    del texts
    b = build(inputs, work / "out", args.workers, args.repeats)
    assert b["tokens"] == ceil["tokens"], "the build and the ceiling must see the same tokens"
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "records": args.records,
        "workers": args.workers,
        "ceiling": ceil,
        "build_tfidf": b,
        "ratio_vs_tokenizer_call": b["tok_s"] / ceil["tokenizer_call_tok_s"],
        "ratio_vs_encode_batch": b["tok_s"] / ceil["ceiling_tok_s"],
    }
    print(
        f"corpus: {args.records} records, {b['tokens']} tokens; {os.cpu_count()} CPUs; medians of {args.repeats} runs"
    )
    print(f"{'what':<52} {'tokens/s':>12} {'ratio':>8}")
    print(f"{'ceiling: tokenizer(texts), one process':<52} {ceil['tokenizer_call_tok_s']:>12,.0f} {1.0:>8.2f}")
    print(
        f"{'ceiling: backend encode_batch(texts), one process':<52} {ceil['encode_batch_tok_s']:>12,.0f} "
        f"{ceil['encode_batch_tok_s'] / ceil['tokenizer_call_tok_s']:>8.2f}"
    )
    print(
        f"{'ceiling: encode_batch_fast, 4,096-text batches':<52} {ceil['encode_batch_fast_tok_s']:>12,.0f} "
        f"{ceil['encode_batch_fast_tok_s'] / ceil['tokenizer_call_tok_s']:>8.2f}"
    )
    print(
        f"{f'sftgo-prep build --strategy tfidf --workers {args.workers}':<52} {b['tok_s']:>12,.0f} "
        f"{result['ratio_vs_tokenizer_call']:>8.2f}"
    )
    print(f"build / ceiling (the faster raw encode): {result['ratio_vs_encode_batch']:.2f} (target >= 0.6)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
