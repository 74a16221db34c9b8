"""Hostile formats: data that imitates the chat sentinel, assistant turns inside a prompt, tool calls next
to text, folders with subfolders / upper-case / compressed files, duplicated column and field names, and a
mistyped path.  Each was a silent change of what is trained on (or a network request); each must build
faithfully, be that record's counted rejection, or be one sentence naming the input.  Real functions and
real CLI runs, tiny inputs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.pipeline import readers
from sftgo.pipeline.chat import ChatEncoder
from sftgo.pipeline.formats import RecordError, to_messages

BIN = Path(sys.executable).parent
EOT = "<|im_end|>"
MARK = "\ue000SFTGO"  # the start of chat.py's sentinels
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ChatEncoder(tokenizer, 512)


def supervised(tokenizer, enc) -> list[str]:
    """The decoded maximal runs of supervised tokens."""
    runs, cur = [], []
    for i, m in zip(enc.input_ids.tolist(), enc.loss_mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs + ([tokenizer.decode(cur)] if cur else [])


def plain(msgs: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- 9: the sentinel in data
@pytest.mark.parametrize(
    "conv",
    [
        [u(f"Please repeat: {MARK}0\ue001 thanks"), a(ANSWER)],  # the reported record
        [{"role": "system", "content": f"{MARK}0\ue001"}, u("Capital of France?"), a(ANSWER)],
        [u("Capital of France?"), a(f"{ANSWER} ({MARK}0\ue001)")],  # in the response itself
        [u("q1"), a("First answer."), u(f"{MARK}1\ue001 and {MARK}~1~0\ue001"), a(ANSWER)],  # second turn, two variants
        [u(f"{MARK}"), a(ANSWER)],  # the start alone
    ],
)
def test_sentinel_text_in_data_cannot_move_the_response(tokenizer, encoder, conv):
    enc = encoder.encode_batch([conv])[0]
    assert not isinstance(enc, RecordError), enc
    assert enc.text == tokenizer.apply_chat_template(conv, tokenize=False)  # rendered as written
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert supervised(tokenizer, enc) == [x + EOT for x in answers]
    assert [enc.text[s:e] for s, e in enc.content_spans] == answers


def test_text_full_of_sentinel_variants_is_a_counted_rejection(encoder):
    variants = " ".join([MARK] + [f"{MARK}~{n}~" for n in range(1, 200)])
    out = encoder.encode_batch([[u(variants), a(ANSWER)], [u("ok?"), a(ANSWER)]])
    assert isinstance(out[0], RecordError) and out[0].reason == "sentinel_in_text"
    assert not isinstance(out[1], RecordError)  # the batch lives on


# ---------------------------------------------------------------- 10: prompt_completion supervises the completion
def test_prompt_completion_supervises_only_the_completion(tokenizer, encoder):
    rec = {
        "id": "pc",
        "prompt": [u("What is 2+2?"), a("PROMPT ANSWER five"), u("Are you sure?")],
        "completion": [a("Sorry, it is four.")],
    }
    msgs = to_messages(rec, "auto")
    enc = encoder.encode_batch([msgs])[0]
    assert supervised(tokenizer, enc) == ["Sorry, it is four." + EOT]
    assert enc.text == tokenizer.apply_chat_template(rec["prompt"] + rec["completion"], tokenize=False)
    assert [enc.text[s:e] for s, e in enc.content_spans] == ["Sorry, it is four."]
    # the plain-string form: the prompt is the user turn, the completion the one supervised turn
    enc = encoder.encode_batch([to_messages({"prompt": "What is 2+2?", "completion": "Four."}, "auto")])[0]
    assert supervised(tokenizer, enc) == ["Four." + EOT]
    # an answer only inside the prompt leaves nothing to learn
    with pytest.raises(RecordError) as e:
        to_messages({"prompt": [u("q"), a("context")], "completion": [u("more?")]}, "auto")
    assert e.value.reason == "no_assistant_turn"


# ---------------------------------------------------------------- 11: tool calls are never dropped silently
CALL = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [u("Weather?"), {"role": "assistant", "content": "Let me check.", "tool_calls": CALL}]},
        {
            "messages": [
                u("Weather?"),
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": CALL},
            ]
        },
        {
            "messages": [
                u("Weather?"),
                {"role": "assistant", "content": "One moment.", "function_call": {"name": "weather"}},
            ]
        },
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "ok", "tool_calls": CALL}]},
        {"prompt": [u("q")], "completion": [{"role": "assistant", "content": "Calling.", "tool_calls": CALL}]},
        {"messages": [u("q"), {"role": "tool", "content": "5C"}, a("A.")]},
        {"messages": [u("q"), a("A.")], "tools": [{"type": "function", "function": {"name": "weather"}}]},
    ],
)
def test_tool_records_the_template_cannot_render_are_unsupported_content(tokenizer, record):
    """The embedded SmolLM2 template cannot render tools: such a record is unsupported_content, never
    rendered without its calls, results or schemas."""
    encoder = ChatEncoder(tokenizer, max_length=512)
    assert encoder.call_header is None
    out = encoder.encode_batch([to_messages(record, "auto")])[0]
    assert isinstance(out, RecordError) and out.reason == "unsupported_content"


def test_tool_calls_on_a_non_assistant_turn_are_unsupported_content():
    with pytest.raises(RecordError) as e:
        to_messages({"messages": [{"role": "user", "content": "q", "tool_calls": CALL}, a("A.")]}, "auto")
    assert e.value.reason == "unsupported_content"


def test_empty_tool_call_fields_are_no_calls():
    turn = {"role": "assistant", "content": "A.", "tool_calls": None, "function_call": None}
    assert to_messages({"messages": [u("q"), turn, {**turn, "tool_calls": []}]}, "auto") == [u("q"), a("A."), a("A.")]


# ---------------------------------------------------------------- 12: every file of a folder tree, or a sentence
def rec(i: int) -> dict:
    return {"instruction": f"Question {i}?", "output": f"Answer {i}."}


def write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_folder_reads_subfolders_and_upper_case_extensions(tmp_path, capfd):
    d = tmp_path / "indir"
    write(d / "a.jsonl", [rec(0), rec(1)])
    write(d / "b.JSONL", [rec(2)])
    write(d / "sub" / "d.jsonl", [rec(3)])
    write(d / "sub" / "deep" / "e.Json", [rec(4)])
    pq.write_table(pa.Table.from_pylist([rec(5)]), d / "z.PARQUET")
    write(d / ".cache" / "x.jsonl", [rec(9)])  # hidden: skipped, and said so
    (d / "README.md").write_text("# my data")  # not data: skipped, and said so
    parts = readers.plan([str(d)], 10)
    records = [item.record for p in parts for item in readers.read(p)]
    assert records == [rec(i) for i in range(6)]  # depth first, sorted names
    assert {s for p in parts for s in p.sources} == {str(d)}
    err = capfd.readouterr().err
    assert ".cache" in err and "skipped 1 file(s) of no data format (README.md)" in err


def test_folder_with_a_file_it_cannot_read_is_refused_naming_it(tmp_path, cli):
    d = tmp_path / "indir"
    write(d / "a.jsonl", [rec(0)])
    with gzip.open(d / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(rec(1)) + "\n")
    proc = cli("sftgo-prep", "build", d, "--out", tmp_path / "out", "--workers", "1", check=False)
    assert proc.returncode == 1 and "Wrote" not in proc.stdout
    err = proc.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and "c.jsonl.gz" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------- 13: duplicated column / field names
def test_parquet_with_a_column_twice_is_refused(tmp_path):
    flat = tmp_path / "dup.parquet"
    pq.write_table(
        pa.Table.from_arrays(
            [pa.array(["Q?"]), pa.array(["draft"]), pa.array(["final"])], names=["instruction", "output", "output"]
        ),
        flat,
    )
    with pytest.raises(readers.InputError, match="'output' twice") as e:
        readers.plan([str(flat)], 10)
    assert "\n" not in str(e.value)
    turns = pa.StructArray.from_arrays([pa.array(["user"]), pa.array(["assistant"])], names=["role", "role"])
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"messages": pa.ListArray.from_arrays([0, 1], turns)}), nested)
    with pytest.raises(readers.InputError, match="'messages.role' twice"):
        readers.plan([str(nested)], 10)


def test_json_object_with_a_field_twice_is_that_records_rejection(tmp_path):
    lines = [
        '{"instruction": "Q?", "output": "draft", "output": "final"}',
        '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}',
        json.dumps(rec(0)),
    ]
    for path in (tmp_path / "d.jsonl", tmp_path / "d.json"):
        path.write_text("\n".join(lines) + "\n" if path.suffix == ".jsonl" else "[" + ",\n".join(lines) + "]")
        items = [i for p in readers.plan([str(path)], 10) for i in readers.read(p)]
        assert [i.reject[0] if i.reject else None for i in items] == ["duplicate_key", "duplicate_key", None]
        assert "'output' twice" in items[0].reject[1] and "'role' twice" in items[1].reject[1]
        assert items[2].record == rec(0) and '"final"' in readers.raw_text(items[0])


# ---------------------------------------------------------------- 21: a mistyped path is not a hub request
def test_missing_local_path_is_one_sentence_without_the_network(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # keeps an old behaviour's run short
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "sftgo-prep"), "build", "data/alpaca", "--out", "out_hub"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1 and time.monotonic() - t0 < 60
    err = proc.stderr.strip()
    assert err == "Error: Input data/alpaca does not exist (for a hub dataset write hf:NAME)."
    probe = (
        "import sys\nfrom sftgo.pipeline import readers\ntry:\n    readers.plan(['owner/name'], 10)\n"
        "except readers.InputError as e:\n    print(e)\nprint('datasets' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.splitlines() == ["Input owner/name does not exist (for a hub dataset write hf:NAME).", "False"]


def test_records_without_ids_in_the_files_of_a_folder_get_distinct_ids(tmp_path, cli, dask_scheduler):
    d = tmp_path / "indir"
    write(d / "a.jsonl", [rec(0), rec(1)])
    write(d / "sub" / "b.jsonl", [rec(2)])
    out = tmp_path / "out"
    cli("sftgo-prep", "build", d, "--out", out, "--scheduler", dask_scheduler, "--quiet")
    ids = [i for s in sorted(out.glob("shard-*.parquet")) for i in pq.read_table(s, columns=["id"])["id"].to_pylist()]
    assert ids == ["indir/a.jsonl:0", "indir/a.jsonl:1", "indir/sub/b.jsonl:0"]
    assert json.loads((out / "manifest.json").read_text())["totals"]["duplicate_ids"] == 0


# ---------------------------------------------------------------- tool conversations and weights through the CLI
def test_tool_conversations_build_with_a_template_that_renders_tools(tmp_path, tokenizer, cli, dask_scheduler):
    """With a Qwen2.5 template the tool conversations build with no rejection and the weight-0 turns are
    counted; with the embedded template the same records are unsupported_content."""
    import copy

    from tests.test_chat import QWEN, TOOL_RECORDS

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN
    tok.save_pretrained(tmp_path / "qwen-tok")
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOOL_RECORDS))
    build = ("sftgo-prep", "build", data, "--scheduler", dask_scheduler)
    cli(*build, "--out", tmp_path / "q", "--tokenizer", tmp_path / "qwen-tok")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["totals"]["records_written"] == len(TOOL_RECORDS) and manifest["rejected"] == {}
    assert manifest["totals"]["unsupervised_by_weight"] == 2
    cli(*build, "--out", tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["rejected"] == {"unsupported_content": 3}  # the tool records; the plain one is written
    assert manifest["totals"]["records_written"] == 1 and manifest["totals"]["unsupervised_by_weight"] == 1
