"""Where one worker's time goes on one partition of a build (pass 1), part by part, in one process.

Usage: python bench/prep_parts.py INPUT.jsonl [--rows 5000] [--partition 1] [--repeats 3]

Input: a JSONL corpus (e.g. bench/_work/scale-chat-200000.jsonl, which `make bench` generates).
Output: the median seconds of each part of pass 1 on one --rows-record partition, the way a worker
runs it (one Rayon thread for the Rust tokenizer, as executor.py sets for workers): reading, normalising,
rendering the chat template, the Rust encoder with the ids and offsets as arrays, the loss mask,
TF-IDF terms, the staged table and its write; and `process`, the first five together as prepare.py runs
them.  Tokens per second of the whole.
Cost: a few seconds per repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers loads, as in a worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--partition", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from sftgo.core import models
    from sftgo.pipeline import formats, prepare, readers
    from sftgo.pipeline.chat import ChatEncoder
    from sftgo.pipeline.config import BuildConfig

    enc = ChatEncoder(models.load_tokenizer_light(None) or models.load_tokenizer(None), 2048)
    cfg = BuildConfig(inputs=[args.input], out=tempfile.mkdtemp(), rows_per_shard=args.rows)
    part = readers.plan(cfg.inputs, args.rows)[args.partition]
    strategies = cfg.strategy_objects()
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for _ in range(args.repeats):
        items = timed("read (JSONL lines -> records)", lambda: list(readers.read(part)))
        convs = timed(
            "normalise (to_messages)",
            lambda: [formats.to_messages(i.record, formats.detect_format(i.record, None)) for i in items],
        )
        rendered = timed("render (chat template)", lambda: [enc.render(c) for c in convs])
        batches = [rendered[i : i + prepare.BATCH] for i in range(0, len(rendered), prepare.BATCH)]
        encoded = timed(
            "Rust encoder, ids, offsets (encode_texts)", lambda: [enc.encode_texts([t for t, _ in b]) for b in batches]
        )
        arrays = timed(
            "split, loss mask (arrays)", lambda: [a for b, e in zip(batches, encoded) for a in enc._batch_arrays(b, e)]
        )
        timed("finish (truncation, checks)", lambda: [enc._finish(t, s, *a) for (t, s), a in zip(rendered, arrays)])
        cols, rejects, counts = timed("process (all of the above)", lambda: prepare.process(part, cfg, enc))
        staged = timed("TF-IDF terms (stage_columns)", lambda: prepare.stage_columns(strategies, cols, cfg, None))
        table = timed("staged table", lambda: prepare.staged_table(cols, staged))
        timed(
            "write staged files", lambda: prepare.write_stage(tempfile.mkdtemp(), 0, table, rejects, counts, strategies)
        )
    tokens = int(table["num_tokens"].to_numpy().sum())
    med = {k: statistics.median(v) for k, v in times.items()}
    whole = med["process (all of the above)"] + sum(
        med[k] for k in ("TF-IDF terms (stage_columns)", "staged table", "write staged files")
    )
    print(
        f"{args.input} partition {args.partition}: {len(cols['id'])} records, {tokens:,} tokens; medians of "
        f"{args.repeats}"
    )
    for k, v in med.items():
        print(f"  {k:<42} {v:7.3f} s  {100 * v / whole:5.1f}%")
    print(f"  pass 1 of this partition: {whole:.3f} s, {tokens / whole:,.0f} tokens/s on one core")


if __name__ == "__main__":
    main()
