"""Does token importance help on YOUR data?  A fair, paired comparison of SFT-GO and its baselines
before you pay for a big run.

    python experiments/compare.py --train SHARDS --heldout SHARDS --work DIR [--model NAME]
        [--methods sft,sftgo,dft,rho1,weighted] [--groups tfidf[,reference,semantic]]
        [--lams 0.9[,0.3,0.5,decay]] [--seeds 0,1,2] [--tune-seeds 0,1] [--lrs 1e-4,3e-4,1e-3]
        [--steps 30] [--batch-tokens 1024] [--eval-every 0] [--precision auto] [--margin 0.01]
        [--answers FILE] [--report-only]

Input: shard directories of `sftgo-prep build` (train, and a held-out set built with the same
tokenizer), a model, the methods, seeds and learning-rate grid.  `{seed}` in --train, --heldout
and --answers is replaced by the seed: each seed may bring its own data (a generated world).
Output: DIR/runs/NAME/result.json per training run (cached: an interrupted comparison continues
where it stopped; commit them to carry on elsewhere), DIR/compare.json
({"methods": {NAME: {"seeds", "metric", "diff_vs_sft": {"mean", "ci95"}, "verdict", "lr"}}}) and
DIR/compare.md (the table, the premise check and the command); compare.json's "secondary" has the
same paired table for token accuracy and for the item's mean response CE (lower is better, so
"better" there means a lower CE), which are reported but never pick an lr.
Method: every method is trained with each lr of the grid and each seed (the seed sets the data
order), on the same token budget and with the same clipping; each method's lr is the one with the
best mean *validation* metric (half of the held-out items, chosen by a hash of their id; with
--select ce the lowest validation response CE) over
the --tune-seeds (default: all seeds; the other seeds then train only at the chosen lr); the
other half is the test set.  With --eval-every N each run logs its held-out loss every N steps:
the learning curves (DIR/curves.png, and "curve" in each result.json).  The primary metric, fixed
in advance, is held-out token accuracy (the share of a response's tokens the model predicts,
teacher-forced, per item), or with --answers (a JSONL of {id, answer}) answer exact: every token of
the item's answer is the argmax.  The premise table gives, under sft, each grouping's held-out loss
per group.  Differences against
`sft` are paired by seed and item with a 95% bootstrap CI over seeds and items and a verdict
against the equivalence margin (experiments/paired.py).  `weighted` gets the group-1 weight that
the `sftgo` run (first grouping, λ 0.9) of the same seed and lr applied on average (its logged
group_weight).  `rho1` trains on the `reference` grouping's important group when it is given,
else on the first grouping's.  "decay" in --lams is λ decaying linearly from 0.9 to 0.
Method names: sft, dft, rho1, weighted, sftgo-<grouping>[-lam<λ>|-decay].
Cost: methods x (tune seeds x lrs + other seeds) training runs of --steps steps (each a
`sftgo-train` run in-process), plus one teacher-forced pass over the held-out set per run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from sftgo.trainer import registry  # noqa: E402
from sftgo.trainer.config import TrainConfig  # noqa: E402
from sftgo.trainer.loop import run as train  # noqa: E402
from sftgo.trainer.metrics import read_jsonl  # noqa: E402
from sftgo.trainer.model import causal_lm  # noqa: E402


@dataclass(frozen=True)
class Spec:
    name: str
    objective: str
    groups: str
    lam: float = 0.9
    schedule: str = "constant"
    seed: int = 0
    lr: float = 1e-4

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}-lr{self.lr:g}"


def method_specs(methods: list[str], groups: list[str], lams: list[str]) -> list[Spec]:
    """One Spec per method (seed and lr unset); sftgo once per grouping and λ ("decay": linear 0.9 -> 0);
    weighted last (it needs the first grouping's λ-0.9 sftgo run)."""
    out = []
    for m in methods:
        if m == "sftgo":
            for g in groups:
                for lam in lams:
                    if lam == "decay":
                        out.append(Spec(f"sftgo-{g}-decay", "sftgo", g, 0.9, "linear"))
                    else:
                        out.append(
                            Spec(
                                f"sftgo-{g}" + ("" if float(lam) == 0.9 else f"-lam{float(lam):g}"),
                                "sftgo",
                                g,
                                float(lam),
                            )
                        )
        elif m == "rho1":
            out.append(Spec(m, m, "reference" if "reference" in groups else groups[0], 0.0))
        else:
            out.append(Spec(m, m, groups[0], 0.0))
    if any(s.objective == "weighted" for s in out) and not any(s.name == f"sftgo-{groups[0]}" for s in out):
        raise SystemExit(f"weighted is matched to sftgo-{groups[0]} (λ 0.9): add sftgo to --methods and 0.9 to --lams.")
    return sorted(out, key=lambda t: t.objective == "weighted")


def is_validation(item: str) -> bool:
    return int(hashlib.sha256(item.encode()).hexdigest(), 16) % 2 == 0


@torch.no_grad()
def item_metrics(
    model_dir: str, heldout: str, answers: dict[str, str] | None = None, bf16: bool = False, batch: int = 16
) -> dict:
    """Teacher-forced metrics of every held-out item: {"items": {id: [primary, token accuracy, mean CE]},
    "group_loss": {strategy: [[CE sum, tokens] per group]}}.  primary: with `answers`, 1 when every token
    of the item's answer is the model's argmax (items whose answer is not found are left out), else the
    token accuracy.  With `answers`, group_loss also has "answer": group 1 = the answer's tokens.
    Rows go through the model `batch` at a time, right-padded (causal: a row never sees its padding), on
    the GPU where there is one (as the run trained), else on the CPU."""
    import pyarrow.parquet as pq
    from quality_eval import answer_positions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(model_dir, dtype=torch.float32).to(device)
    lm, tokenizer = causal_lm(model), load_tokenizer(model_dir)
    manifest = verify_shards(heldout, read_manifest(heldout))
    strategies = list(manifest["strategies"])
    rows = []
    for shard in manifest["shards"]:
        columns = ["id", "input_ids", "loss_mask"] + [group_column(s) for s in strategies]
        rows += pq.read_table(member_path(heldout, shard["path"]), columns=columns).to_pylist()
    items, sums = {}, {s: {} for s in strategies + (["answer"] if answers is not None else [])}
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        ids = torch.zeros(len(chunk), max(len(r["input_ids"]) for r in chunk), dtype=torch.long)
        for k, r in enumerate(chunk):
            ids[k, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        with cast:
            hidden = lm.get_decoder()(input_ids=ids.to(device)).last_hidden_state
        for k, row in enumerate(chunk):
            pos = torch.nonzero(torch.tensor(row["loss_mask"])[1:] == 1).flatten() + 1  # supervised tokens
            logits = lm.get_output_embeddings()(hidden[k, (pos - 1).to(device)].float()).float().cpu()
            target = ids[k, pos]
            ce = F.cross_entropy(logits, target, reduction="none")
            right = logits.argmax(-1) == target
            primary, groups = float(right.float().mean()), {s: row[group_column(s)] for s in strategies}
            if answers is not None:
                where = answer_positions(row["input_ids"], row["loss_mask"], answers.get(row["id"], "\0"), tokenizer)
                if not where:
                    continue
                at = {int(p): j for j, p in enumerate(pos)}
                primary = float(all(bool(right[at[p]]) for p in where if p in at))
                groups["answer"] = [1 if p in set(where) else 0 for p in range(len(row["input_ids"]))]
            items[row["id"]] = [primary, float(right.float().mean()), float(ce.mean())]
            for s, g_row in groups.items():
                for g, c in zip(torch.tensor(g_row)[pos].tolist(), ce.tolist()):
                    total = sums[s].setdefault(g, [0.0, 0])
                    total[0], total[1] = total[0] + c, total[1] + 1
    return {
        "items": items,
        "group_loss": {s: [sums[s].get(g, [0.0, 0]) for g in range(max(sums[s], default=-1) + 1)] for s in sums},
    }


def matched_weight(work: Path, seed: int, lr: float, name: str) -> float:
    """The mean group-1 / group-0 token weight the sftgo run `name` of this seed applied: at this lr, or, where
    that run was not made (a seed past the tuning seeds), at the lr its own runs of this seed used."""
    runs = sorted((work / "runs").glob(f"{name}-s{seed}-lr*/result.json"))
    same = work / "runs" / f"{name}-s{seed}-lr{lr:g}" / "result.json"
    result = same if same.exists() else (runs or [same])[0]
    kept = json.loads(result.read_text()).get("group_weight_ratio") if result.exists() else None
    if kept is not None:
        return kept
    log = result.parent / "metrics.jsonl"  # a result cached before it kept the ratio: its training log
    ratio = group_weight_ratio(read_jsonl(log) if log.exists() else [])
    if ratio is None:
        raise SystemExit(
            f"weighted needs the {name} run of seed {seed} first (add sftgo to --methods), "
            f"with its training log {result.parent / 'metrics.jsonl'}."
        )
    return ratio


def group_weight_ratio(recs: list[dict]) -> float | None:
    """The mean group-1 / group-0 token weight over the training steps of a run's log records (1.0 for sft;
    None: none logged)."""
    recs = [
        r for r in recs if r.get("split") == "train" and len(r.get("group_weight", [])) >= 2 and r["group_weight"][0]
    ]
    return float(np.mean([r["group_weight"][1] / r["group_weight"][0] for r in recs])) if recs else None


def fmt(template: str | None, seed: int) -> str | None:
    return template.replace("{seed}", str(seed)) if template else template


def run_stats(metrics: Path) -> dict:
    """What a result keeps of a run's log: the held-out learning curve and the gradient norms' median."""
    recs = read_jsonl(metrics)
    train_recs = [r for r in recs if r.get("split") == "train"]
    return {
        "curve": [[r.get("step", 0), r["ce"]] for r in recs if r.get("split") == "eval"],
        "group_weight_ratio": group_weight_ratio(recs),
        "grad_norm_median": float(np.median([r["grad_norm"] for r in train_recs])) if train_recs else None,
        "train_ce_last": train_recs[-1]["ce"] if train_recs else None,
    }


def run_settings(args, seed: int) -> dict:
    """What a cached run must share with the comparison that reads it (besides its name: method, seed, lr)."""
    return {
        "train": fmt(args.train, seed),
        "heldout": fmt(args.heldout, seed),
        "answers": fmt(args.answers, seed),
        "model": args.model,
        "steps": args.steps,
        "batch_tokens": args.batch_tokens,
        "clip_grad": args.clip_grad,
        "precision": args.precision,
        "eval_every": args.eval_every,
    }


def machine() -> dict:
    """Where a run was trained (reported, not compared: the same settings on another machine differ only in
    rounding)."""
    from sftgo.core.machine import cpu_model
    from sftgo.trainer.distributed import bf16_native

    return {
        "cpu": cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_bf16_native": bf16_native(torch.device("cpu")),
        "torch": torch.__version__,
    }


def one_run(args, spec: Spec) -> dict:
    """Train and evaluate one (method, seed, lr), or read its cached result."""
    out = Path(args.work) / "runs" / spec.key
    cached = out / "result.json"
    settings = run_settings(args, spec.seed)
    if cached.exists():
        result = json.loads(cached.read_text())
        if result.get("settings", settings) != settings:  # a run cached by name must have been made the same way
            made = result["settings"]
            changed = sorted(k for k in settings if made.get(k) != settings[k])
            then = ", ".join(f"{k}: {made.get(k)!r}" for k in changed)
            now = ", ".join(f"{k}: {settings[k]!r}" for k in changed)
            raise SystemExit(
                f"{cached} was made with other settings ({then}; this comparison asks {now}): "
                "use another --work directory, or delete that run to redo it."
            )
        return result
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run is redone (runs are short)
    base = f"sftgo-{args.groups.split(',')[0]}"
    extra = (
        {"group_weight": matched_weight(Path(args.work), spec.seed, spec.lr, base)}
        if spec.objective == "weighted"
        else {}
    )
    heldout = fmt(args.heldout, spec.seed)
    curves = {"eval_data": heldout, "eval_every": args.eval_every, "eval_batches": 4} if args.eval_every else {}
    schedule = {"lam_schedule": spec.schedule, "lam_end": 0.0} if spec.schedule != "constant" else {}
    train(
        TrainConfig(
            data=fmt(args.train, spec.seed),
            out=str(out),
            model=args.model,
            objective=spec.objective,
            groups=spec.groups,
            lr=spec.lr,
            seed=spec.seed,
            max_steps=args.steps,
            batch_tokens=args.batch_tokens,
            clip_grad=args.clip_grad,
            warmup_steps=max(1, args.steps // 10),
            progress=False,
            tensorboard=False,
            precision=args.precision,
            **({"lam": spec.lam} if "lam" in registry.get(spec.objective).settings else {}),
            **schedule,
            **curves,
            **extra,
        )
    )
    result = {
        "name": spec.name,
        "seed": spec.seed,
        "lr": spec.lr,
        "settings": settings,
        "machine": machine(),
        **extra,
        **run_stats(out / "metrics.jsonl"),
        **item_metrics(
            str(out / "model"), heldout, read_answers(fmt(args.answers, spec.seed)), bf16=args.precision == "bf16"
        ),
    }
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
        totals = [
            [sum(r["group_loss"][s][g][i] for r in runs if g < len(r["group_loss"][s])) for i in (0, 1)]
            for g in range(k)
        ]
        losses = [t[0] / t[1] if t[1] else float("nan") for t in totals]
        table[s] = {"group_loss": losses, "holds": bool(k >= 2 and losses[-1] > max(losses[:-1]))}
    return table


def pick_lrs(results: list[dict], seeds: set[int] | None = None, select: str = "primary") -> dict[str, float]:
    """Per method, the lr with the best mean validation metric over the (tuning) seeds: the primary metric
    (highest), or with select="ce" the response CE (lowest).  Ties go to the lr listed first."""
    which, sign = (2, -1.0) if select == "ce" else (0, 1.0)
    scores: dict[str, dict[float, list[float]]] = {}
    for r in results:
        if seeds is None or r["seed"] in seeds:
            val = [v[which] for k, v in r["items"].items() if is_validation(k)] or [float("nan")]
            scores.setdefault(r["name"], {}).setdefault(r["lr"], []).append(sign * float(np.mean(val)))
    return {name: max(by_lr, key=lambda lr: np.mean(by_lr[lr])) for name, by_lr in scores.items()}


def test_items(results: list[dict], lrs: dict[str, float], which: int) -> dict:
    """{method: {seed: {item: value}}} on the test half at each method's chosen lr; `which` indexes an item's
    [primary, token accuracy, response CE]."""
    test = {}
    for r in results:
        if r["lr"] == lrs.get(r["name"]):
            test.setdefault(r["name"], {})[r["seed"]] = {
                k: v[which] for k, v in r["items"].items() if not is_validation(k)
            }
    return test


def report(args, results: list[dict], lrs: dict[str, float]) -> dict:
    table = compare(test_items(results, lrs, 0), base="sft", margin=args.margin)
    for name in table:
        table[name]["lr"] = lrs[name]
    metric = "held-out answer exact (teacher-forced)" if args.answers else "held-out token accuracy"
    # secondary metrics, on the same items and runs: reported, never used to pick an lr or a verdict headline
    secondary = {
        "token_accuracy": compare(test_items(results, lrs, 1), base="sft", margin=args.margin),
        "response_ce": compare(test_items(results, lrs, 2), base="sft", margin=args.margin, higher_is_better=False),
    }
    summary = {
        "metric": f"{metric} (test half of the items)",
        "margin": args.margin,
        "lr_selected_by": "validation response CE" if args.select == "ce" else f"validation {metric}",
        "lr_by_primary": pick_lrs(results, set(args.tune_seeds_list), "primary"),
        "command": " ".join(sys.argv),
        "seeds": sorted({r["seed"] for r in results}),
        "methods": table,
        "secondary": secondary,
        "premise": premise(results, lrs),
    }
    Path(args.work, "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    Path(args.work, "compare.md").write_text(markdown(summary))
    if args.eval_every:
        plot_curves(results, lrs, Path(args.work, "curves.png"))
    return summary


def _style(name: str) -> dict:
    """Colour by grouping (or baseline), line style by λ variant."""
    colours = {"sft": "black", "dft": "tab:red", "rho1": "tab:purple", "weighted": "tab:brown"}
    grouping = name.split("-")[1] if name.startswith("sftgo-") else None
    colour = colours.get(name) or {"tfidf": "tab:blue", "reference": "tab:green", "semantic": "tab:orange"}.get(
        grouping, "tab:gray"
    )
    dash = "--" if name.endswith("-decay") else ":" if "-lam0.3" in name else "-." if "-lam0.5" in name else "-"
    return {"color": colour, "linestyle": dash, "lw": 2.5 if name == "sft" else 1.3}


def plot_curves(results: list[dict], lrs: dict[str, float], path: Path) -> None:
    """Held-out loss against step, per method at its chosen lr, averaged over seeds: the whole run, and the
    second half zoomed in (methods far above the rest are left out of the zoom's y range, not of the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    tails, last_step = [], 0
    for name in lrs:
        curves = [
            dict(map(tuple, r["curve"]))
            for r in results
            if r["name"] == name and r["lr"] == lrs[name] and r.get("curve")
        ]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        ys = [float(np.mean([c[s] for c in curves])) for s in steps]
        for ax in axes:
            ax.plot(steps, ys, marker=".", label=f"{name} (lr {lrs[name]:g})", **_style(name))
        tails.append([y for s, y in zip(steps, ys) if s >= steps[-1] / 2])
        last_step = max(last_step, steps[-1])
    if tails:
        last = sorted(t[-1] for t in tails)
        near = [t for t in tails if t[-1] <= last[len(last) // 2] * 1.5]  # within 1.5x of the median final loss
        axes[1].set_xlim(last_step / 2 - 1, last_step + 1)
        axes[1].set_ylim(min(min(t) for t in near) * 0.98, max(max(t) for t in near) * 1.02)
    axes[0].set(
        xlabel="optimizer step",
        ylabel="held-out CE (mean over seeds)",
        title="Held-out loss at each method's chosen lr",
    )
    axes[1].set(xlabel="optimizer step", title="Second half, zoomed")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict) -> str:
    lines = [
        f"# Method comparison\n\nPrimary metric: {summary['metric']}; equivalence margin ±{summary['margin']}; "
        f"each method's lr chosen by {summary.get('lr_selected_by', 'the validation primary metric')}.\n",
        "| method | lr | seeds | metric | diff vs sft | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["methods"].items():
        d = row.get("diff_vs_sft")
        diff = f"{d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "— | —"
        lines.append(
            f"| {name} | {row['lr']:g} | {row['seeds']} | {row['metric']:.4f} | {diff} | "
            f"{row.get('verdict', 'baseline')} |"
        )
    if summary.get("premise"):
        lines += [
            "\nPremise (under sft, held-out loss per group; the paper expects the important group's above the "
            "rest's):\n",
            "| grouping | loss per group (0 .. important) | holds |",
            "|---|---|---|",
        ]
        for s, row in summary["premise"].items():
            lines.append(
                f"| {s} | {', '.join(f'{v:.4f}' for v in row['group_loss'])} | {'yes' if row['holds'] else 'no'} |"
            )
    lines.append(f"\nReproduce: `python {summary['command']}`\n")
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every optional option's default after its help."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--train", required=True, help="training shard folder (FOLDER{seed} per seed) [required]")
    ap.add_argument("--heldout", required=True, help="held-out shard folder (FOLDER{seed} per seed) [required]")
    ap.add_argument("--work", required=True, help="folder for the runs (cached) and the report [required]")
    ap.add_argument("--model", default=None, help="model to fine-tune (None: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default="sft,sftgo,dft,rho1,weighted", help="methods to compare, comma-separated")
    ap.add_argument("--groups", default="tfidf", help="groupings, comma-separated; sftgo runs once per grouping and λ")
    ap.add_argument("--lams", default="0.9", help="λ values of sftgo, comma-separated; 'decay': linear from 0.9 to 0")
    ap.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated: each varies the data and the order")
    ap.add_argument("--tune-seeds", default=None, help="seeds whose validation half picks each method's lr (None: all)")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="learning rates each method is tried at, comma-separated")
    ap.add_argument(
        "--select",
        default="primary",
        choices=["primary", "ce"],
        help="what picks each method's lr on the validation half: the primary metric, or the response CE",
    )
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of every run (the same token budget)")
    ap.add_argument("--batch-tokens", type=int, default=1024, help="token budget of one micro-batch")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps: the learning curves")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="sftgo-train --precision")
    ap.add_argument(
        "--clip-grad", type=float, default=0.0, help="0: no clipping, so it binds no method harder than another"
    )
    ap.add_argument("--margin", type=float, default=0.01, help="equivalence margin of the verdicts (metric units)")
    ap.add_argument(
        "--answers",
        default=None,
        help="JSONL of held-out {id, answer} (or records with meta.answer): the primary metric becomes answer exact",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the cached runs, leaving out (and naming) the seeds that are not complete",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    specs = method_specs(args.methods.split(","), args.groups.split(","), args.lams.split(","))
    seeds = [int(x) for x in args.seeds.split(",")]
    tune = [int(x) for x in args.tune_seeds.split(",")] if args.tune_seeds else seeds
    args.tune_seeds_list = tune
    for seed in (
        [] if args.report_only else seeds
    ):  # every seed's data, before any training: one sentence, not a traceback
        for flag, template in (("--train", args.train), ("--heldout", args.heldout)):
            if not (Path(fmt(template, seed)) / "manifest.json").is_file():
                raise SystemExit(
                    f"Error: {flag} {fmt(template, seed)} (seed {seed}) holds no manifest.json: "
                    "build it with `sftgo-prep build` first."
                )
        if args.answers and not Path(fmt(args.answers, seed)).is_file():
            raise SystemExit(f"Error: --answers {fmt(args.answers, seed)} (seed {seed}) does not exist.")
    results, missing = [], []

    def go(spec: Spec, seed: int, lr: float) -> None:
        spec = dataclasses.replace(spec, seed=seed, lr=lr)
        if args.report_only and not (Path(args.work) / "runs" / spec.key / "result.json").exists():
            missing.append(spec.key)
            return
        results.append(one_run(args, spec))
        print(f"done {spec.name} seed {seed} lr {lr:g}", file=sys.stderr, flush=True)

    for spec in specs:  # the lr grid on the tuning seeds
        for seed in tune:
            for lr in map(float, args.lrs.split(",")):
                go(spec, seed, lr)
    lrs = pick_lrs(results, set(tune), args.select)
    for seed in (s for s in seeds if s not in tune):  # the other seeds at each method's chosen lr, a seed at a time
        for spec in specs:  # (an interrupted experiment has whole seeds to report)
            if spec.name in lrs:
                go(spec, seed, lrs[spec.name])
            else:  # --report-only before the lr grid is complete
                missing.append(f"{spec.name}-s{seed}-lr?")
    if missing:  # --report-only: a seed is reported only where every method has its run
        gaps = {int(k.rsplit("-s", 1)[1].split("-lr")[0]) for k in missing}
        results = [r for r in results if r["seed"] not in gaps]
        print(
            f"--report-only: {len(missing)} run(s) not trained yet; seeds {sorted(gaps)} left out of the report.",
            file=sys.stderr,
        )
    if not results:  # --report-only with no seed complete: nothing to compare
        raise SystemExit(
            f"Error: {args.work} holds no complete seed to report ({len(missing)} run(s) missing); "
            "train them first (without --report-only)."
        )
    summary = report(args, results, lrs)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
