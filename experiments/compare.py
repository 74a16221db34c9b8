"""Does token importance help on YOUR data?  A fair, paired comparison of SFT-GO and its baselines
before you pay for a big run.

    python experiments/compare.py --train SHARDS --heldout SHARDS --work DIR [--model NAME]
        [--methods sft,sftgo,dft,rho1,weighted] [--groups tfidf] [--lams 0.9] [--seeds 0,1,2]
        [--lrs 1e-4,3e-4,1e-3] [--steps 30] [--batch-tokens 1024] [--margin 0.01] [--answers FILE]

Input: shard directories of `sftgo-prep build` (train, and a held-out set built with the same
tokenizer), a model, the methods, seeds and learning-rate grid.
Output: DIR/runs/NAME/result.json per training run (cached: an interrupted comparison continues
where it stopped; commit them to carry on elsewhere), DIR/compare.json
({"methods": {NAME: {"seeds", "metric", "diff_vs_sft": {"mean", "ci95"}, "verdict", "lr"}}}) and
DIR/compare.md (the table, the premise check and the command).
Method: every method is trained with each lr of the grid and each seed (the seed sets the data
order), on the same token budget and with the same clipping; each method's lr is the one with the
best mean *validation* metric (half of the held-out items, chosen by a hash of their id); the
other half is the test set.  The primary metric, fixed in advance, is held-out token accuracy (the
share of a response's tokens the model predicts, teacher-forced, per item), or with --answers (a
JSONL of {id, answer}) answer exact: every token of the item's answer is the argmax.  The premise
table gives, under sft, each grouping's held-out loss per group.  Differences against
`sft` are paired by seed and item with a 95% bootstrap CI over seeds and items and a verdict
against the equivalence margin (experiments/paired.py).  `weighted` gets the group-1 weight that
the `sftgo` run of the same seed and lr applied on average (its logged group_weight).
Method names: sft, dft, rho1, weighted, sftgo-<groups>[-lam<λ>].
Cost: methods x seeds x lrs training runs of --steps steps (each a `sftgo-train` run in-process),
plus one teacher-forced pass over the held-out set per run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import compare  # noqa: E402

from sftgo.core.models import load_causal_lm, load_tokenizer  # noqa: E402
from sftgo.core.shards import group_column, member_path, read_manifest, verify_shards  # noqa: E402
from sftgo.trainer.config import TrainConfig  # noqa: E402
from sftgo.trainer.loop import run as train  # noqa: E402
from sftgo.trainer.metrics import read_jsonl  # noqa: E402
from sftgo.trainer.model import causal_lm  # noqa: E402


@dataclass(frozen=True)
class Spec:
    name: str
    objective: str
    lam: float = 0.9
    seed: int = 0
    lr: float = 1e-4

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}-lr{self.lr:g}"


def method_specs(methods: list[str], groups: str, lams: list[float]) -> list[tuple[str, str, float]]:
    """(name, objective, λ) per method; sftgo once per λ; weighted last (it needs sftgo's weights)."""
    out = []
    for m in methods:
        if m == "sftgo":
            out += [(f"sftgo-{groups}" + ("" if lam == 0.9 else f"-lam{lam:g}"), "sftgo", lam) for lam in lams]
        else:
            out.append((m, m, 0.0))
    return sorted(out, key=lambda t: t[1] == "weighted")


def is_validation(item: str) -> bool:
    return int(hashlib.sha256(item.encode()).hexdigest(), 16) % 2 == 0


@torch.no_grad()
def item_metrics(model_dir: str, heldout: str, answers: dict[str, str] | None = None) -> dict:
    """Teacher-forced metrics of every held-out item: {"items": {id: [primary, token accuracy, mean CE]},
    "group_loss": {strategy: [[CE sum, tokens] per group]}}.  primary: with `answers`, 1 when every token
    of the item's answer is the model's argmax (items whose answer is not found are left out), else the
    token accuracy."""
    import pyarrow.parquet as pq
    from quality_eval import answer_positions

    model = load_causal_lm(model_dir, dtype=torch.float32)
    lm, tokenizer = causal_lm(model), load_tokenizer(model_dir)
    manifest = verify_shards(heldout, read_manifest(heldout))
    strategies = list(manifest["strategies"])
    items, sums = {}, {s: {} for s in strategies}
    for shard in manifest["shards"]:
        columns = ["id", "input_ids", "loss_mask"] + [group_column(s) for s in strategies]
        for row in pq.read_table(member_path(heldout, shard["path"]), columns=columns).to_pylist():
            ids = torch.tensor(row["input_ids"])
            pos = torch.nonzero(torch.tensor(row["loss_mask"])[1:] == 1).flatten() + 1  # supervised tokens
            hidden = lm.get_decoder()(input_ids=ids[None]).last_hidden_state[0, pos - 1]
            logits = lm.get_output_embeddings()(hidden).float()
            ce = F.cross_entropy(logits, ids[pos], reduction="none")
            right = logits.argmax(-1) == ids[pos]
            primary = float(right.float().mean())
            if answers is not None:
                where = answer_positions(row["input_ids"], row["loss_mask"], answers.get(row["id"], "\0"), tokenizer)
                if not where:
                    continue
                at = {int(p): k for k, p in enumerate(pos)}
                primary = float(all(bool(right[at[p]]) for p in where if p in at))
            items[row["id"]] = [primary, float(right.float().mean()), float(ce.mean())]
            for s in strategies:
                for g, c in zip(torch.tensor(row[group_column(s)])[pos].tolist(), ce.tolist()):
                    total = sums[s].setdefault(g, [0.0, 0])
                    total[0], total[1] = total[0] + c, total[1] + 1
    return {"items": items, "group_loss": {s: [sums[s].get(g, [0.0, 0]) for g in range(max(sums[s], default=-1) + 1)]
                                           for s in strategies}}


def matched_weight(work: Path, seed: int, lr: float, groups: str) -> float:
    """The mean group-1 / group-0 token weight the sftgo run of this seed and lr applied."""
    recs = [r for r in read_jsonl(work / "runs" / f"sftgo-{groups}-s{seed}-lr{lr:g}" / "metrics.jsonl")
            if r.get("split") == "train" and len(r.get("group_weight", [])) >= 2 and r["group_weight"][0]]
    if not recs:
        raise SystemExit(f"weighted needs the sftgo-{groups} run of seed {seed}, lr {lr:g} first (add sftgo to --methods).")
    return float(np.mean([r["group_weight"][1] / r["group_weight"][0] for r in recs]))


def one_run(args, spec: Spec) -> dict:
    """Train and evaluate one (method, seed, lr), or read its cached result."""
    out = Path(args.work) / "runs" / spec.key
    cached = out / "result.json"
    if cached.exists():
        return json.loads(cached.read_text())
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run is redone (runs are short)
    extra = {"group_weight": matched_weight(Path(args.work), spec.seed, spec.lr, args.groups)} if spec.objective == "weighted" else {}
    train(TrainConfig(data=args.train, out=str(out), model=args.model, objective=spec.objective, groups=args.groups,
                      lam=spec.lam, lr=spec.lr, seed=spec.seed, max_steps=args.steps, batch_tokens=args.batch_tokens,
                      clip_grad=args.clip_grad, warmup_steps=max(1, args.steps // 10), progress=False, tensorboard=False,
                      **extra))
    result = {"name": spec.name, "seed": spec.seed, "lr": spec.lr, **extra,
              **item_metrics(str(out / "model"), args.heldout, read_answers(args.answers))}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "model", ignore_errors=True)  # the result is what is kept; weights are large
    cached.write_text(json.dumps(result) + "\n")
    return result


def read_answers(path: str | None) -> dict[str, str] | None:
    """{id: answer} from a JSONL file of records with "id" and "answer" (or "meta": {"answer"})."""
    if not path:
        return None
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out[str(r["id"])] = r.get("answer", (r.get("meta") or {}).get("answer"))
    return out


def premise(results: list[dict], lrs: dict[str, float], base: str = "sft") -> dict:
    """Under `base` (plain SFT), each grouping's held-out loss per group, over its seeds at its lr: the
    paper's premise is that the important group's (the last) loss is above the rest's."""
    runs = [r for r in results if r["name"] == base and r["lr"] == lrs.get(base)]
    table = {}
    for s in runs[0].get("group_loss", {}) if runs else ():
        k = max(len(r["group_loss"][s]) for r in runs)
        totals = [[sum(r["group_loss"][s][g][i] for r in runs if g < len(r["group_loss"][s])) for i in (0, 1)] for g in range(k)]
        losses = [t[0] / t[1] if t[1] else float("nan") for t in totals]
        table[s] = {"group_loss": losses, "holds": bool(k >= 2 and losses[-1] > max(losses[:-1]))}
    return table


def pick_lrs(results: list[dict]) -> dict[str, float]:
    """Per method, the lr with the best mean validation token accuracy over seeds."""
    scores: dict[str, dict[float, list[float]]] = {}
    for r in results:
        val = [v[0] for k, v in r["items"].items() if is_validation(k)] or [float("nan")]
        scores.setdefault(r["name"], {}).setdefault(r["lr"], []).append(float(np.mean(val)))
    return {name: max(by_lr, key=lambda lr: np.mean(by_lr[lr])) for name, by_lr in scores.items()}


def report(args, results: list[dict]) -> dict:
    lrs = pick_lrs(results)
    test = {}
    for r in results:
        if r["lr"] == lrs[r["name"]]:
            test.setdefault(r["name"], {})[r["seed"]] = {k: v[0] for k, v in r["items"].items() if not is_validation(k)}
    table = compare(test, base="sft", margin=args.margin)
    for name in table:
        table[name]["lr"] = lrs[name]
    metric = "held-out answer exact (teacher-forced)" if args.answers else "held-out token accuracy"
    summary = {"metric": f"{metric} (test half of the items)", "margin": args.margin,
               "command": " ".join(sys.argv), "methods": table, "premise": premise(results, lrs)}
    Path(args.work, "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    Path(args.work, "compare.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    lines = [f"# Method comparison\n\nPrimary metric: {summary['metric']}; equivalence margin ±{summary['margin']}.\n",
             "| method | lr | seeds | metric | diff vs sft | 95% CI | verdict |", "|---|---|---|---|---|---|---|"]
    for name, row in summary["methods"].items():
        d = row.get("diff_vs_sft")
        diff = f"{d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "— | —"
        lines.append(f"| {name} | {row['lr']:g} | {row['seeds']} | {row['metric']:.4f} | {diff} | {row.get('verdict', 'baseline')} |")
    if summary.get("premise"):
        lines += ["\nPremise (under sft, held-out loss per group; the paper expects the important group's above the rest's):\n",
                  "| grouping | loss per group (0 .. important) | holds |", "|---|---|---|"]
        for s, row in summary["premise"].items():
            lines.append(f"| {s} | {', '.join(f'{v:.4f}' for v in row['group_loss'])} | {'yes' if row['holds'] else 'no'} |")
    lines.append(f"\nReproduce: `python {summary['command']}`\n")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="sft,sftgo,dft,rho1,weighted")
    ap.add_argument("--groups", default="tfidf")
    ap.add_argument("--lams", default="0.9")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--clip-grad", type=float, default=0.0, help="0: no clipping, so it binds no method harder than another")
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--answers", default=None,
                    help="JSONL of held-out {id, answer} (or records with meta.answer): the primary metric becomes answer exact")
    args = ap.parse_args(argv)
    specs = method_specs(args.methods.split(","), args.groups, [float(x) for x in args.lams.split(",")])
    results = []
    for name, objective, lam in specs:
        for seed in map(int, args.seeds.split(",")):
            for lr in map(float, args.lrs.split(",")):
                results.append(one_run(args, Spec(name, objective, lam, seed, lr)))
                print(f"done {name} seed {seed} lr {lr:g}", file=sys.stderr, flush=True)
    summary = report(args, results)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
