"""The report of the first quality experiment (memorising fictional facts): experiments/facts/QUALITY.md,
quality.json, quality.png.

Input: the summary dict written by experiments/bench_quality.py (settings, base-model evaluation,
one result per run, grouping overlap) and the hand-written experiments/quality_analysis.md.
Output: the three files in the given directory; figures are mean ± sample std over seeds, and
every method is compared with plain SFT by the paired difference over seeds (the same seed
means the same batches) with a paired t-test.
Cost: under a second (matplotlib).
"""

from __future__ import annotations

import json
import platform
import statistics
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

METHODS = [  # (label, run-name prefix); the prefix plus "-s<seed>" names a run
    ("sft", "sft"),
    ("sftgo · tfidf", "sftgo-tfidf"),
    ("sftgo · reference", "sftgo-reference"),
    ("sftgo · semantic", "sftgo-semantic"),
    ("sftgo · oracle", "sftgo-oracle"),
    ("rho1 · tfidf", "rho1-tfidf"),
]
METRICS = [
    ("em", "exact match", "{:.3f}"),
    ("tf_acc", "teacher-forced acc", "{:.3f}"),
    ("answer_loss", "held-out loss, answer tokens", "{:.3f}"),
    ("rest_loss", "held-out loss, other tokens", "{:.3f}"),
    ("ce", "held-out CE", "{:.3f}"),
]


def by_prefix(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """run-name prefix -> seed -> result."""
    out = defaultdict(dict)
    for r in runs:
        out[r["name"].rsplit("-s", 1)[0]][r["seed"]] = r
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # a missing figure (NaN) is left out
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], f: str = "{:.3f}") -> str:
    m, s = mean_std(values)
    return "n/a" if m != m else f"{f.format(m)} ± {f.format(s)}"


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> dict:
    """Difference a - b over the seeds both have: mean, std, n and the paired t-test's p."""
    seeds = sorted(set(a) & set(b))
    d = [a[s][key] - b[s][key] for s in seeds]
    out = {
        "n": len(d),
        "mean": mean_std(d)[0],
        "std": mean_std(d)[1],
        "p": float("nan"),
        "above": sum(x > 0 for x in d),
    }
    if len(d) > 1 and any(x != d[0] for x in d):
        from scipy.stats import ttest_rel

        out["p"] = float(ttest_rel([a[s][key] for s in seeds], [b[s][key] for s in seeds]).pvalue)
    elif len(d) > 1 and d[0] != 0:
        out["p"] = 0.0  # identical non-zero differences: no variance at all
    return out


def verdict(diff: dict, higher_is_better: bool = True) -> str:
    if diff["n"] < 2 or diff["p"] != diff["p"]:
        return "no difference" if diff["n"] and diff["mean"] == 0 else "not testable"
    better = (diff["mean"] > 0) == higher_is_better
    if diff["p"] < 0.05:
        return "**better than sft, beyond the noise**" if better else "**worse than sft, beyond the noise**"
    return "within the noise"


def method_rows(groups: dict) -> list[dict]:
    sft = groups.get("sft", {})
    rows = []
    for label, prefix in METHODS:
        runs = groups.get(prefix, {})
        if not runs:
            continue
        row = {"method": label, "prefix": prefix, "seeds": sorted(runs)}
        for key, _, _ in METRICS:
            row[key] = [runs[s][key] for s in sorted(runs)]
        if prefix != "sft":
            row["vs_sft_em"] = paired(runs, sft, "em")
            row["vs_sft_answer_loss"] = paired(runs, sft, "answer_loss")
        row["grad_norm_median"] = [runs[s].get("grad_norm_median", float("nan")) for s in sorted(runs)]
        if prefix.startswith("sftgo"):
            row["switch_rate"] = [runs[s]["switch_rate"] for s in sorted(runs)]
            row["worst_is_important"] = [runs[s]["worst_is_important"] for s in sorted(runs)]
        rows.append(row)
    return rows


def sweep_rows(groups: dict, param: str, values: list[float]) -> list[dict]:
    """One row per value; the main runs fill in eta 0.3 and lambda 0.9, and sft is lambda 0."""
    rows = []
    for v in values:
        if param == "eta":
            prefix = "sftgo-tfidf" if v == 0.3 else f"sftgo-tfidf-eta{v:g}"
        else:
            prefix = "sft" if v == 0 else ("sftgo-tfidf" if v == 0.9 else f"sftgo-tfidf-lam{v:g}")
        runs = groups.get(prefix, {})
        if not runs:
            continue
        row = {param: v, "prefix": prefix, "seeds": sorted(runs)}
        for key in ("em", "tf_acc", "answer_loss", "rest_loss", "switch_rate"):
            row[key] = [runs[s][key] for s in sorted(runs)]
        row["vs_sft_em"] = paired(runs, groups.get("sft", {}), "em") if prefix != "sft" else None
        rows.append(row)
    return rows


def lr_check_rows(summary: dict, by: dict) -> list[dict]:
    """sft and sftgo-tfidf per learning rate, on the seeds of the lr check (the main rate included)."""
    lr_runs = [r for r in summary["runs"] if r["study"] == "lr"]
    if not lr_runs:
        return []
    seeds = sorted({r["seed"] for r in lr_runs})
    main_lr = summary["settings"]["lr"]
    rows = []
    for lr in sorted({r["lr"] for r in lr_runs} | {main_lr}):
        tag = "" if lr == main_lr else f"-lr{lr:g}"
        sft = [by.get(f"sft{tag}", {}).get(s) for s in seeds]
        go = [by.get(f"sftgo-tfidf{tag}", {}).get(s) for s in seeds]
        sft, go = [r for r in sft if r], [r for r in go if r]
        rows.append(
            {
                "lr": lr,
                "seeds": seeds,
                "sft_em": [r["em"] for r in sft],
                "sftgo_em": [r["em"] for r in go],
                "sft_answer_loss": [r["answer_loss"] for r in sft],
                "sftgo_answer_loss": [r["answer_loss"] for r in go],
            }
        )
    return rows


def plot(
    summary: dict, mrows: list[dict], eta_rows: list[dict], lam_rows: list[dict], groups: dict, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    labels = [r["method"] for r in mrows]
    x = range(len(mrows))
    colours = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728"][: len(mrows)]

    def bars(ax, key, title, ylabel):
        means = [mean_std(r[key])[0] for r in mrows]
        stds = [mean_std(r[key])[1] for r in mrows]
        ax.bar(x, means, yerr=stds, color=colours, alpha=0.75, capsize=4)
        for i, r in enumerate(mrows):
            ax.scatter([i] * len(r[key]), r[key], color="black", s=12, zorder=3)
        ax.set_xticks(list(x), labels, rotation=25, ha="right")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0, 0], "em", "Held-out exact match (mean ± std; dots = seeds)", "exact match")
    axes[0, 0].axhline(summary["base"]["em"], color="k", ls=":", lw=1, label="base model")
    axes[0, 0].legend(loc="lower right")
    bars(axes[0, 1], "answer_loss", "Held-out loss on the answer tokens", "cross-entropy (nats)")
    bars(axes[0, 2], "rest_loss", "Held-out loss on the other response tokens", "cross-entropy (nats)")

    def sweep(ax, rows, param, title):
        if not rows:
            ax.set_visible(False)
            return
        xs = [r[param] for r in rows]
        for key, colour, label in (("em", "#1f77b4", "exact match"), ("tf_acc", "#2ca02c", "teacher-forced acc")):
            m = [mean_std(r[key])[0] for r in rows]
            s = [mean_std(r[key])[1] for r in rows]
            ax.errorbar(xs, m, yerr=s, marker="o", capsize=4, color=colour, label=label)
        sft = groups.get("sft", {})
        if sft:
            m, _ = mean_std([r["em"] for r in sft.values()])
            ax.axhline(m, color="#7f7f7f", ls="--", lw=1, label="sft exact match")
        ax.set_xlabel({"eta": "η", "lam": "λ"}[param])
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)

    sweep(axes[1, 0], eta_rows, "eta", "eta sweep (sftgo · tfidf, λ = 0.9)")
    sweep(axes[1, 1], lam_rows, "lam", "λ sweep (sftgo · tfidf, η = 0.3; λ = 0 is sft)")

    ax = axes[1, 2]  # training curves of seed 0: per-group loss of the tfidf groups
    for prefix, colour in (("sft", "#7f7f7f"), ("sftgo-tfidf", "#1f77b4"), ("sftgo-oracle", "#9467bd")):
        run = groups.get(prefix, {}).get(0)
        if not run:
            continue
        curves = list(zip(*run["train_group_loss"]))
        for g, ls in ((1, "-"), (0, "--")):
            if g < len(curves):
                name = "answer" if prefix == "sftgo-oracle" else "tfidf"
                ax.plot(
                    range(1, len(curves[g]) + 1), curves[g], ls=ls, color=colour, label=f"{prefix}: {name} group {g}"
                )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss of the group (log)")
    ax.set_title("Training loss per group, seed 0 (each run's own groups)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle("SFT-GO quality experiment: SmolLM2-135M-Instruct, facts about fictional entities inside boilerplate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _diff(d: dict | None, f: str = "{:+.3f}") -> str:
    if not d or not d["n"]:
        return ""
    p = "" if d["p"] != d["p"] else f", p = {d['p']:.3f}"
    return f"{f.format(d['mean'])} ± {d['std']:.3f}{p} (higher in {d.get('above', 0)}/{d['n']} seeds)"


def markdown(summary: dict, mrows, eta_rows, lam_rows, analysis: str) -> str:
    st, base, ov = summary["settings"], summary["base"], summary["overlap"]
    runs = summary["runs"]
    steps = sorted({r["steps"] for r in runs})
    tokens = sorted({r["tokens"] for r in runs if r["study"] == "main"})
    seeds = sorted({r["seed"] for r in runs})
    L = ["# sftgo quality experiment", ""]
    L.append(
        f"Generated by `make bench-quality` (`.venv/bin/python experiments/bench_quality.py`) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.processor() or platform.machine()} with 2 CPU "
        f"cores and no GPU: {len(runs)} runs, {sum(r.get('train_s', 0) + r.get('eval_s', 0) for r in runs) / 60:.0f} "
        f"minutes of training and evaluation (the last invocation took {summary['minutes']:.0f} minutes, "
        "reusing cached runs). Plot: [quality.png](quality.png); "
        f"every number: [quality.json](quality.json). The report is rewritten from cached runs with "
        f"`.venv/bin/python experiments/bench_quality.py --report-only`."
    )
    L += ["", "## Set-up", ""]
    L.append(
        f"- **Model:** the embedded SmolLM2-135M-Instruct, all weights trained (fp32, AdamW, lr {st['lr']:g}, "
        "cosine with "
        f"{st['warmup']} warm-up steps, batches of {st['batch_tokens']} tokens, {st['epochs']:g} epochs = "
        f"{'/'.join(map(str, steps))} optimizer steps). Every method of one seed sees the same batches in the "
        "same order" + (f" ({tokens[0]:,} tokens)" if len(tokens) == 1 else "") + "."
    )
    L.append(
        f"- **Data** (experiments/quality_data.py): {summary['records']['questions']} facts about fictional "
        "entities (names, years, "
        f"lengths, places), each taught by {st['per_fact']} training records ({summary['records']['train']} in all). "
        "Training questions use data/generate.py's templates, and each answer sits inside assistant "
        "boilerplate, so the fact's "
        f"value is {ov['answer_share']:.0%} of the supervised tokens."
    )
    L.append(
        "- **Evaluation** (experiments/quality_eval.py): one held-out question per fact, phrased unlike any "
        "training question."
    )
    L.append("  - *Exact match*: the greedy answer (at most 40 tokens) contains the fact's value.")
    L.append("  - *Teacher-forced accuracy*: every token of the value is the argmax, given a reference response.")
    L.append(
        "  - *Held-out loss*: on the value's tokens (the known important tokens), on the other response tokens, "
        "and per "
        "group of each strategy's grouping of the held-out shards."
    )
    L.append(
        f"  - The base model scores exact match {base['em']:.3f} and answer-token loss {base['answer_loss']:.2f} "
        "(the facts are fictional, so it cannot know them)."
    )
    L.append(
        "- **Methods:** sft; sftgo (λ = 0.9, η = 0.3) with each grouping; sftgo with *oracle* groups, where "
        "group 1 is "
        f"exactly the value's tokens (the upper bound of any grouping); rho1 (CE over the tfidf important group). "
        f"Seeds: {', '.join(map(str, seeds))}."
    )
    L += ["", "## Methods (mean ± std over seeds)", ""]
    L.append(
        "| method | " + " | ".join(m[1] for m in METRICS) + " | Δ exact match vs sft (paired) | verdict | "
        "Δ answer-token loss vs sft (paired) | verdict |"
    )
    L.append("|---|" + "---|" * (len(METRICS) + 4))
    for r in mrows:
        cells = [fmt(r[k], f) for k, _, f in METRICS]
        d, dl = r.get("vs_sft_em"), r.get("vs_sft_answer_loss")
        L.append(
            f"| {r['method']} | " + " | ".join(cells) + f" | {_diff(d)} | {verdict(d) if d else 'baseline'} | "
            f"{_diff(dl)} | {verdict(dl, higher_is_better=False) if dl else 'baseline'} |"
        )
    L.append("")
    L.append(
        "Δ is the mean ± std over seeds of (method − sft) with the same seed; p comes from a paired t-test. "
        "With 3 seeds "
        "a p below 0.05 needs a consistent difference. The exact match of one run moves in steps of "
        f"1/{summary['records']['questions']} = {1 / summary['records']['questions']:.3f}."
    )
    L += ["", "## How well each grouping finds the important tokens", ""]
    L.append(
        "These figures are on the training shards. *Recall* is the share of the value's tokens that land in group 1. "
        "*Precision* is the share of group-1 tokens that belong to the value."
    )
    L += ["", "| grouping | recall | precision |", "|---|---|---|"]
    for s in ("tfidf", "reference", "semantic"):
        L.append(f"| {s} | {ov[s]['recall']:.3f} | {ov[s]['precision']:.3f} |")
    L.append("| oracle | 1.000 | 1.000 |")
    L += ["", "## Held-out loss per group (mean over seeds)", ""]
    L.append(
        "Each column pair is one strategy's grouping of the held-out shards: group 1 (important) / group 0 (rest)."
    )
    L += ["", "| method | tfidf g1 / g0 | reference g1 / g0 | semantic g1 / g0 |", "|---|---|---|---|"]
    by = by_prefix(runs)
    for label, prefix in METHODS:
        rs = list(by.get(prefix, {}).values())
        if not rs:
            continue
        cells = []
        for s in ("tfidf", "reference", "semantic"):
            g1 = statistics.fmean(r["group_loss"][s][1] for r in rs)
            g0 = statistics.fmean(r["group_loss"][s][0] for r in rs)
            cells.append(f"{g1:.3f} / {g0:.3f}")
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    bg = base["group_loss"]
    L.append(
        "| base model | "
        + " | ".join(f"{bg[s][1]:.3f} / {bg[s][0]:.3f}" for s in ("tfidf", "reference", "semantic"))
        + " |"
    )
    for title, rows, param in (
        ("η sweep (sftgo · tfidf, λ = 0.9)", eta_rows, "eta"),
        ("λ sweep (sftgo · tfidf, η = 0.3; λ = 0 is plain sft)", lam_rows, "lam"),
    ):
        L += ["", f"## {title}", ""]
        L.append(
            f"| {'η' if param == 'eta' else 'λ'} | exact match | teacher-forced acc | answer-token loss | "
            "other-token loss | "
            "worst-group switch rate | Δ exact match vs sft |"
        )
        L.append("|---|---|---|---|---|---|---|")
        for r in rows:
            sw = fmt(r["switch_rate"]) if r["prefix"] != "sft" else "—"
            L.append(
                f"| {r[param]:g} | {fmt(r['em'])} | {fmt(r['tf_acc'])} | {fmt(r['answer_loss'])} | "
                f"{fmt(r['rest_loss'])} | "
                f"{sw} | {_diff(r['vs_sft_em']) or '—'} |"
            )
    lr_rows = lr_check_rows(summary, by)
    if lr_rows:
        L += ["", "## Learning-rate check", ""]
        L.append(
            "Is the comparison an artefact of the one learning rate? sft and sftgo · tfidf (λ = 0.9, η = 0.3) "
            "at other peak "
            f"learning rates, seeds {', '.join(map(str, lr_rows[0]['seeds']))}; the rate used everywhere else "
            f"is {st['lr']:g}."
        )
        L += [
            "",
            "| lr | sft exact match | sftgo · tfidf exact match | sft answer-token loss | sftgo · tfidf "
            "answer-token loss |",
            "|---|---|---|---|---|",
        ]
        for r in lr_rows:
            L.append(
                f"| {r['lr']:g} | {fmt(r['sft_em'])} | {fmt(r['sftgo_em'])} | {fmt(r['sft_answer_loss'])} | "
                f"{fmt(r['sftgo_answer_loss'])} |"
            )
    L += ["", "## Worst-group switches and gradient noise", ""]
    L.append(
        "The trainer logs, at every step, which group has the highest batch-level loss. The *switch rate* is the share "
        "of consecutive steps where that group changes. *Worst = important* is the share of steps where group 1 is the "
        "worst. The median gradient norm (before clipping to 1.0) shows how noisy each objective's gradient is."
    )
    L += ["", "| method | switch rate | worst = important | median gradient norm |", "|---|---|---|---|"]
    for r in mrows:
        sw = (fmt(r["switch_rate"]), fmt(r["worst_is_important"])) if "switch_rate" in r else ("—", "—")
        L.append(f"| {r['method']} | {sw[0]} | {sw[1]} | {fmt(r['grad_norm_median'], '{:.2f}')} |")
    L += ["", "## Examples (seed 0, first 4 held-out questions)", ""]
    for label, prefix in (("sft", "sft"), ("sftgo · tfidf", "sftgo-tfidf")):
        run = by.get(prefix, {}).get(0)
        if not run:
            continue
        L.append(f"**{label}**")
        L.append("")
        for a in run["answers"][:4]:
            L.append(f"- Q: {a['question']} (value: *{a['answer']}*) → {a['generated']!r} {'✔' if a['hit'] else '✘'}")
        L.append("")
    if analysis:
        L += ["## Reading the results", "", analysis.strip(), ""]
    L += [
        "## Reproduce",
        "",
        "```",
        "make bench-quality            # the whole experiment, cached per run under experiments/_work/quality",
        ".venv/bin/python experiments/bench_quality.py --report-only   # rewrite this file from the cached runs",
        "```",
        "",
    ]
    return "\n".join(L)


def write_report(summary: dict, out_dir: Path) -> None:
    groups = by_prefix(summary["runs"])
    mrows = method_rows(groups)
    eta_rows = sweep_rows(groups, "eta", sorted({0.3, *map(float, summary["settings"]["etas"].split(","))}))
    lam_rows = sweep_rows(groups, "lam", sorted({0.0, 0.9, *map(float, summary["settings"]["lams"].split(","))}))
    plot(summary, mrows, eta_rows, lam_rows, groups, out_dir / "quality.png")
    analysis_path = out_dir / "quality_analysis.md"
    analysis = analysis_path.read_text() if analysis_path.exists() else ""
    (out_dir / "QUALITY.md").write_text(markdown(summary, mrows, eta_rows, lam_rows, analysis))
    slim = {k: v for k, v in summary.items() if k != "runs"}
    slim["runs"] = [{k: v for k, v in r.items() if k not in ("answers", "train_group_loss")} for r in summary["runs"]]
    slim["methods"] = [{k: v for k, v in r.items()} for r in mrows]
    slim["eta_sweep"], slim["lam_sweep"] = eta_rows, lam_rows
    slim["lr_check"] = lr_check_rows(summary, groups)
    (out_dir / "quality.json").write_text(json.dumps(slim, indent=1) + "\n")
    print(f"wrote {out_dir / 'QUALITY.md'}, quality.json, quality.png")
