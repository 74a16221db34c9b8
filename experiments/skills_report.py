"""The report of the fair SFT-GO experiment: experiments/QUALITY.md, experiments/quality.json and
experiments/quality_curves.png, from the cached runs of experiments/skills.py.

Input: WORK (default experiments/skills) holding compare.json, runs/*/result.json and
world-*/heldout.jsonl (for each item's task); experiments/skills_analysis.md (the reading, written
by hand from the figures; copied in).
Output: QUALITY.md (set-up fixed in advance, method table with paired CIs and verdicts, per-task
table, premise table, learning curves, reading), quality.json
({"methods": {NAME: {"seeds", "metric", "diff_vs_sft": {"mean", "ci95"}, ...}}, "premise": ...}).
Cost: reads a few hundred small JSON files; a second or two (plus matplotlib's import).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import plot_curves, test_items  # noqa: E402
from paired import compare  # noqa: E402

HERE = Path(__file__).resolve().parent


def load(work: Path) -> tuple[dict, list[dict], dict[str, str]]:
    if not (work / "compare.json").is_file():
        raise SystemExit(f"Error: {work} holds no compare.json: run experiments/skills.py (or compare.py) first.")
    summary = json.loads((work / "compare.json").read_text())
    results = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*/result.json"))]
    tasks = {}
    for path in work.glob("world-*/heldout.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            tasks[r["id"]] = r["meta"]["task"]
    return summary, results, tasks


def per_task(
    summary: dict,
    results: list[dict],
    tasks: dict[str, str],
    margin: float,
    which: int = 0,
    higher_is_better: bool = True,
) -> dict:
    """The method table again, one per task (test items of that task only); `which` indexes an item's
    [answer exact, token accuracy, response CE]."""
    test = test_items(results, {name: row["lr"] for name, row in summary["methods"].items()}, which)
    return {
        task: compare(
            {
                name: {
                    seed: {k: v for k, v in items.items() if tasks.get(k) == task} for seed, items in by_seed.items()
                }
                for name, by_seed in test.items()
            },
            base="sft",
            margin=margin,
            higher_is_better=higher_is_better,
        )
        for task in sorted(set(tasks.values()))
    }


def label(r: dict) -> str:
    """The machine a run was trained on, in words: the GPU's name, else the CPU's kind."""
    m = r.get("machine") or {}
    return m.get("cuda") or ("CPU with native bf16" if m.get("cpu_bf16_native") else "CPU")


def reruns(work: Path) -> list[dict]:
    """The results of runs trained again on another machine (WORK/reruns/runs/*/result.json)."""
    return [json.loads(p.read_text()) for p in sorted((work / "reruns" / "runs").glob("*/result.json"))]


def machine_matched(results: list[dict], again: list[dict], lrs: dict[str, float], margin: float) -> dict:
    """Sensitivity: each method against an sft run of the same seed trained on the same machine as the method's
    own run (the cached sft run, or its rerun in `again`, see reruns); a seed without one is left out of that
    method's row.  {"answer_exact" | "response_ce": the paired method table}."""
    base = {}
    for r in [*results, *again]:
        if r["name"] == "sft" and r["lr"] == lrs.get("sft"):
            base.setdefault((r["seed"], label(r)), r)
    out = {}
    for key, which, higher_is_better in (("answer_exact", 0, True), ("response_ce", 2, False)):
        rows = {}
        for name in (n for n in lrs if n != "sft"):
            pairs = [
                (r, base[r["seed"], label(r)])
                for r in results
                if r["name"] == name and r["lr"] == lrs[name] and (r["seed"], label(r)) in base
            ]
            test = test_items([r for pair in pairs for r in pair], {name: lrs[name], "sft": lrs["sft"]}, which)
            rows[name] = compare(test, base="sft", margin=margin, higher_is_better=higher_is_better).get(name, {})
        out[key] = rows
    return out


def machines(work: Path, results: list[dict], again: list[dict]) -> dict:
    """Where the reported runs were trained ({seed: {machine: runs}}), and each run trained again on another
    machine (`again`: WORK/reruns, see skills_lanes.py) against its cached twin: the share of items whose answer
    exact is the same, the mean difference of answer exact (rerun minus cached) and the mean absolute difference
    of response CE."""
    by_seed: dict[str, dict[str, int]] = {}
    for r in results:
        seed = by_seed.setdefault(str(r["seed"]), {})
        seed[label(r)] = seed.get(label(r), 0) + 1
    twins = []
    for rerun in again:
        cached = work / "runs" / f"{rerun['name']}-s{rerun['seed']}-lr{rerun['lr']:g}" / "result.json"
        if not cached.exists():
            continue
        first = json.loads(cached.read_text())
        keys = sorted(set(first["items"]) & set(rerun["items"]))
        twins.append(
            {
                "run": cached.parent.name,
                "cached_on": label(first),
                "rerun_on": label(rerun),
                "items": len(keys),
                "same_answer_exact": sum(first["items"][k][0] == rerun["items"][k][0] for k in keys) / len(keys),
                "answer_exact_diff": sum(rerun["items"][k][0] - first["items"][k][0] for k in keys) / len(keys),
                "response_ce_abs_diff": sum(abs(rerun["items"][k][2] - first["items"][k][2]) for k in keys) / len(keys),
            }
        )
    return {"by_seed": by_seed, "reruns": twins}


def _cells(table: dict, name: str, digits: int = 3) -> str:
    row = table.get(name, {})
    d = row.get("diff_vs_sft")
    return f"{row.get('metric', float('nan')):.{digits}f}" + (
        f" ({d['mean']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}])" if d else ""
    )


def machines_markdown(where: dict) -> list[str]:
    names = sorted({m for seed in where["by_seed"].values() for m in seed})
    L = [
        "",
        "## Where the runs were trained",
        "",
        "Every run in bf16 autocast with fp32 weights (the same settings; "
        "machines differ only in rounding). Runs per seed and machine:",
        "",
        "| seed | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    L += [
        f"| {seed} | " + " | ".join(str(row.get(m, 0)) for m in names) + " |"
        for seed, row in sorted(where["by_seed"].items())
    ]
    if where["reruns"]:
        L += [
            "",
            "The same run trained on both machines (all held-out items; answer exact and response CE, rerun "
            "minus cached):",
            "",
            "| run | cached on | rerun on | items | same answer exact | answer exact diff | mean abs response "
            "CE diff |",
            "|---|---|---|---|---|---|---|",
        ]
        L += [
            f"| {t['run']} | {t['cached_on']} | {t['rerun_on']} | {t['items']} | {t['same_answer_exact']:.3f} | "
            f"{t['answer_exact_diff']:+.3f} | {t['response_ce_abs_diff']:.3f} |"
            for t in where["reruns"]
        ]
    if where.get("matched"):
        L += [
            "",
            "Sensitivity: each method against an sft run of the same seed from the same machine (the cached sft run, "
            "or its rerun), so that no difference mixes machines; seeds with no such sft run are left out.",
            "",
            "| method | seeds | answer exact diff vs sft [95% CI] | verdict | response CE diff vs sft [95% CI] "
            "| verdict |",
            "|---|---|---|---|---|---|",
        ]
        exact, ce = where["matched"]["answer_exact"], where["matched"]["response_ce"]
        for name, row in exact.items():
            cells = []
            for r in (row, ce.get(name, {})):
                d = r.get("diff_vs_sft")
                cells += [
                    f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "—",
                    r.get("verdict", "—"),
                ]
            L.append(
                f"| {name} | {(row.get('diff_vs_sft') or {}).get('paired_seeds', 0)} | " + " | ".join(cells) + " |"
            )
    return L


def markdown(summary: dict, tasks_table: dict, runs: int, analysis: str, where: dict | None = None) -> str:
    m = summary["methods"]
    L = [
        "# Does SFT-GO help? A fair test on skill tasks",
        "",
        "Generated by `experiments/skills_report.py` from the cached training runs of `experiments/skills.py` "
        f"({runs} on "
        "disk; each row uses the seeds it lists) "
        "(every number: [quality.json](quality.json); curves: [quality_curves.png](quality_curves.png)). "
        "The first experiment (memorising fictional facts) is kept in [facts/QUALITY.md](facts/QUALITY.md).",
        "",
        "## Set-up, fixed before any run",
        "",
        analysis.split("<!-- reading -->")[0].strip(),
        "",
        "## Methods",
        "",
        f"Primary metric: {summary['metric']}; differences against sft paired by seed and item, 95% bootstrap CI "
        f"(seeds, then items within them); equivalence margin ±{summary['margin']} stated in advance. Each method's lr "
        f"was chosen by {summary.get('lr_selected_by', 'its validation primary metric')} on the tuning seed.",
        "",
        "| method | lr | seeds | answer exact | diff vs sft | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in m.items():
        d = row.get("diff_vs_sft")
        diff = f"{d['mean']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "— | —"
        L.append(
            f"| {name} | {row['lr']:g} | {row['seeds']} | {row['metric']:.3f} | {diff} | "
            f"{row.get('verdict', 'baseline')} |"
        )
    for title, tables in (
        ("answer exact", tasks_table["exact"]),
        ("response CE, lower is better (secondary)", tasks_table["ce"]),
    ):
        L += [
            "",
            f"## Per task: {title}; mean (diff vs sft [95% CI])",
            "",
            "| method | " + " | ".join(tables) + " |",
            "|---|" + "---|" * len(tables),
        ]
        L += [f"| {name} | " + " | ".join(_cells(t, name) for t in tables.values()) + " |" for name in m]
    sec = summary.get("secondary", {})
    if sec:
        L += [
            "",
            "## Secondary metrics (same runs and items; reported, never used to choose)",
            "",
            'Response CE: each test item\'s mean CE over its response tokens (lower is better; "better" = lower). '
            "Token accuracy: the share of its response tokens that are the argmax.",
            "",
            "| method | response CE | diff vs sft [95% CI] | verdict | token accuracy | diff vs sft [95% CI] | "
            "verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in m:
            cells = []
            for key in ("response_ce", "token_accuracy"):
                row = sec[key].get(name, {})
                d = row.get("diff_vs_sft")
                diff = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "—"
                cells += [f"{row.get('metric', float('nan')):.3f}", diff, row.get("verdict", "baseline")]
            L.append(f"| {name} | " + " | ".join(cells) + " |")
    L += [
        "",
        "## The premise: under sft, is the important group's held-out loss above the rest's?",
        "",
        'Mean held-out CE per group at sft\'s chosen lr over all seeds ("answer": group 1 is exactly the computed '
        "answer's tokens, the oracle grouping).",
        "",
        "| grouping | group 0 (rest) | group 1 (important) | holds |",
        "|---|---|---|---|",
    ]
    for s, row in summary["premise"].items():
        L.append(
            f"| {s} | "
            + " | ".join(f"{v:.3f}" for v in row["group_loss"])
            + f" | {'yes' if row['holds'] else '**no**'} |"
        )
    L += machines_markdown(where) if where else []
    L += [
        "",
        "## Learning curves",
        "",
        "![held-out loss against step](quality_curves.png)",
        "",
        analysis.split("<!-- reading -->")[1].strip() if "<!-- reading -->" in analysis else "",
        "",
        f"Reproduce: `{summary['command']}`",
        "",
    ]
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(HERE / "skills"))
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    summary, results, tasks = load(work)
    if "seeds" in summary:  # the seeds compare.py reported (--report-only leaves incomplete ones out)
        results = [r for r in results if r["seed"] in summary["seeds"]]
    tasks_table = {
        "exact": per_task(summary, results, tasks, summary["margin"]),
        "ce": per_task(summary, results, tasks, summary["margin"], which=2, higher_is_better=False),
    }
    lrs = {name: row["lr"] for name, row in summary["methods"].items()}
    plot_curves(results, lrs, out / "quality_curves.png")
    analysis_path = HERE / "skills_analysis.md"
    analysis = analysis_path.read_text() if analysis_path.exists() else ""
    again = reruns(work)
    where = {**machines(work, results, again), "matched": machine_matched(results, again, lrs, summary["margin"])}
    (out / "QUALITY.md").write_text(markdown(summary, tasks_table, len(results), analysis, where))
    slim = {
        "metric": summary["metric"],
        "margin": summary["margin"],
        "command": summary["command"],
        "lr_selected_by": summary.get("lr_selected_by"),
        "lr_by_primary": summary.get("lr_by_primary"),
        "methods": {
            name: {k: row[k] for k in ("seeds", "metric", "diff_vs_sft", "verdict", "lr") if k in row}
            for name, row in summary["methods"].items()
        },
        "per_task": {
            task: {n: {k: r[k] for k in ("metric", "diff_vs_sft") if k in r} for n, r in t.items()}
            for task, t in tasks_table["exact"].items()
        },
        "per_task_response_ce": {
            task: {n: {k: r[k] for k in ("metric", "diff_vs_sft") if k in r} for n, r in t.items()}
            for task, t in tasks_table["ce"].items()
        },
        "secondary": summary.get("secondary", {}),
        "premise": summary["premise"],
        "runs": len(results),
        "machines": where,
    }
    (out / "quality.json").write_text(json.dumps(slim, indent=1) + "\n")
    print(f"wrote {out / 'QUALITY.md'}, quality.json, quality_curves.png")


if __name__ == "__main__":
    main()
