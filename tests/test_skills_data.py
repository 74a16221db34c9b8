"""experiments/skills_data.py: answers computed from the inputs, held-out phrasings never trained on,
new entities and numbers in a held-out world, and determinism by seed."""
from __future__ import annotations

import re
import sys
from pathlib import Path

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
            result = {"name": name, "seed": seed, "lr": 1e-4, "curve": [[0, 2.0], [10, 1.0]],
                      "items": {i: [value[name](i), 0.5, 1.0] for i in items[seed]}}
            (run / "result.json").write_text(json.dumps(result))
    summary = {"metric": "held-out answer exact (teacher-forced) (test half of the items)", "margin": 0.03, "command": "x",
               "premise": {"answer": {"group_loss": [0.1, 0.9], "holds": True}},
               "methods": {"sft": {"seeds": 2, "metric": 0.0, "lr": 1e-4},
                           "dft": {"seeds": 2, "metric": 0.25, "lr": 1e-4, "verdict": "better",
                                   "diff_vs_sft": {"mean": 0.25, "ci95": [0.1, 0.4]}}}}
    summary["secondary"] = {"response_ce": {"sft": {"seeds": 2, "metric": 1.0},
                                            "dft": {"seeds": 2, "metric": 0.5, "verdict": "better",
                                                    "diff_vs_sft": {"mean": -0.5, "ci95": [-0.6, -0.4]}}},
                            "token_accuracy": {"sft": {"seeds": 2, "metric": 0.5}, "dft": {"seeds": 2, "metric": 0.5}}}
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
