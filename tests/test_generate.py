"""data/generate.py: determinism, counts, committed files, and that every record normalises."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftgo.pipeline.formats import detect_format, to_messages

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _load_generator():
    spec = importlib.util.spec_from_file_location("sftgo_data_generate", DATA / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _assistant_text(msgs):
    return "\n".join(x["content"] for x in msgs if x["role"] == "assistant")


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_deterministic_and_seed_dependent(kind):
    a, b = gen.generate(200, 3, kind), gen.generate(200, 3, kind)
    assert a == b and len(a) == 200
    assert gen.generate(200, 4, kind) != a
    assert len({r["id"] for r in a}) == 200


def test_cli_writes_both_files_identically_to_the_committed_ones(tmp_path):
    subprocess.run(
        [sys.executable, str(DATA / "generate.py"), "--out", str(tmp_path), "--records", "300", "--seed", "0"],
        check=True,
        capture_output=True,
    )
    for name in ("alpaca.jsonl", "chat.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"data/{name} is stale: regenerate it"


def test_cli_single_format(tmp_path):
    subprocess.run(
        [sys.executable, str(DATA / "generate.py"), "--out", str(tmp_path), "--records", "7", "--format", "chat"],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]
    assert len(_read(tmp_path / "chat.jsonl")) == 7


def test_write_jsonl_roundtrip(tmp_path):
    recs = gen.generate(50, 1, "alpaca")
    gen.write_jsonl(recs, tmp_path / "x.jsonl")
    assert _read(tmp_path / "x.jsonl") == recs


@pytest.mark.parametrize(
    "name, fmt, keys",
    [
        ("alpaca.jsonl", "alpaca", {"id", "instruction", "input", "output", "meta"}),
        ("chat.jsonl", "messages", {"id", "messages", "meta"}),
    ],
)
def test_committed_files_parse_and_normalise(name, fmt, keys):
    recs = _read(DATA / name)
    assert len(recs) == 300
    for r in recs:
        assert set(r) == keys
        assert detect_format(r) == fmt
        msgs = to_messages(r, "auto")
        meta = r["meta"]
        assert {"task", "entity", "attribute", "answer"} <= set(meta)
        assert isinstance(meta["answer"], str) and meta["answer"]
        assert meta["answer"] in _assistant_text(msgs), r["id"]


def test_chat_has_system_and_multi_turn():
    recs = _read(DATA / "chat.jsonl")
    n_system = sum(r["messages"][0]["role"] == "system" for r in recs)
    exchanges = [sum(x["role"] == "assistant" for x in r["messages"]) for r in recs]
    assert 0.2 * len(recs) < n_system < 0.8 * len(recs)
    assert exchanges.count(2) > 10 and exchanges.count(3) > 10 and max(exchanges) == 3
    assert min(exchanges) == 1


def test_variety_of_tasks_and_lengths():
    recs = gen.generate(2000, 0, "alpaca")
    tasks = {r["meta"]["task"] for r in recs}
    assert {"fact_qa", "explain", "list", "arithmetic", "translate", "rewrite_formal", "summarise"} <= tasks
    words = [len(r["output"].split()) for r in recs]
    assert min(words) < 15 and max(words) > 200
    assert 0.1 < sum(r["input"] != "" for r in recs) / len(recs) < 0.5
    boiler = ("I hope this helps", "Let me know if you have", "Sure!", "Here is")
    assert sum(any(b in r["output"] for b in boiler) for r in recs) > 0.2 * len(recs)


def test_facts_are_consistent_across_records():
    # The same (entity, attribute) always has the same answer: a fact can be learnt and checked.
    seen = {}
    for kind in ("alpaca", "chat"):
        for r in gen.generate(3000, 0, kind):
            meta = r["meta"]
            if meta["task"] in ("fact_qa", "rewrite_formal", "summarise"):
                key = (meta["entity"], meta["attribute"])
                assert seen.setdefault(key, meta["answer"]) == meta["answer"]


def test_arithmetic_answers_are_correct():
    for r in gen.generate(1000, 2, "alpaca"):
        if r["meta"]["task"] == "arithmetic":
            assert r["output"].rstrip().split("answer is ")[-1].startswith(r["meta"]["answer"] + ".")


def test_large_corpus_all_records_valid():
    for kind in ("alpaca", "chat"):
        for r in gen.generate(5000, 11, kind):
            to_messages(r, "auto")
