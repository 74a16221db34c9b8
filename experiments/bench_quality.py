"""`make bench-quality`: does SFT-GO beat plain SFT on facts it must learn, by more than the noise?

Fine-tunes the embedded SmolLM2-135M-Instruct on generated instruction data whose important
tokens are known (facts about fictional entities inside assistant boilerplate,
experiments/quality_data.py) with
  sft; sftgo with each grouping (tfidf, reference, semantic); rho1 (on the tfidf groups);
  an eta sweep and a lambda sweep of sftgo on the tfidf groups; sft and sftgo at two other
  learning rates (is the comparison an artefact of the one learning rate?);
each for every seed (the seed sets the data order: all methods of one seed see the same batches,
the same tokens and the same number of steps). Every run goes through the real `sftgo-prep
build` CLI (shards with all three strategies) and `trainer.loop.run` (the code behind
`sftgo-train`), then experiments/quality_eval.py scores it on held-out questions phrased unlike the
training ones: exact match of the fact, teacher-forced accuracy, and held-out loss per group.
Output: experiments/facts/QUALITY.md, quality.json, quality.png (experiments/quality_report.py).
Runs are cached in experiments/_work/quality/runs/NAME/result.json: an interrupted experiment
continues where it stopped (--fresh starts over).
Cost: about 2 minutes per run on 2 CPU cores (30 optimizer steps of 1024 tokens, then the
evaluation, about 1.7 minutes on a quiet machine); the default plan is 40 runs plus about 3 minutes of
shard builds: about 72 minutes in all (--lr-seeds "" drops the learning-rate check: 36 runs, about
65 minutes). --quick: 2 methods,
1 seed, 2 steps (a smoke test, a few minutes).

Usage: python experiments/bench_quality.py [--seeds 0,1,2] [--sweep-seeds 0,1,2] [--quick] [--fresh]
                                     [--report-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality_data  # noqa: E402
from quality_eval import answer_positions, evaluate_model, read_answered_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "experiments" / "_work" / "quality"
STRATEGIES = ["tfidf", "reference", "semantic"]
PREP = str(Path(sys.executable).parent / "sftgo-prep")


@dataclass
class Run:
    name: str
    objective: str
    groups: str | None
    lam: float
    eta: float
    seed: int
    study: str  # main, eta, lam or lr
    lr: float | None = None  # None: --lr

    @property
    def data_key(self) -> str:
        if self.groups == "oracle":
            return "shards-oracle"
        return eta_shards(self.eta)


def eta_shards(eta: float) -> str:
    """Name of the training shard directory whose tfidf groups use this eta (0.3: the main one)."""
    return "shards" if eta == 0.3 else f"shards-eta{eta:g}"


def plan(
    seeds: list[int],
    sweep_seeds: list[int],
    etas: list[float],
    lams: list[float],
    lrs: list[float] = (),
    lr_seeds: list[int] = (),
) -> list[Run]:
    runs = []
    for s in seeds:
        runs.append(Run(f"sft-s{s}", "sft", None, 0.0, 0.3, s, "main"))
        for g in STRATEGIES + ["oracle"]:
            runs.append(Run(f"sftgo-{g}-s{s}", "sftgo", g, 0.9, 0.3, s, "main"))
        runs.append(Run(f"rho1-tfidf-s{s}", "rho1", "tfidf", 0.0, 0.3, s, "main"))
    for s in sweep_seeds:
        runs += [Run(f"sftgo-tfidf-eta{e:g}-s{s}", "sftgo", "tfidf", 0.9, e, s, "eta") for e in etas if e != 0.3]
        runs += [
            Run(f"sftgo-tfidf-lam{lam:g}-s{s}", "sftgo", "tfidf", lam, 0.3, s, "lam")
            for lam in lams
            if lam not in (0.0, 0.9)
        ]
    for s in lr_seeds:  # is the comparison an artefact of the learning rate? sft and sftgo at other rates
        for lr in lrs:
            runs += [
                Run(f"sft-lr{lr:g}-s{s}", "sft", None, 0.0, 0.3, s, "lr", lr),
                Run(f"sftgo-tfidf-lr{lr:g}-s{s}", "sftgo", "tfidf", 0.9, 0.3, s, "lr", lr),
            ]
    return runs


def build(inputs: list[Path], out: Path, strategies: list[str], eta: float = 0.3) -> None:
    """The real CLI, skipped when the same build is already there (the build itself checks its parameters)."""
    cmd = [
        PREP,
        "build",
        *map(str, inputs),
        "--out",
        str(out),
        "--strategy",
        ",".join(strategies),
        "--eta",
        str(eta),
        "--workers",
        "2",
        "--quiet",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    print(f"  built {out.name} ({', '.join(strategies)}, eta {eta:g}) in {time.perf_counter() - t0:.0f} s", flush=True)


def prepare(args, runs: list[Run]) -> dict:
    data = quality_data.make_data(seed=args.data_seed, per_kind=args.per_kind, per_fact=args.per_fact)
    WORK.mkdir(parents=True, exist_ok=True)
    for split, records in data.items():
        quality_data.gen.write_jsonl(records, WORK / f"{split}.jsonl")
    build([WORK / "train.jsonl"], WORK / "shards", STRATEGIES)
    build([WORK / "heldout.jsonl"], WORK / "heldout-shards", STRATEGIES)
    for eta in sorted({r.eta for r in runs if r.eta != 0.3}):
        build([WORK / "train.jsonl"], WORK / eta_shards(eta), ["tfidf"], eta)
    if any(r.groups == "oracle" for r in runs):
        oracle_shards(data["train"])
    return data


def oracle_shards(train_records: list[dict]) -> None:
    """A copy of the training shards whose group_tfidf column is the known answer: group 1 = the
    tokens of the fact's value, 0 = the other supervised tokens. The upper bound of any grouping.
    The manifest's shard checksums are updated so the trainer's checks still pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftgo.core.fileio import file_sha256
    from sftgo.core.models import load_tokenizer

    src, dst = WORK / "shards", WORK / "shards-oracle"
    if (dst / "manifest.json").exists():
        return
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    answers = {r["id"]: r["meta"]["answer"] for r in train_records}
    tok = load_tokenizer(None)
    manifest = json.loads((src / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = dst / shard["path"]
        table = pq.read_table(path)
        groups = []
        for rid, ids, mask in zip(*(table.column(c).to_pylist() for c in ("id", "input_ids", "loss_mask"))):
            g = [0 if m else -1 for m in mask]
            for i in answer_positions(ids, mask, answers[rid], tok):
                g[i] = 1
            groups.append(g)
        col = table.schema.get_field_index("group_tfidf")
        table = table.set_column(col, table.schema.field(col), pa.array(groups, type=table.schema.field(col).type))
        pq.write_table(table, path, compression="zstd")
        shard["sha256"] = file_sha256(path)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def train_stats(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"]
    worst = [r["worst_group"] for r in train if r.get("worst_group") is not None]
    return {
        "steps": len(train),
        "tokens": sum(r["tokens"] for r in train),
        "loss_tokens": sum(r["loss_tokens"] for r in train),
        "final_train_ce": train[-1]["ce"],
        "worst_switches": train[-1].get("worst_switches", 0),
        "switch_rate": train[-1].get("worst_switches", 0) / max(1, len(worst) - 1),
        "worst_is_important": sum(w == 1 for w in worst) / max(1, len(worst)),
        "grad_norm_median": statistics.median(r["grad_norm"] for r in train),
        "train_group_loss": [r["group_loss"] for r in train],
    }


def do_run(args, run: Run, heldout_rows, questions, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    from sftgo.trainer.config import TrainConfig
    from sftgo.trainer.loop import run as train

    run_dir = WORK / "runs" / run.name
    result_path = run_dir / "result.json"
    if result_path.exists():  # cached; the training statistics are re-read (cheap) in case the report wants new ones
        return {**json.loads(result_path.read_text()), **train_stats(run_dir)}
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig(
        data=str(WORK / run.data_key),
        out=str(run_dir),
        objective=run.objective,
        groups="tfidf" if run.groups in (None, "oracle") else run.groups,
        lam=run.lam,
        seed=run.seed,
        lr=run.lr or args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_tokens=args.batch_tokens,
        warmup_steps=args.warmup,
        progress=False,
        tensorboard=False,
    )
    t0 = time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the trainer's summary table
        train(cfg)
    train_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    res = evaluate_model(model, tokenizer, heldout_rows, questions, STRATEGIES)
    res.update(asdict(run), train_s=train_s, eval_s=time.perf_counter() - t0 - train_s, **train_stats(run_dir))
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result_path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def base_result(heldout_rows, questions, tokenizer) -> dict:
    path = WORK / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    from sftgo.core.models import load_causal_lm

    res = evaluate_model(load_causal_lm(None, dtype=torch.float32), tokenizer, heldout_rows, questions, STRATEGIES)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def group_overlap(train_records: list[dict], tokenizer) -> dict:
    """How well each grouping finds the known important tokens of the training shards:
    recall = share of answer tokens in group 1, precision = share of group-1 tokens that are answer tokens."""
    answers = {r["id"]: r["meta"]["answer"] for r in train_records}
    rows = read_answered_rows(str(WORK / "shards"), answers, tokenizer)
    out = {}
    for s in STRATEGIES:
        hit = ans = imp = 0
        for r in rows:
            g = r[f"group_{s}"]
            pos = set(r["answer_pos"])
            ans += len(pos)
            imp += sum(1 for x in g if x == 1)
            hit += sum(1 for p in pos if g[p] == 1)
        out[s] = {"recall": hit / max(ans, 1), "precision": hit / max(imp, 1)}
    out["answer_share"] = ans / max(1, sum(sum(r["loss_mask"]) for r in rows))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="training seeds of the method comparison")
    p.add_argument("--sweep-seeds", default="0,1,2", help="training seeds of the eta and lambda sweeps")
    p.add_argument("--etas", default="0.1,0.2,0.3,0.5")
    p.add_argument("--lams", default="0,0.5,0.7,0.9,1")
    p.add_argument("--lrs", default="1e-4,1e-3", help="other learning rates of sft and sftgo-tfidf (the lr check)")
    p.add_argument("--lr-seeds", default="0", help="training seeds of the lr check")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--per-kind", type=int, default=3, help="entities per kind (8 kinds)")
    p.add_argument("--per-fact", type=int, default=4, help="training records per fact")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--only", default="", help="comma-separated run names (for pilots)")
    p.add_argument("--quick", action="store_true", help="smoke test: sft and sftgo-tfidf, seed 0, 2 steps")
    p.add_argument("--fresh", action="store_true", help="discard cached runs and shards")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from cached results")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sweep = [int(s) for s in args.sweep_seeds.split(",") if s]
    if args.quick:
        seeds, sweep, args.max_steps = [0], [], 2
    lr_seeds = [int(s) for s in args.lr_seeds.split(",") if s] if not args.quick else []
    runs = plan(
        seeds,
        sweep,
        [float(e) for e in args.etas.split(",")],
        [float(x) for x in args.lams.split(",")],
        [float(x) for x in args.lrs.split(",") if x],
        lr_seeds,
    )
    if args.quick:
        runs = [r for r in runs if r.name in ("sft-s0", "sftgo-tfidf-s0")]
    if args.only:
        runs = [r for r in runs if r.name in args.only.split(",")]
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    torch.set_num_threads(os.cpu_count() or 1)
    from sftgo.core.models import load_tokenizer

    t_start = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("fresh", "report_only", "only")}
    if not args.report_only:
        print(f"quality experiment: {len(runs)} runs", flush=True)
        data = prepare(args, runs)
        tokenizer = load_tokenizer(None)
        heldout_rows = read_answered_rows(
            str(WORK / "heldout-shards"), {r["id"]: r["meta"]["answer"] for r in data["heldout"]}, tokenizer
        )
        base = base_result(heldout_rows, data["questions"], tokenizer)
        print(f"  base model: EM {base['em']:.3f}, answer loss {base['answer_loss']:.3f}", flush=True)
        results = []
        for i, run in enumerate(runs, 1):
            res = do_run(args, run, heldout_rows, data["questions"], tokenizer)
            results.append(res)
            print(
                f"  [{i}/{len(runs)}] {run.name:28s} EM {res['em']:.3f}  tf_acc {res['tf_acc']:.3f}  "
                f"answer loss {res['answer_loss']:.3f}  rest {res['rest_loss']:.3f}  "
                f"({res['steps']} steps, {res['train_s']:.0f}+{res['eval_s']:.0f} s)",
                flush=True,
            )
        overlap = group_overlap(data["train"], tokenizer)
        summary = {
            "settings": settings,
            "base": base,
            "runs": results,
            "overlap": overlap,
            "minutes": (time.perf_counter() - t_start) / 60,
            "records": {k: len(v) for k, v in data.items()},
        }
        (WORK / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not (WORK / "summary.json").is_file():
        raise SystemExit(f"No cached results in {WORK.relative_to(ROOT)}: run without --report-only first.")
    summary = json.loads((WORK / "summary.json").read_text())
    from quality_report import write_report

    write_report(summary, ROOT / "experiments" / "facts")


if __name__ == "__main__":
    main()
