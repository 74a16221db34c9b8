"""Paired statistics of the method comparison: differences against a baseline paired by seed and
item, a two-level bootstrap over seeds and items, and a verdict against an equivalence margin.

Input: per method, per seed, a metric per held-out item ({method: {seed: {item: value}}}); seeds may
hold different items (each seed its own generated world).
Output: `compare(...)` -> {method: {"seeds", "metric", "diff_vs_<base>": {"mean", "ci95": [lo, hi]}, "verdict"}}.
Cost: `resamples` x (seeds x items) array work; a few hundred milliseconds for 2,000 resamples.

The bootstrap resamples seeds, then items within each resampled seed, and averages the paired
difference method - baseline over them: the CI covers both sources of
variation the reviewers of the paper asked about (the training run and the test items).
The verdict, stated before the runs: "better" / "worse" when the CI excludes 0 and the margin's
side, "equivalent" when the whole CI lies inside [-margin, +margin], "inconclusive" otherwise.
"""

from __future__ import annotations

import numpy as np


def paired_diffs(method: dict[int, dict[str, float]], base: dict[int, dict[str, float]]) -> list[np.ndarray]:
    """Per seed both have, method - baseline over the items of that seed both have.  Seeds may hold
    different items (a seed that generates its own world has its own held-out items)."""
    seeds = sorted(set(method) & set(base))
    return [
        np.array([method[s][i] - base[s][i] for i in sorted(set(method[s]) & set(base[s]))], dtype=np.float64)
        for s in seeds
    ]


def _mean(diffs: list[np.ndarray]) -> float:
    values = [d for d in diffs if d.size]
    return float(np.concatenate(values).mean()) if values else float("nan")


def bootstrap_ci(diffs: list[np.ndarray], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean paired difference, resampling seeds, then items within each seed."""
    diffs = [d for d in diffs if d.size]
    if not diffs:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        picked = [diffs[k] for k in rng.integers(0, len(diffs), size=len(diffs))]
        means.append(np.concatenate([d[rng.integers(0, d.size, size=d.size)] for d in picked]).mean())
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, margin: float, higher_is_better: bool = True) -> str:
    if not np.isfinite(lo):
        return "no data"
    if -margin <= lo and hi <= margin:
        return "equivalent"
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    return "inconclusive"


def compare(
    results: dict[str, dict[int, dict[str, float]]],
    base: str = "sft",
    margin: float = 0.01,
    higher_is_better: bool = True,
    resamples: int = 2000,
) -> dict:
    """The method table: mean metric, paired difference against `base` with its 95% CI, verdict."""
    table = {}
    for name, per_seed in results.items():
        values = [v for seed in per_seed.values() for v in seed.values()]
        row = {"seeds": len(per_seed), "metric": float(np.mean(values)) if values else float("nan")}
        if name != base and base in results:
            diffs = paired_diffs(per_seed, results[base])
            lo, hi = bootstrap_ci(diffs, resamples)
            row[f"diff_vs_{base}"] = {
                "mean": _mean(diffs),
                "ci95": [lo, hi],
                "items": int(sum(d.size for d in diffs)),
                "paired_seeds": len(diffs),
            }
            row["verdict"] = verdict(lo, hi, margin, higher_is_better)
        table[name] = row
    return table
