"""Benchmark: `reference` and `semantic` scoring throughput (tokens/s).

Measured in this one run, on the same generated records (data/generate.py), chat-rendered and
tokenized with the embedded tokenizer:
  raw        the reference model's plain batched no-grad forward, model(input_ids,
             attention_mask).logits, on exactly the batches ReferenceScorer builds (same length
             buckets, same padding, same token budget) -- the ceiling scoring is compared with
  reference  ReferenceScorer.score (mode "loss", embedded SmolLM2-135M-Instruct): bucketing,
             forward, LM head + CE at supervised positions, scatter back in input order
  semantic   SemanticScorer.score with the default occlusion (packaged all-MiniLM-L6-v2)
raw and reference are interleaved per repeat; each figure is the median of --repeats runs.
tokens/s counts real (unpadded) pipeline tokens of all samples; supervised tokens/s is also shown.

Usage: python bench/bench_strategies.py [--records 300] [--max-length 256] [--repeats 3]
                                        [--batch-tokens 8192] [--device auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from generate import generate  # noqa: E402

from sftgo.core.models import load_tokenizer  # noqa: E402
from sftgo.grouping.reference import ReferenceConfig, ReferenceScorer, buckets  # noqa: E402
from sftgo.grouping.semantic import SemanticConfig, SemanticScorer  # noqa: E402
from sftgo.pipeline.chat import ChatEncoder  # noqa: E402
from sftgo.pipeline.formats import RecordError, to_messages  # noqa: E402


def samples(records: int, max_length: int, tokenizer):
    recs = generate(records - records // 2, 7, "alpaca") + generate(records // 2, 7, "chat")
    convs = [to_messages({k: v for k, v in r.items() if k != "meta"}, "auto") for r in recs]
    return [
        e for e in ChatEncoder(tokenizer, max_length=max_length).encode_batch(convs) if not isinstance(e, RecordError)
    ]


def raw_forward(model, encs, batch_tokens: int, device) -> None:
    """The plain no-grad forward on the batches ReferenceScorer builds (full logits, nothing else)."""
    for batch in buckets([len(e.input_ids) for e in encs], batch_tokens):
        longest = len(encs[batch[0]].input_ids)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        attn = torch.zeros((len(batch), longest), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(encs[i].input_ids)
            ids[r, :n] = torch.from_numpy(encs[i].input_ids.astype(np.int64))
            attn[r, :n] = 1
        with torch.inference_mode():
            _ = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=300)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--device", default="auto")
    p.add_argument("--semantic-records", type=int, default=None, help="records for the semantic figure (default: all)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    tok = load_tokenizer(None)
    encs = samples(args.records, args.max_length, tok)
    n_tok = sum(len(e.input_ids) for e in encs)
    n_sup = sum(int(e.loss_mask.sum()) for e in encs)
    ids, masks, texts, offs = (
        [e.input_ids for e in encs],
        [e.loss_mask for e in encs],
        [e.text for e in encs],
        [e.offsets for e in encs],
    )

    scorer = ReferenceScorer(ReferenceConfig(batch_tokens=args.batch_tokens, device=args.device), tok)
    model, device = scorer.reference.model, scorer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scorer.score(ids[:4], masks[:4], texts[:4], offs[:4])  # warm-up
    raw_forward(model, encs[:4], args.batch_tokens, device)
    raw_t, ref_t = [], []
    for _ in range(args.repeats):
        raw_t.append(timed(lambda: raw_forward(model, encs, args.batch_tokens, device)))
        ref_t.append(timed(lambda: (scorer.score(ids, masks, texts, offs), sync())))
    scorer = model = None  # freed before the semantic rows

    sem_encs = encs[: args.semantic_records] if args.semantic_records else encs
    s_tok = sum(len(e.input_ids) for e in sem_encs)
    s_sup = sum(int(e.loss_mask.sum()) for e in sem_encs)
    sem = SemanticScorer(SemanticConfig(device=args.device))
    sargs = (
        [e.text for e in sem_encs],
        [e.content_spans for e in sem_encs],
        [e.offsets for e in sem_encs],
        [e.loss_mask for e in sem_encs],
    )
    sem.score(*(a[:4] for a in sargs))  # warm-up
    sem_t = [timed(lambda: sem.score(*sargs)) for _ in range(args.repeats)]

    med = statistics.median
    rows = [
        ("raw forward (full logits)", n_tok, n_sup, med(raw_t)),
        ("reference score (loss)", n_tok, n_sup, med(ref_t)),
        ("semantic score (occlusion)", s_tok, s_sup, med(sem_t)),
    ]
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        },
        "params": vars(args),
        "samples": len(encs),
        "tokens": n_tok,
        "supervised_tokens": n_sup,
        "results": {
            name: {
                "samples": len(sem_encs) if "semantic" in name else len(encs),
                "tokens": t,
                "supervised_tokens": s,
                "seconds_median": sec,
                "seconds_all": ts,
                "tokens_per_s": t / sec,
                "supervised_tokens_per_s": s / sec,
            }
            for (name, t, s, sec), ts in zip(rows, (raw_t, ref_t, sem_t))
        },
        "reference_vs_raw": med(raw_t) / med(ref_t),
    }
    print(
        f"{len(encs)} samples, {n_tok} tokens ({n_sup} supervised), device {device}, torch threads "
        f"{torch.get_num_threads()}, "
        f"median of {args.repeats}"
    )
    print(f"{'':30s} {'samples':>8s} {'tokens':>8s} {'seconds':>9s} {'tokens/s':>10s} {'sup tok/s':>10s}")
    for name, t, s, sec in rows:
        n = len(sem_encs) if "semantic" in name else len(encs)
        print(f"{name:30s} {n:8d} {t:8d} {sec:9.2f} {t / sec:10.0f} {s / sec:10.0f}")
    print(f"reference scoring runs at {result['reference_vs_raw']:.2f}x the raw forward's tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
