"""The fair SFT-GO experiment (set-up: experiments/skills_analysis.md): skill tasks whose important tokens are
computed from the input, a generated world per seed, every method at its own lr, paired statistics.

    python experiments/skills.py [--work experiments/skills] [--seeds 0,1,2,3,4] [--tune-seeds 0]
        [--train-records 480] [--heldout-records 160] [compare.py options ...]

Input: seeds and sizes; any other option goes to experiments/compare.py (methods, groupings, λs,
lr grid, steps, batch tokens, precision, margin).
Output: WORK/world-S/{train,heldout}.jsonl and their shards (train from world S, held-out from
world 100+S with new names, numbers and phrasings: skills_data.make_split), then compare.py's
WORK/runs/NAME/result.json (cached and small: commit them), WORK/compare.json, compare.md and
curves.png.  The primary metric, fixed before any run: held-out answer exact, teacher-forced
(every token of the computed answer is the model's argmax), on the test half of the held-out items.
Cost: per seed two `sftgo-prep build` runs with tfidf, reference and semantic (about 3 minutes on
2 CPU cores, most of it the reference model), then compare.py's training runs, one at a time
(experiments/skills_lanes.py trains the missing ones several at a time, e.g. on one GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
from skills_data import make_split  # noqa: E402

STRATEGIES = "tfidf,reference,semantic"
DEFAULTS = [
    "--methods",
    "sft,sftgo,dft,rho1,weighted",
    "--groups",
    STRATEGIES,
    "--lams",
    "0.9,0.3,0.5,decay",
    "--lrs",
    "1e-4,3e-4",
    "--steps",
    "40",
    "--batch-tokens",
    "512",
    "--eval-every",
    "10",
    "--precision",
    "bf16",
    "--margin",
    "0.03",
    "--select",
    "ce",
]


def build(records: list[dict], jsonl: Path, out: Path) -> None:
    """Write `records` to `jsonl` and build their shards with every strategy (skipped when built)."""
    if (out / "manifest.json").exists():
        return
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "sftgo.pipeline.cli",
        "build",
        str(jsonl),
        "--out",
        str(out),
        "--strategy",
        STRATEGIES,
        "--workers",
        "2",
        "--rows-per-shard",
        str(max(1, len(records) // 4)),
        "--overwrite",
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def prepare(work: Path, seeds: list[int], n_train: int, n_heldout: int) -> None:
    for seed in seeds:
        world = work / f"world-{seed}"
        world.mkdir(parents=True, exist_ok=True)
        build(make_split(seed, n_train), world / "train.jsonl", world / "train")
        build(make_split(100 + seed, n_heldout, heldout=True), world / "heldout.jsonl", world / "heldout")
        print(f"world {seed} built", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="experiments/skills")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tune-seeds", default="0")
    ap.add_argument("--train-records", type=int, default=480)
    ap.add_argument("--heldout-records", type=int, default=160)
    args, rest = ap.parse_known_args(argv)
    work = Path(args.work)
    if "--report-only" not in rest:  # the report reads the cached results alone
        prepare(work, [int(s) for s in args.seeds.split(",")], args.train_records, args.heldout_records)
    return compare.main(compare_argv(work, args.seeds, args.tune_seeds, rest))


def compare_argv(work: Path, seeds: str, tune_seeds: str, options: list[str]) -> list[str]:
    """compare.py's arguments for the experiment: its worlds, and DEFAULTS where `options` do not say otherwise."""
    given = {a.split("=")[0] for a in options if a.startswith("--")}
    defaults = [x for k, v in zip(DEFAULTS[::2], DEFAULTS[1::2]) if k not in given for x in (k, v)]
    return [
        "--train",
        str(work / "world-{seed}" / "train"),
        "--heldout",
        str(work / "world-{seed}" / "heldout"),
        "--answers",
        str(work / "world-{seed}" / "heldout.jsonl"),
        "--work",
        str(work),
        "--seeds",
        seeds,
        "--tune-seeds",
        tune_seeds,
        *defaults,
        *options,
    ]


if __name__ == "__main__":
    main()
