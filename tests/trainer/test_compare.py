"""experiments/compare.py and experiments/paired.py (issue 13.3): the paired bootstrap and its
verdicts against known differences, and a small end-to-end comparison (real training runs of a
tiny model) whose results are cached and whose report has the promised shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import compare as harness  # noqa: E402
from paired import bootstrap_ci, compare, paired_diffs, verdict  # noqa: E402


def _results(shift: float, noise: float, seeds=5, items=200, seed=0):
    rng = np.random.default_rng(seed)
    base = {s: {f"i{i}": float(rng.random()) for i in range(items)} for s in range(seeds)}
    other = {s: {k: v + shift + float(rng.normal(0, noise)) for k, v in base[s].items()} for s in range(seeds)}
    return {"sft": base, "sftgo-tfidf": other}


def test_pairs_by_seed_and_item_within_each_seed():
    a = {0: {"x": 1.0, "y": 2.0}, 1: {"u": 3.0}, 2: {"q": 1.0}}
    b = {0: {"x": 0.5, "y": 1.0, "z": 9.0}, 1: {"u": 1.0, "v": 0.0}}
    d = paired_diffs(a, b)  # seeds 0 and 1 (2 has no baseline); each seed its own items
    assert [x.tolist() for x in d] == [[0.5, 1.0], [2.0]]


@pytest.mark.parametrize("shift, expected", [(0.05, "better"), (-0.05, "worse"), (0.0, "equivalent")])
def test_bootstrap_verdicts_on_known_differences(shift, expected):
    table = compare(_results(shift, noise=0.01), margin=0.01)
    row = table["sftgo-tfidf"]
    lo, hi = row["diff_vs_sft"]["ci95"]
    assert lo <= shift <= hi and row["verdict"] == expected
    assert row["seeds"] == 5 and "diff_vs_sft" not in table["sft"]


def test_inconclusive_when_noise_swamps_the_margin():
    lo, hi = bootstrap_ci(paired_diffs(*[_results(0.0, noise=0.5, items=20)[k] for k in ("sftgo-tfidf", "sft")]))
    assert verdict(lo, hi, 0.01) == "inconclusive"


def test_method_names_and_order():
    specs = harness.method_specs(
        ["weighted", "sft", "sftgo", "dft", "rho1"], ["tfidf", "reference"], ["0.9", "0.5", "decay"]
    )
    assert [s.name for s in specs] == [
        "sft",
        "sftgo-tfidf",
        "sftgo-tfidf-lam0.5",
        "sftgo-tfidf-decay",
        "sftgo-reference",
        "sftgo-reference-lam0.5",
        "sftgo-reference-decay",
        "dft",
        "rho1",
        "weighted",
    ]
    by = {s.name: s for s in specs}
    assert (by["sftgo-tfidf-decay"].lam, by["sftgo-tfidf-decay"].schedule) == (0.9, "linear")
    assert (
        by["rho1"].groups == "reference"
        and by["weighted"].groups == "tfidf"
        and by["sftgo-reference"].groups == "reference"
    )
    with pytest.raises(SystemExit, match="weighted is matched to sftgo-tfidf"):
        harness.method_specs(["sft", "weighted"], ["tfidf"], ["0.9"])


def test_lr_selection_by_primary_or_by_validation_ce():
    val = [k for k in (f"i{n}" for n in range(40)) if harness.is_validation(k)][:2]
    runs = [
        {"name": "sft", "seed": 0, "lr": 1e-4, "items": {val[0]: [0.0, 0.5, 0.3], val[1]: [1.0, 0.5, 0.3]}},
        {"name": "sft", "seed": 0, "lr": 3e-4, "items": {val[0]: [1.0, 0.5, 0.9], val[1]: [1.0, 0.5, 0.9]}},
        {"name": "sft", "seed": 1, "lr": 1e-4, "items": {val[0]: [1.0, 0.5, 9.0], val[1]: [1.0, 0.5, 9.0]}},
    ]
    assert harness.pick_lrs(runs, {0}) == {"sft": 3e-4}  # higher validation answer exact
    assert harness.pick_lrs(runs, {0}, "ce") == {"sft": 1e-4}  # lower validation response CE
    assert harness.pick_lrs(runs, {0, 1}, "ce") == {"sft": 3e-4}  # seed 1 now counts: mean CE 4.65 against 0.9


def test_answers_file_and_premise_rule(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "x", "answer": "42"}\n\n{"id": 7, "meta": {"answer": "Toisto"}}\n')
    assert harness.read_answers(str(path)) == {"x": "42", "7": "Toisto"}
    runs = [
        {"name": "sft", "lr": 1e-3, "group_loss": {"tfidf": [[2.0, 2], [9.0, 3]]}},
        {"name": "sft", "lr": 1e-3, "group_loss": {"tfidf": [[4.0, 2], [3.0, 3]]}},
        {"name": "sft", "lr": 3e-3, "group_loss": {"tfidf": [[100.0, 1], [0.0, 1]]}},
    ]
    table = harness.premise(runs, {"sft": 1e-3})
    assert table == {"tfidf": {"group_loss": [1.5, 2.0], "holds": True}}


@pytest.mark.slow
def test_end_to_end_comparison_is_cached_and_reported(tmp_path, shard_dir, eval_dir, tiny_model_dir):
    argv = [
        "--train",
        str(shard_dir),
        "--heldout",
        str(eval_dir),
        "--work",
        str(tmp_path / "w"),
        "--model",
        tiny_model_dir,
        "--methods",
        "sft,sftgo,weighted",
        "--seeds",
        "0,1",
        "--lrs",
        "1e-3,3e-3",
        "--steps",
        "2",
        "--batch-tokens",
        "160",
        "--eval-every",
        "1",
    ]
    summary = harness.main(argv)
    methods = summary["methods"]
    assert set(methods) == {"sft", "sftgo-tfidf", "weighted"}
    for name in ("sftgo-tfidf", "weighted"):
        row = methods[name]
        assert row["seeds"] == 2 and len(row["diff_vs_sft"]["ci95"]) == 2 and row["lr"] in (1e-3, 3e-3)
        assert row["verdict"] in ("better", "worse", "equivalent", "inconclusive")
    saved = json.loads((tmp_path / "w" / "compare.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(methods))
    # the premise table: under sft, each grouping's held-out loss per group (its arithmetic checked below)
    assert set(saved["premise"]) == {"tfidf"} and len(saved["premise"]["tfidf"]["group_loss"]) == 2
    sft = [
        json.loads(p.read_text())
        for p in (tmp_path / "w" / "runs").glob(f"sft-s*-lr{methods['sft']['lr']:g}/result.json")
    ]
    g1 = sum(r["group_loss"]["tfidf"][1][0] for r in sft) / sum(r["group_loss"]["tfidf"][1][1] for r in sft)
    assert saved["premise"]["tfidf"]["group_loss"][1] == pytest.approx(g1)
    assert "Premise" in (tmp_path / "w" / "compare.md").read_text()
    ce = saved["secondary"]["response_ce"]["sftgo-tfidf"]  # the items' mean response CE, paired like the primary
    runs = {
        r["name"]: r
        for r in (json.loads(p.read_text()) for p in (tmp_path / "w" / "runs").glob("*-s0-*/result.json"))
        if r["lr"] == methods[r["name"]]["lr"]
    }
    test = [k for k in runs["sft"]["items"] if not harness.is_validation(k)]
    diff0 = np.mean([runs["sftgo-tfidf"]["items"][k][2] - runs["sft"]["items"][k][2] for k in test])
    assert ce["seeds"] == 2 and ce["diff_vs_sft"]["items"] == 2 * len(test)
    assert min(ce["diff_vs_sft"]["ci95"]) <= ce["diff_vs_sft"]["mean"] <= max(
        ce["diff_vs_sft"]["ci95"]
    ) and np.isfinite(diff0)
    weighted = json.loads((tmp_path / "w" / "runs" / "weighted-s0-lr0.001" / "result.json").read_text())
    sftgo_log = [
        json.loads(line) for line in (tmp_path / "w" / "runs" / "sftgo-tfidf-s0-lr0.001" / "metrics.jsonl").open()
    ]
    ratios = [r["group_weight"][1] / r["group_weight"][0] for r in sftgo_log if r["split"] == "train"]
    assert weighted["group_weight"] == pytest.approx(np.mean(ratios))  # the control matches SFT-GO's average weight
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    # the sftgo result keeps that ratio: a weighted run needs no training log (logs are not committed)
    sftgo_result = tmp_path / "w" / "runs" / "sftgo-tfidf-s0-lr0.001" / "result.json"
    assert json.loads(sftgo_result.read_text())["group_weight_ratio"] == pytest.approx(np.mean(ratios))
    (sftgo_result.parent / "metrics.jsonl").unlink()
    assert harness.matched_weight(tmp_path / "w", 0, 1e-3, "sftgo-tfidf") == pytest.approx(np.mean(ratios))
    # plain sft weighs both groups alike
    assert (
        json.loads((tmp_path / "w" / "runs" / "sft-s0-lr0.001" / "result.json").read_text())["group_weight_ratio"]
        == 1.0
    )
    assert [step for step, _ in weighted["curve"]] == [0, 1, 2] and (tmp_path / "w" / "curves.png").stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").glob("*/result.json")}
    assert len(stamps) == 12
    harness.main(argv)  # everything cached: no run is trained again
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").glob("*/result.json")}
    assert (
        weighted["settings"]["steps"] == 2
        and weighted["settings"]["precision"] == "auto"
        and "cpu" in weighted["machine"]
    )
    # a cached run made another way is never reused in silence: one sentence naming what differs, nothing trained
    other = [*argv[: argv.index("--steps")], "--steps", "3", *argv[argv.index("--steps") + 2 :], "--precision", "fp32"]
    with pytest.raises(
        SystemExit,
        match=r"other settings \(precision: 'auto', steps: 2; this comparison asks precision: 'fp32', steps: 3\)",
    ):
        harness.main(other)
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").glob("*/result.json")}


def test_seeds_with_their_own_worlds_still_pair_within_each_seed():
    rng = np.random.default_rng(1)
    base = {s: {f"w{s}-i{i}": float(rng.random()) for i in range(100)} for s in range(5)}  # new items per seed
    other = {s: {k: v + 0.05 for k, v in items.items()} for s, items in base.items()}
    row = compare({"sft": base, "dft": other}, margin=0.01)["dft"]
    assert row["diff_vs_sft"]["mean"] == pytest.approx(0.05) and row["diff_vs_sft"]["items"] == 500
    assert row["verdict"] == "better"


@pytest.mark.slow
def test_tuning_seeds_pick_the_lr_and_each_seed_reads_its_own_data(tmp_path, shard_dir, eval_dir, tiny_model_dir):
    """--tune-seeds 0: the lr grid runs on seed 0 only, seed 1 trains at each method's chosen lr; {seed} in the
    paths gives each seed its own train and held-out shards (a generated world per seed)."""
    import shutil

    for seed in (0, 1):
        shutil.copytree(shard_dir, tmp_path / f"train-{seed}")
        shutil.copytree(eval_dir, tmp_path / f"heldout-{seed}")
    (tmp_path / "heldout-1" / "manifest.json").unlink()
    argv = [
        "--train",
        str(tmp_path / "train-{seed}"),
        "--heldout",
        str(tmp_path / "heldout-{seed}"),
        "--work",
        str(tmp_path / "w"),
        "--model",
        tiny_model_dir,
        "--methods",
        "sft,sftgo,weighted",
        "--seeds",
        "0,1",
        "--tune-seeds",
        "0",
        "--lrs",
        "1e-3,3e-3",
        "--steps",
        "2",
        "--batch-tokens",
        "160",
    ]
    with pytest.raises(
        SystemExit, match="heldout-1 \\(seed 1\\) holds no manifest.json"
    ):  # seed 1 reads its own held-out set, here a broken one
        harness.main(argv)
    shutil.rmtree(tmp_path / "heldout-1")
    shutil.copytree(eval_dir, tmp_path / "heldout-1")
    summary = harness.main(argv)
    runs = sorted(p.parent.name for p in (tmp_path / "w" / "runs").glob("*/result.json"))
    chosen = {name: row["lr"] for name, row in summary["methods"].items()}
    assert [r for r in runs if "-s0-" in r] == sorted(f"{m}-s0-lr{lr}" for m in chosen for lr in ("0.001", "0.003"))
    assert [r for r in runs if "-s1-" in r] == sorted(f"{m}-s1-lr{lr:g}" for m, lr in chosen.items())
    assert all(row["seeds"] == 2 for row in summary["methods"].values())
    (tmp_path / "w" / "runs" / f"weighted-s1-lr{chosen['weighted']:g}" / "result.json").unlink()
    before = sorted(p.name for p in (tmp_path / "w" / "runs").iterdir())
    partial = harness.main(argv + ["--report-only"])  # trains nothing; seed 1 is no longer complete
    assert sorted(p.name for p in (tmp_path / "w" / "runs").iterdir()) == before
    assert all(row["seeds"] == 1 for row in partial["methods"].values())
