"""Scale benchmark: prep against a `datasets.map(num_proc=2)` pipeline, 1 vs 2 Dask workers, the
fixed start-up cost, and peak RSS of `sftgo-prep build` and `sftgo-train` at two data sizes.

Everything is measured side by side in this one run on corpora from data/generate.py (half alpaca,
half chat); each figure is the median of its runs:
  a  `sftgo-prep build --strategy tfidf --workers 2` tokens/s on --records (200,000) against the same
     work done with Hugging Face `datasets` (`python bench/bench_scale.py hf-pipeline ...`):
     load_dataset("json"), map(num_proc=2) normalising (pipeline.formats.to_messages), rendering the chat
     template and tokenizing with offsets (the same embedded tokenizer), the assistant loss mask from
     offsets, scikit-learn TfidfVectorizer fitted over the responses (same token pattern), per-token
     TF-IDF of the word, top-30% groups, ds.to_parquet.  Both are timed end to end as CLI subprocesses
     (interpreter start-up included), target sftgo >= 3x.  --repeats runs, interleaved.
  b  `--workers 2` against `--workers 1` tokens/s on the same corpus, target >= 1.7x.
  c  start-up: the wall time of a --startup-records (100) build, every cost that does not grow with data.
  d  peak RSS, summed over the command's whole process tree (psutil, polled every 50 ms), of
     `sftgo-prep build --workers 2` at the two --rss-records sizes (100,000 and 1,000,000), and of
     `sftgo-train` (--train-steps steps, --train-batch-tokens) on those two builds' shards; target <= 1.2x.
     --rss-repeats runs each (default 1: a 1,000,000-record build takes minutes).
Per repeat the order of a's and b's three runs rotates; the start-up build follows them.

Usage: python bench/bench_scale.py [--records 200000] [--rss-records 100000,1000000] [--repeats 3] [--json FILE]
       python bench/bench_scale.py hf-pipeline --out DIR INPUT [INPUT ...]   (the baseline alone)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
sys.path.insert(0, str(ROOT))

from sftgo.grouping.tfidf import WORD_PATTERN as WORD  # noqa: E402  (scikit-learn's default)

ETA = 0.3

# --------------------------------------------------------------------------------------------
# the datasets.map baseline (runs in its own process, like the sftgo CLI)

_TOK = None


def _tok():
    global _TOK
    if _TOK is None:
        from sftgo.core.models import load_tokenizer

        _TOK = load_tokenizer(None)
    return _TOK


def _assistant_spans(text: str) -> list[tuple[int, int, int]]:
    """(content start, content end, end incl. <|im_end|>) of every assistant turn of a ChatML text."""
    head, eot = "<|im_start|>assistant\n", "<|im_end|>"
    spans, pos = [], 0
    while (i := text.find(head, pos)) >= 0:
        cs = i + len(head)
        ce = text.find(eot, cs)
        spans.append((cs, ce, ce + len(eot)))
        pos = ce
    return spans


def hf_encode(batch: dict) -> dict:
    """Normalise, render, tokenize with offsets, assistant loss mask, response text."""
    import numpy as np

    from sftgo.pipeline.formats import to_messages

    tok = _tok()
    keys = [k for k in batch if k not in ("meta",)]
    n = len(batch[keys[0]])
    texts = []
    for i in range(n):
        rec = {k: batch[k][i] for k in keys if batch[k][i] is not None}
        texts.append(tok.apply_chat_template(to_messages(rec, "auto"), tokenize=False))
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = {"id": batch["id"], "input_ids": [], "loss_mask": [], "offsets": [], "text": texts, "response": []}
    for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        spans = _assistant_spans(text)
        starts = np.fromiter((a for a, _ in offs), dtype=np.int64, count=len(offs))
        mask = np.zeros(len(ids), dtype=np.int8)
        for cs, _, end in spans:
            mask[(starts >= cs) & (starts < end)] = 1
        out["input_ids"].append(np.asarray(ids, dtype=np.int32))
        out["loss_mask"].append(mask)
        out["offsets"].append(np.asarray(offs, dtype=np.int32).ravel())
        out["response"].append("\n".join(text[cs:ce] for cs, ce, _ in spans))
    return out


def hf_score(batch: dict, vocab: dict, idf) -> dict:
    """Per-token TF-IDF of the word it belongs to (L2-normalised per response), top-eta groups."""
    import numpy as np

    rx = re.compile(WORD)
    imp_col, grp_col, ntok, nloss = [], [], [], []
    for text, _ids, mask, offs in zip(batch["text"], batch["input_ids"], batch["loss_mask"], batch["offsets"]):
        mask = np.asarray(mask, dtype=np.int8)
        offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        found = [
            (m.start(), m.end(), m.group().lower())  # positions are absolute with finditer(text, pos, endpos)
            for cs, ce, _ in _assistant_spans(text)
            for m in rx.finditer(text, cs, ce)
        ]
        counts: dict[str, int] = {}
        for _, _, w in found:
            counts[w] = counts.get(w, 0) + 1
        val = {w: c * idf[vocab[w]] for w, c in counts.items() if w in vocab}
        norm = math.sqrt(sum(v * v for v in val.values())) or 1.0
        chars = np.zeros(len(text) + 1, dtype=np.float32)
        for a, b, w in found:
            chars[a:b] = val.get(w, 0.0) / norm
        starts = np.minimum(offs[:, 0], len(text))
        scores = np.maximum.reduceat(chars, starts) if len(starts) else np.zeros(0, np.float32)
        scores = np.where((offs[:, 1] > offs[:, 0]) & (mask == 1), scores, 0.0).astype(np.float32)
        sup = np.flatnonzero(mask)
        groups = np.where(mask == 1, 0, -1).astype(np.int8)
        k = math.ceil(ETA * len(sup))
        groups[sup[np.argsort(-scores[sup], kind="stable")[:k]]] = 1
        imp_col.append(scores)
        grp_col.append(groups)
        ntok.append(len(mask))
        nloss.append(len(sup))
    return {"importance_tfidf": imp_col, "group_tfidf": grp_col, "num_tokens": ntok, "num_loss_tokens": nloss}


def hf_pipeline(inputs: list[str], out: str, num_proc: int = 2) -> dict:
    import datasets
    from sklearn.feature_extraction.text import TfidfVectorizer

    datasets.disable_progress_bars()
    parts = []
    for path in inputs:  # alpaca and chat files have different columns: one dataset each
        ds = datasets.load_dataset("json", data_files=path, split="train")
        parts.append(ds.map(hf_encode, batched=True, batch_size=500, num_proc=num_proc, remove_columns=ds.column_names))
    ds = datasets.concatenate_datasets(parts)
    vec = TfidfVectorizer(token_pattern=WORD).fit(ds["response"])
    vocab, idf = vec.vocabulary_, vec.idf_.tolist()
    ds = ds.map(
        hf_score,
        batched=True,
        batch_size=500,
        num_proc=num_proc,
        fn_kwargs={"vocab": vocab, "idf": idf},
        remove_columns=["text", "offsets", "response"],
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(Path(out) / "data.parquet"))
    return {"records": len(ds), "tokens": int(sum(ds["num_tokens"])), "loss_tokens": int(sum(ds["num_loss_tokens"]))}


# --------------------------------------------------------------------------------------------
# measurement


def high_water_kb(pid: int) -> int:
    """The kernel's high-water mark of one process's resident set (VmHWM, kB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


class TreeRSS:
    """Runs a command; polls the summed RSS of its process tree every `interval` s; keeps the max.  Also keeps the
    command's own process's peak alone ("driver_peak_rss_mb": its VmHWM, which the kernel keeps between polls; the
    last poll is at most `interval` s before it exits), without its children (e.g. Dask workers)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval

    def run(self, cmd: list[str], env: dict | None = None) -> dict:
        import psutil

        peak = hwm = 0
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            hwm = max(hwm, high_water_kb(proc.pid))
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(self.interval)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode(errors="replace")
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
        return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "driver_peak_rss_mb": hwm / 2**10}


class LoadSampler(threading.Thread):
    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop.wait(self.every)

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": statistics.mean(s), "max": max(s), "min": min(s), "samples": len(s)}


def corpus(work: Path, records: int, seed: int = 123) -> list[str]:
    from generate import generate, write_jsonl

    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"scale-alpaca-{records}.jsonl", work / f"scale-chat-{records}.jsonl"]
    for path, kind in zip(paths, ("alpaca", "chat")):
        if not path.exists():
            write_jsonl(generate(records // 2, seed, kind), str(path))
    return [str(p) for p in paths]


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def build_cmd(inputs, out, workers) -> list[str]:
    return [
        bin_("sftgo-prep"),
        "build",
        *inputs,
        "--out",
        str(out),
        "--strategy",
        "tfidf",
        "--workers",
        str(workers),
        "--overwrite",
        "--quiet",
    ]


def train_cmd(data, out, steps, batch_tokens) -> list[str]:
    return [
        bin_("sftgo-train"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--objective",
        "sftgo",
        "--groups",
        "tfidf",
        "--max-steps",
        str(steps),
        "--batch-tokens",
        str(batch_tokens),
        "--no-progress",
    ]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hf-pipeline"]:
        p = argparse.ArgumentParser(prog="bench_scale.py hf-pipeline", description="the datasets.map baseline alone")
        p.add_argument("inputs", nargs="+")
        p.add_argument("--out", required=True)
        p.add_argument("--num-proc", type=int, default=2)
        a = p.parse_args(argv[1:])
        print(json.dumps(hf_pipeline(a.inputs, a.out, a.num_proc)))
        return

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--records",
        type=int,
        default=200000,
        help="records of the throughput corpus (sftgo vs datasets.map, 2 vs 1 workers)",
    )
    p.add_argument(
        "--rss-records",
        default="100000,1000000",
        help="SMALL,LARGE: the two corpora whose peak RSS is compared (build and training); 'same' reuses "
        "--records and a tenth of it",
    )
    p.add_argument(
        "--rss-repeats",
        type=int,
        default=1,
        help="runs of each peak-RSS measurement (peak RSS varies little between runs)",
    )
    p.add_argument(
        "--startup-records",
        type=int,
        default=100,
        help="records of the build whose wall time is the fixed start-up cost",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--train-batch-tokens", type=int, default=512)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--work", default=str(ROOT / "bench/_work"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("SFTGO_CACHE", str(Path.home() / ".cache" / "sftgo"))

    work = Path(args.work)
    if args.rss_records == "same":
        rss_small, rss_large = args.records // 10, args.records
    else:
        try:
            rss_small, rss_large = (int(x) for x in args.rss_records.split(","))
        except ValueError:
            p.error(
                "--rss-records takes SMALL,LARGE record counts (e.g. 100000,1000000) or 'same', not "
                f"{args.rss_records!r}"
            )
    big, startup = corpus(work, args.records), corpus(work, args.startup_records)
    small_c, large_c = corpus(work, rss_small), (big if rss_large == args.records else corpus(work, rss_large))
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=work))
    meter, load = TreeRSS(), LoadSampler()
    load.start()
    runs = {
        k: []
        for k in (
            "build_w2_10x",
            "hf_datasets_10x",
            "build_w1_10x",
            "build_startup",
            "build_rss_1x",
            "build_rss_10x",
            "train_1x",
            "train_10x",
        )
    }
    med = statistics.median

    def hf_env():
        env = dict(os.environ)
        env["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hfcache-", dir=tmp)  # nothing reused between repeats
        return env

    jobs = {
        "build_w2_10x": lambda: meter.run(build_cmd(big, tmp / "w2-10x", 2)),
        "hf_datasets_10x": lambda: meter.run(
            [sys.executable, __file__, "hf-pipeline", *big, "--out", str(tmp / "hf")], env=hf_env()
        ),
        "build_w1_10x": lambda: meter.run(build_cmd(big, tmp / "w1-10x", 1)),
    }

    def note(r, name, res):
        print(
            f"repeat {r + 1} {name:<16} {res['wall_s']:7.2f} s  peak RSS {res['peak_rss_mb']:7.0f} MB"
            f"  (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )

    try:
        for r in range(args.repeats):
            order = list(jobs)[r % 3 :] + list(jobs)[: r % 3]
            for name in order + ["build_startup"]:
                shutil.rmtree(tmp / "hf", ignore_errors=True)
                res = jobs[name]() if name in jobs else meter.run(build_cmd(startup, tmp / "startup", 2))
                runs[name].append(res)
                note(r, name, res)
        for r in range(args.rss_repeats):  # peak RSS at the two sizes, alternating
            for name, inputs in (("build_rss_1x", small_c), ("build_rss_10x", large_c))[:: 1 if r % 2 == 0 else -1]:
                res = meter.run(build_cmd(inputs, tmp / name, 2))
                runs[name].append(res)
                note(r, name, res)
        if not args.skip_train:
            for r in range(args.rss_repeats):
                for name, data in (("train_1x", tmp / "build_rss_1x"), ("train_10x", tmp / "build_rss_10x"))[
                    :: 1 if r % 2 == 0 else -1
                ]:
                    out = tmp / f"run-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    res = meter.run(train_cmd(data, out, args.train_steps, args.train_batch_tokens))
                    runs[name].append(res)
                    note(r, name, res)
        man = {
            k: json.loads((tmp / d / "manifest.json").read_text())["totals"]
            for k, d in (
                ("10x", "w2-10x"),
                ("startup", "startup"),
                ("rss_1x", "build_rss_1x"),
                ("rss_10x", "build_rss_10x"),
            )
        }
    finally:
        load.stop.set()
        shutil.rmtree(tmp, ignore_errors=True)

    tokens = man["10x"]["tokens"]
    wall = {k: med([x["wall_s"] for x in v]) for k, v in runs.items() if v}
    rss = {k: med([x["peak_rss_mb"] for x in v]) for k, v in runs.items() if v}
    result = {
        "records_10x": args.records,
        "tokens_10x": tokens,
        "startup_records": args.startup_records,
        "rss_records": [rss_small, rss_large],
        "rss_tokens": [man["rss_1x"]["tokens"], man["rss_10x"]["tokens"]],
        "repeats": args.repeats,
        "rss_repeats": args.rss_repeats,
        "cpus": os.cpu_count(),
        "runs": runs,
        "wall_s_median": wall,
        "peak_rss_mb_median": rss,
        "tok_s": {k: tokens / wall[k] for k in ("build_w2_10x", "hf_datasets_10x", "build_w1_10x")},
        "sftgo_over_datasets": wall["hf_datasets_10x"] / wall["build_w2_10x"],
        "target_sftgo_over_datasets": 3.0,
        "w2_over_w1": wall["build_w1_10x"] / wall["build_w2_10x"],
        "target_w2_over_w1": 1.7,
        "startup_s": wall["build_startup"],
        "startup_share": wall["build_startup"] / wall["build_w2_10x"],
        "build_rss_10x_over_1x": rss["build_rss_10x"] / rss["build_rss_1x"],
        "target_rss": 1.2,
        "train_steps": args.train_steps,
        "train_batch_tokens": args.train_batch_tokens,
        "load_average": load.summary(),
    }
    if not args.skip_train:
        result["train_rss_10x_over_1x"] = rss["train_10x"] / rss["train_1x"]
    print(
        f"\n{tokens} tokens ({args.records} records); medians of {args.repeats} (peak RSS: {args.rss_repeats}); "
        "load average "
        f"{result['load_average']['mean']:.1f} on {os.cpu_count()} CPUs"
    )
    for k in wall:
        print(f"{k:<18} {wall[k]:8.2f} s  peak RSS {rss[k]:7.0f} MB")
    print(f"sftgo / datasets.map tokens/s : {result['sftgo_over_datasets']:.2f} (target >= 3)")
    print(
        f"start-up ({args.startup_records}-record build): {result['startup_s']:.1f} s, "
        f"{100 * result['startup_share']:.0f}% of the {args.records}-record build"
    )
    print(f"2 workers / 1 worker          : {result['w2_over_w1']:.2f} (target >= 1.7)")
    print(f"build peak RSS {rss_large} / {rss_small} records: {result['build_rss_10x_over_1x']:.2f} (target <= 1.2)")
    if "train_rss_10x_over_1x" in result:
        print(f"train peak RSS 10x / 1x       : {result['train_rss_10x_over_1x']:.2f} (target <= 1.2)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
