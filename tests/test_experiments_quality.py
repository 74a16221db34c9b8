"""The quality experiment's data, metrics and report (experiments/quality_*.py), without training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import quality_data  # noqa: E402
from quality_eval import answer_positions  # noqa: E402
from quality_report import paired, verdict, write_report  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return quality_data.make_data(seed=0, per_kind=3, per_fact=4)


def test_every_fact_is_taught_and_asked_once_differently(data):
    facts = {(q["meta"]["entity"], q["meta"]["attribute"]) for q in data["questions"]}
    assert len(facts) == len(data["questions"]) == len(data["heldout"])
    train_questions = {r["instruction"] for r in data["train"]}
    for q in data["questions"]:
        taught = [
            r
            for r in data["train"]
            if (r["meta"]["entity"], r["meta"]["attribute"]) == (q["meta"]["entity"], q["meta"]["attribute"])
        ]
        assert len(taught) == 4
        assert all(q["meta"]["answer"] in r["output"] for r in taught)  # the value is in every training answer
        assert q["instruction"] not in train_questions  # the held-out phrasing is never trained on
    # no held-out template is one of the training templates of its attribute
    for (kind, attr), template in quality_data.HELDOUT.items():
        assert template not in quality_data.gen.FACTS[kind][attr][0]
    # values from small vocabularies (guessable) are not asked
    assert not {q["meta"]["attribute"] for q in data["questions"]} & {"colour", "diet", "product", "field"}


def test_data_is_deterministic(data):
    assert quality_data.make_data(seed=0, per_kind=3, per_fact=4) == data
    assert quality_data.make_data(seed=1, per_kind=3, per_fact=4)["train"] != data["train"]


def test_exact_match():
    assert quality_data.exact_match("It was designed by  Idris\nPelford.", "Idris Pelford")
    assert quality_data.exact_match("IDRIS PELFORD", "Idris Pelford")
    assert not quality_data.exact_match("It was designed by Idris.", "Idris Pelford")


def test_answer_positions_find_the_value_tokens(tokenizer, data):
    rec = data["heldout"][0]
    msgs = [{"role": "user", "content": rec["instruction"]}, {"role": "assistant", "content": rec["output"]}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = text.index("<|im_start|>assistant")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    mask = [int(s >= start) for s, _ in offsets]
    ans = rec["meta"]["answer"]
    pos = answer_positions(ids, mask, ans, tokenizer)
    assert pos and tokenizer.decode([ids[i] for i in pos]).strip() == ans
    assert answer_positions(ids, [0] * len(ids), ans, tokenizer) == []  # only inside the supervised span


def test_paired_difference_and_verdict():
    a = {0: {"em": 0.5}, 1: {"em": 0.62}, 2: {"em": 0.7}, 3: {"em": 0.9}}  # seed 3 has no partner: ignored
    b = {0: {"em": 0.4}, 1: {"em": 0.5}, 2: {"em": 0.6}}
    d = paired(a, b, "em")  # differences 0.1, 0.12, 0.1: t = 16, p = 0.004
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.32 / 3) and d["std"] == pytest.approx(0.0115470, abs=1e-6)
    assert d["p"] == pytest.approx(0.00388, abs=1e-4)
    assert verdict(d) == "**better than sft, beyond the noise**"
    assert (
        verdict(paired({0: {"em": 0.5}, 1: {"em": 0.7}, 2: {"em": 0.7}}, b, "em")) == "within the noise"
    )  # t = 4, p = 0.057
    assert verdict({"n": 3, "mean": -0.05, "std": 0.1, "p": 0.5}) == "within the noise"
    assert verdict({"n": 3, "mean": -0.2, "std": 0.01, "p": 0.001}) == "**worse than sft, beyond the noise**"


def _result(name, seed, em, study="main", **extra):
    base = {
        "name": f"{name}-s{seed}",
        "seed": seed,
        "study": study,
        "em": em,
        "tf_acc": em,
        "answer_loss": 1 - em,
        "rest_loss": 0.3,
        "ce": 0.4,
        "tokens": 1000,
        "steps": 10,
        "switch_rate": 0.2,
        "worst_is_important": 0.8,
        "grad_norm_median": 2.5,
        "group_loss": {s: [0.3, 0.6] for s in ("tfidf", "reference", "semantic")},
        "train_group_loss": [[1.0, 2.0], [0.5, 0.7]],
        "answers": [{"question": "Q?", "answer": "A", "generated": "A.", "hit": True}],
    }
    base.update(extra)
    return base


def test_report_has_every_section(tmp_path):
    runs = []
    for s in (0, 1, 2):
        runs += [
            _result("sft", s, 0.5 + 0.01 * s),
            _result("sftgo-tfidf", s, 0.4),
            _result("sftgo-oracle", s, 0.6),
            _result("sftgo-tfidf-eta0.1", s, 0.45, "eta"),
            _result("sftgo-tfidf-lam0.5", s, 0.48, "lam"),
        ]
    runs += [_result("sft-lr0.001", 0, 0.3, "lr", lr=1e-3), _result("sftgo-tfidf-lr0.001", 0, 0.35, "lr", lr=1e-3)]
    summary = {
        "settings": {
            "etas": "0.1,0.3",
            "lams": "0,0.5,0.9",
            "lr": 0.0003,
            "warmup": 2,
            "batch_tokens": 1024,
            "epochs": 2.0,
            "per_fact": 4,
        },
        "base": {
            "em": 0.0,
            "answer_loss": 4.6,
            "group_loss": {s: [2.0, 4.0] for s in ("tfidf", "reference", "semantic")},
        },
        "runs": runs,
        "minutes": 1.0,
        "records": {"train": 180, "questions": 45, "heldout": 45},
        "overlap": {
            "tfidf": {"recall": 0.75, "precision": 0.3},
            "reference": {"recall": 0.5, "precision": 0.2},
            "semantic": {"recall": 0.7, "precision": 0.28},
            "answer_share": 0.126,
        },
    }
    write_report(summary, tmp_path)
    md = (tmp_path / "QUALITY.md").read_text()
    for heading in (
        "## Methods",
        "## How well each grouping",
        "## Held-out loss per group",
        "## η sweep",
        "## λ sweep",
        "## Learning-rate check",
        "## Worst-group switches and gradient noise",
        "## Examples",
    ):
        assert heading in md
    assert "| sftgo · tfidf | 0.400 ± 0.000" in md and "**worse than sft, beyond the noise**" in md
    assert "| 0.1 | 0.450 ± 0.000" in md  # the eta sweep row, with eta 0.3 filled in from the main runs
    assert "| 0.0003 | 0.500 ± 0.000 | 0.400 ± 0.000 |" in md  # the lr check's main-rate row: seed 0 only
    assert "| 0.001 | 0.300 ± 0.000 | 0.350 ± 0.000 |" in md
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert [m["method"] for m in saved["methods"]] == ["sft", "sftgo · tfidf", "sftgo · oracle"]
