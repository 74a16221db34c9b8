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
