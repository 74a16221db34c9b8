"""experiments/skills_data.py: answers computed from the inputs, held-out phrasings never trained on,
new entities and numbers in a held-out world, and determinism by seed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import skills_data  # noqa: E402


def test_answers_are_computed_from_the_input_and_sit_in_the_output():
    for r in skills_data.make_split(0, 40):
        task, answer = r["meta"]["task"], r["meta"]["answer"]
        assert answer in r["output"]
        if task == "arithmetic":
            a, b = map(int, re.findall(r"\d+", r["instruction"]))
            assert answer == str(a + b)
        elif task == "transformation":
            word = re.search(r"'(\w+)'", r["instruction"]).group(1)
            assert answer == word[::-1]
        elif task == "extraction":
            assert f"born in {answer} in" in r["input"]
        else:
            assert answer.split(" in ")[-1] in r["input"]
    assert {r["meta"]["task"] for r in skills_data.make_split(0, 8)} == set(skills_data.TEMPLATES)


def test_heldout_phrasings_and_world_are_new():
    train, held = skills_data.make_split(0, 200), skills_data.make_split(1, 40, heldout=True)
    for task, (seen, unseen) in skills_data.TEMPLATES.items():
        assert not set(seen) & set(unseen), task
    used = {r["instruction"] for r in train}
    assert not any(h["instruction"] in used for h in held)
    # new entities and passages (sums of new operands may repeat a training sum by chance: not a leak)
    words = {r["meta"]["answer"] for r in train if r["meta"]["task"] != "arithmetic"}
    assert not {h["meta"]["answer"] for h in held if h["meta"]["task"] != "arithmetic"} & words
    assert not {h["input"] for h in held if h["input"]} & {r["input"] for r in train}
    assert skills_data.make_split(3, 12) == skills_data.make_split(3, 12)


def test_report_has_the_promised_shape_and_per_task_pairs(tmp_path):
    """experiments/skills_report.py: quality.json is {"methods": {NAME: {"seeds", "metric", "diff_vs_sft":
    {"mean", "ci95"}}}}, and each per-task difference is the mean over that task's test items (checked by hand)."""
    import json

    import skills_report
    from compare import is_validation

    work = tmp_path / "work"
    items, tasks = {}, {}
    for seed in range(2):
        world = work / f"world-{seed}"
        world.mkdir(parents=True)
        records = skills_data.make_split(100 + seed, 16, heldout=True)
        (world / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        items[seed] = [r["id"] for r in records]
        tasks.update({r["id"]: r["meta"]["task"] for r in records})
    value = {"sft": lambda i: 0.0, "dft": lambda i: 1.0 if tasks[i] == "arithmetic" else 0.0}
    for name in value:
        for seed in range(2):
            run = work / "runs" / f"{name}-s{seed}-lr0.0001"
            run.mkdir(parents=True)
            result = {
                "name": name,
                "seed": seed,
                "lr": 1e-4,
                "curve": [[0, 2.0], [10, 1.0]],
                "machine": {"cuda": "GPU X" if seed else None, "cpu_bf16_native": True},
                "items": {i: [value[name](i), 0.5, 1.0] for i in items[seed]},
            }
            (run / "result.json").write_text(json.dumps(result))
    # sft of seed 0 trained again on a GPU: answer exact flips on the first 4 items, CE moves by 0.25 on every item
    again = work / "reruns" / "runs" / "sft-s0-lr0.0001"
    again.mkdir(parents=True)
    again_items = {i: [1.0 if k < 4 else 0.0, 0.5, 1.25] for k, i in enumerate(items[0])}
    (again / "result.json").write_text(
        json.dumps({"name": "sft", "seed": 0, "lr": 1e-4, "machine": {"cuda": "GPU X"}, "items": again_items})
    )
    summary = {
        "metric": "held-out answer exact (teacher-forced) (test half of the items)",
        "margin": 0.03,
        "command": "x",
        "premise": {"answer": {"group_loss": [0.1, 0.9], "holds": True}},
        "methods": {
            "sft": {"seeds": 2, "metric": 0.0, "lr": 1e-4},
            "dft": {
                "seeds": 2,
                "metric": 0.25,
                "lr": 1e-4,
                "verdict": "better",
                "diff_vs_sft": {"mean": 0.25, "ci95": [0.1, 0.4]},
            },
        },
    }
    summary["secondary"] = {
        "response_ce": {
            "sft": {"seeds": 2, "metric": 1.0},
            "dft": {
                "seeds": 2,
                "metric": 0.5,
                "verdict": "better",
                "diff_vs_sft": {"mean": -0.5, "ci95": [-0.6, -0.4]},
            },
        },
        "token_accuracy": {"sft": {"seeds": 2, "metric": 0.5}, "dft": {"seeds": 2, "metric": 0.5}},
    }
    (work / "compare.json").write_text(json.dumps(summary))
    skills_report.main(["--work", str(work), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["methods"]["dft"]["diff_vs_sft"] == {"mean": 0.25, "ci95": [0.1, 0.4]}
    assert saved["methods"]["sft"] == {"seeds": 2, "metric": 0.0, "lr": 1e-4}
    arithmetic = saved["per_task"]["arithmetic"]["dft"]
    n_test = sum(1 for s in items for i in items[s] if tasks[i] == "arithmetic" and not is_validation(i))
    assert arithmetic["diff_vs_sft"]["mean"] == 1.0 and n_test > 0
    assert saved["per_task"]["extraction"]["dft"]["diff_vs_sft"]["mean"] == 0.0
    md = (tmp_path / "QUALITY.md").read_text()
    assert "| dft | 0.0001 | 2 | 0.250 | +0.250 | [+0.100, +0.400] | better |" in md
    assert "| dft | 0.500 | -0.500 [-0.600, -0.400] | better | 0.500 | — | baseline |" in md
    assert saved["per_task_response_ce"]["summarization"]["dft"]["diff_vs_sft"]["mean"] == 0.0
    assert (tmp_path / "quality_curves.png").stat().st_size > 5000
    assert saved["machines"]["by_seed"] == {"0": {"CPU with native bf16": 2}, "1": {"GPU X": 2}}
    assert saved["machines"]["reruns"] == [
        {
            "run": "sft-s0-lr0.0001",
            "cached_on": "CPU with native bf16",
            "rerun_on": "GPU X",
            "items": 16,
            "same_answer_exact": 0.75,
            "answer_exact_diff": 0.25,
            "response_ce_abs_diff": 0.25,
        }
    ]
    assert (
        "| 0 | 2 | 0 |" in md
        and "| sft-s0-lr0.0001 | CPU with native bf16 | GPU X | 16 | 0.750 | +0.250 | 0.250 |" in md
    )


def test_lanes_plan_the_missing_runs_at_the_chosen_lrs(tmp_path):
    """experiments/skills_lanes.py: the runs a seed still lacks, each at the lr the tuning seed chose (lowest
    validation CE), and a rerun of the matched sftgo run first where its cached result cannot give weighted its
    weight."""
    import json

    import skills_lanes
    from compare import is_validation

    ids = [f"item-{k}" for k in range(8)]
    val = [i for i in ids if is_validation(i)]
    assert val

    def write(key: str, ce: float, **extra) -> None:
        (tmp_path / "runs" / key).mkdir(parents=True)
        name, seed, lr = key.rsplit("-s", 1)[0], int(key.rsplit("-s", 1)[1].split("-lr")[0]), float(key.split("-lr")[1])
        (tmp_path / "runs" / key / "result.json").write_text(
            json.dumps({"name": name, "seed": seed, "lr": lr, "items": {i: [0.0, 0.5, ce] for i in ids}, **extra})
        )

    for name, best in (("sft", "0.0003"), ("sftgo-tfidf", "0.0001"), ("weighted", "0.0001")):
        for lr in ("0.0001", "0.0003"):
            write(f"{name}-s0-lr{lr}", 1.0 if lr == best else 2.0)
    write("sftgo-tfidf-s1-lr0.0001", 1.0)  # cached without its ratio or training log
    argv = [
        "--work",
        str(tmp_path),
        "--seeds",
        "0,1,2",
        "--methods",
        "sft,sftgo,weighted",
        "--groups",
        "tfidf",
        "--lams",
        "0.9",
    ]
    _, cargs = skills_lanes.settings(argv)
    lanes = skills_lanes.plan(cargs)
    assert lanes == [
        [
            {"name": "sftgo-tfidf", "seed": 1, "lr": 1e-4, "rerun": True},
            {"name": "sft", "seed": 1, "lr": 3e-4, "rerun": False},
            {"name": "weighted", "seed": 1, "lr": 1e-4, "rerun": False},
        ],
        [
            {"name": "sft", "seed": 2, "lr": 3e-4, "rerun": False},
            {"name": "sftgo-tfidf", "seed": 2, "lr": 1e-4, "rerun": False},
            {"name": "weighted", "seed": 2, "lr": 1e-4, "rerun": False},
        ],
    ]
    write("sftgo-tfidf-s2-lr0.0001", 1.0, group_weight_ratio=3.0)  # a result that keeps its ratio needs no rerun
    assert [j["name"] for j in skills_lanes.plan(cargs)[1]] == ["sft", "weighted"]
    (tmp_path / "runs" / "weighted-s0-lr0.0003" / "result.json").unlink()
    with pytest.raises(SystemExit, match="lr grid is not complete"):
        skills_lanes.plan(cargs)
