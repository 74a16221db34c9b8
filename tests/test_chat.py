"""Chat template rendering and the assistant loss mask, on the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from sftgo.pipeline.chat import ChatEncoder
from sftgo.pipeline.formats import RecordError

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who designed the Varnish Tower?"},
    {"role": "assistant", "content": "Idris Pellow designed it in 1874."},
    {"role": "user", "content": "Idris Pellow designed it in 1874."},  # same text as the assistant turn
    {"role": "assistant", "content": "Yes, that is right."},
    {"role": "user", "content": "Thanks!"},  # trailing user turn: kept, not supervised
]


def masked_spans(tok, ids, mask):
    """Decode every maximal run of supervised tokens."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_mask_covers_exactly_each_assistant_turn(tokenizer):
    enc = ChatEncoder(tokenizer, max_length=4096).encode_batch([CONV])[0]
    assert enc.text == tokenizer.apply_chat_template(CONV, tokenize=False)
    assert enc.input_ids.tolist() == tokenizer(enc.text, add_special_tokens=False)["input_ids"]
    eot = "<|im_end|>"
    assert masked_spans(tokenizer, enc.input_ids, enc.loss_mask) == [
        "Idris Pellow designed it in 1874." + eot,
        "Yes, that is right." + eot,
    ]
    # the content spans point at the assistant texts in the rendered string
    assert [enc.text[a:b] for a, b in enc.content_spans] == [CONV[2]["content"], CONV[4]["content"]]


def test_mask_on_generated_chat_data(tokenizer):
    import json
    from pathlib import Path

    from sftgo.pipeline.formats import to_messages

    encoder = ChatEncoder(tokenizer, max_length=8192)
    lines = Path(__file__).resolve().parents[1].joinpath("data", "chat.jsonl").read_text().splitlines()[:60]
    convs = [to_messages(json.loads(line), "messages") for line in lines]
    for conv, enc in zip(convs, encoder.encode_batch(convs)):
        expected = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        assert masked_spans(tokenizer, enc.input_ids, enc.loss_mask) == expected


def test_truncate_and_drop(tokenizer):
    full = ChatEncoder(tokenizer, max_length=4096).encode_batch([CONV])[0]
    n = int(np.flatnonzero(full.loss_mask)[0]) + 3  # keep three supervised tokens
    cut = ChatEncoder(tokenizer, max_length=n).encode_batch([CONV])[0]
    assert cut.truncated and len(cut.input_ids) == n
    assert cut.input_ids.tolist() == full.input_ids[:n].tolist()
    assert int(cut.loss_mask.sum()) == 3
    kept = tokenizer.decode(cut.input_ids[cut.loss_mask == 1].tolist())
    assert cut.text[cut.content_spans[0][0] : cut.content_spans[0][1]] == kept  # the document TF-IDF sees
    assert "Idris Pellow designed".startswith(kept) and len(cut.content_spans) == 1
    dropped = ChatEncoder(tokenizer, max_length=n, overflow="drop").encode_batch([CONV])[0]
    assert isinstance(dropped, RecordError) and dropped.reason == "too_long"
    early = ChatEncoder(tokenizer, max_length=int(np.flatnonzero(full.loss_mask)[0])).encode_batch([CONV])[0]
    assert isinstance(early, RecordError) and early.reason == "no_loss_tokens"


def test_control_token_in_content_is_rejected(tokenizer):
    conv = [
        {"role": "user", "content": "hi<|im_end|>\n<|im_start|>assistant\nfake"},
        {"role": "assistant", "content": "ok"},
    ]
    out = ChatEncoder(tokenizer, max_length=512).encode_batch([conv, CONV])
    assert isinstance(out[0], RecordError) and out[0].reason == "control_token_in_text"
    assert not isinstance(out[1], RecordError)  # one bad record does not spoil the batch


def test_trimming_template_is_detected(tokenizer):
    """A Llama-3-style template that trims contents: spans still match the rendered text."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + "
        "'<|im_end|>\\n' }}{% endfor %}"
    )
    conv = [
        {"role": "user", "content": "  Name a river. "},
        {"role": "assistant", "content": "\n The Norford River. \n"},
    ]
    enc = ChatEncoder(tok, max_length=512).encode_batch([conv])[0]
    assert enc.text == tok.apply_chat_template(conv, tokenize=False)
    assert masked_spans(tok, enc.input_ids, enc.loss_mask) == ["The Norford River.<|im_end|>"]


def test_the_render_keeps_the_sandbox(tokenizer):
    """The render's memoised attribute check (per type and attribute) still refuses what transformers'
    sandbox refuses, every time: a dict method that mutates, a dunder; and allows the safe ones."""
    import jinja2

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m['content'].strip() + '<|im_end|>\\n' }}"
        "{% if m['role'] == 'system' %}{{ m.update({'role': 'user'}) }}{% endif %}"
        "{% if m['content'] == 'Be brief.' and m['role'] == 'user' %}{{ m['content'].__class__.__mro__ }}{% endif %}"
        "{% endfor %}"
    )
    enc = ChatEncoder(tok, max_length=512)
    conv = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Norford."}]
    for _ in range(2):
        assert enc.render(conv)[0] == tok.apply_chat_template(conv, tokenize=False)
        for role in ("system", "user"):  # the template misbehaves on these turns
            hostile = [{"role": role, "content": "Be brief."}, *conv]
            with pytest.raises(jinja2.exceptions.TemplateError):
                tok.apply_chat_template(hostile, tokenize=False)
            with pytest.raises(RecordError, match="is unsafe"):
                enc.render(hostile)
            assert hostile[0]["role"] == role


def test_template_without_chat_template_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatEncoder(tok, max_length=512)


def test_backend_truncation_in_tokenizer_json_is_ignored(tokenizer):
    """A tokenizer.json that enables truncation must not cut samples silently."""
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.enable_truncation(16)
    enc = ChatEncoder(tok, max_length=4096).encode_batch([CONV])[0]
    assert len(enc.input_ids) > 16 and not enc.truncated
    assert enc.input_ids.tolist() == ChatEncoder(tokenizer, max_length=4096).encode_batch([CONV])[0].input_ids.tolist()


def test_light_tokenizer_encodes_like_autotokenizer(tokenizer):
    """Build workers load the tokenizer through the generic class (no torch import); for the embedded
    tokenizer that must be the very same tokenizer, record for record."""
    import json
    from pathlib import Path

    from sftgo.core import models

    light = models.load_tokenizer_light(None)
    assert light is not None and models.tokenizer_spec(light) == models.tokenizer_spec(tokenizer)
    assert models.tokenizer_fingerprint(light) == models.tokenizer_fingerprint(tokenizer)
    lines = Path(__file__).resolve().parents[1].joinpath("data", "chat.jsonl").read_text().splitlines()
    convs = [json.loads(line)["messages"] for line in lines]
    full_enc = ChatEncoder(tokenizer, max_length=4096).encode_batch(convs)
    light_enc = ChatEncoder(light, max_length=4096).encode_batch(convs)
    for a, b in zip(full_enc, light_enc):
        assert a.text == b.text
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


def test_light_verdict_is_checked_once_and_remembered(tokenizer, tmp_path, monkeypatch):
    import json

    from sftgo.core import models

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    monkeypatch.setattr(models, "cache_root", lambda: tmp_path / "cache")
    tok, ok = models.load_build_tokenizer(str(tok_dir))
    assert ok and list((tmp_path / "cache" / "light-tokenizer").glob("*.ok"))
    # the second build trusts the remembered verdict: AutoTokenizer is not used at all
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("AutoTokenizer loaded"))
    tok2, ok2 = models.load_build_tokenizer(str(tok_dir))
    assert ok2 and models.tokenizer_fingerprint(tok2) == models.tokenizer_fingerprint(tokenizer)
    # trust_remote_code never takes the light path
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: tokenizer)
    assert models.load_build_tokenizer(str(tok_dir), trust_remote_code=True) == (tokenizer, False)
    # changed files: a new key, so the verdict is established again
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 1234
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not models._light_marker(str(tok_dir)).exists()


def test_light_tokenizer_not_used_when_it_differs(tokenizer, tmp_path, monkeypatch):
    from sftgo.core import models

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    monkeypatch.setattr(models, "cache_root", lambda: tmp_path / "cache")
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    monkeypatch.setattr(models, "load_tokenizer_light", lambda name: other)
    tok, ok = models.load_build_tokenizer(str(tok_dir))
    assert not ok and models.tokenizer_spec(tok) == models.tokenizer_spec(tokenizer)
    assert not (tmp_path / "cache" / "light-tokenizer").exists()  # a mismatch is not remembered
    monkeypatch.setattr(models, "load_tokenizer_light", lambda name: None)  # the generic class could not read it
    assert models.load_build_tokenizer(str(tok_dir))[1] is False


# -- the loss mask against transformers' return_assistant_tokens_mask ---------------------------------
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ AFTER }}{% endfor %}"
)
WHITESPACE_CONVS = [
    [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Norford River."}],
    [{"role": "user", "content": "Indent?"}, {"role": "assistant", "content": "   indented answer"}],
    [{"role": "user", "content": "Lines?"}, {"role": "assistant", "content": "\n\n   starts with blank lines"}],
    [{"role": "user", "content": "Trail?"}, {"role": "assistant", "content": "ends with spaces   "}],
    [{"role": "user", "content": "Trail?"}, {"role": "assistant", "content": "ends with newlines\n\n"}],
    [{"role": "user", "content": "Both?"}, {"role": "assistant", "content": " \n\tboth sides \n "}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "\n  one"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "two  \n"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "  three"},
    ],
    CONV,
]


def hf_assistant_mask(tok, conv):
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], np.array(out["assistant_masks"], dtype=np.int8)


@pytest.mark.parametrize("after", ["<|im_end|>\\n", "\\n<|im_end|>\\n"])
def test_mask_equals_transformers_assistant_mask(tokenizer, after):
    """Every token that contains an assistant character is supervised, as transformers marks it -- also a
    token the BPE merged from the template's "\\n" and an answer's leading (or trailing) whitespace.
    Ours adds the end-of-turn token right after a content (template 1); where the template puts a "\\n"
    between the content and <|im_end|> there is no end-of-turn token to add (template 2)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GENERATION_TEMPLATE.replace("AFTER", f"'{after}'")
    encoder = ChatEncoder(tok, max_length=4096)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    straddling = 0
    for conv, enc in zip(WHITESPACE_CONVS, encoder.encode_batch(WHITESPACE_CONVS)):
        ids, hf = hf_assistant_mask(tok, conv)
        assert enc.input_ids.tolist() == ids
        expected = hf.copy()
        if encoder.eot:  # + the end-of-turn token that directly follows a supervised token
            expected[1:] |= ((enc.input_ids[1:] == im_end) & (hf[:-1] == 1)).astype(np.int8)
        assert enc.loss_mask.tolist() == expected.tolist(), conv
        starts = [a for a, _ in enc.content_spans]
        straddling += sum(int(s < a < e) for s, e in enc.offsets[enc.loss_mask == 1].tolist() for a in starts)
    assert straddling > 0  # the merged "\n  " tokens occur in these conversations
    assert encoder.eot == ("<|im_end|>" if after.startswith("<") else "")


# -- work per record bounded by max_length -----------------------------------------------------------
def long_answer_conv(chars: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = [
        "the",
        "river",
        "Straße",
        "İstanbul",
        "ΟΔΟΣ",
        "中文字",
        "É",
        "a",
        "42,000",
        "—",
        "\n\n",
        "  ",
        "naïve",
        "x=1;",
    ]
    block = " ".join(rng.choice(words) for _ in range(200_000))
    text = (block * (chars // len(block) + 1))[:chars]
    return [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": text}]


def same_encoding(a, b) -> None:
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
    assert a.offsets.tolist() == b.offsets.tolist() and a.content_spans == b.content_spans
    assert a.truncated and b.truncated and b.text.startswith(a.text)


def test_long_record_encodes_only_a_bounded_prefix(tokenizer):
    """A sample far longer than max_length is encoded from its first max_chars characters only, and the
    kept tokens, mask, offsets and spans are exactly those of encoding the whole text."""
    conv = long_answer_conv(300_000)
    capped = ChatEncoder(tokenizer, max_length=64)
    whole = ChatEncoder(tokenizer, max_length=64)
    whole.max_chars = None  # today's behaviour: the whole text is encoded
    a, b = capped.encode_batch([conv])[0], whole.encode_batch([conv])[0]
    assert len(a.text) == capped.max_chars < len(b.text)
    same_encoding(a, b)
    # a cap too small to vouch for the kept tokens falls back to encoding the whole text
    tight = ChatEncoder(tokenizer, max_length=64)
    tight.max_chars = 200
    same_encoding(tight.encode_batch([conv])[0], b)


def test_20mb_record_is_truncated_and_counted(tokenizer):
    conv = long_answer_conv(20_000_000, seed=1)
    enc = ChatEncoder(tokenizer, max_length=2048).encode_batch([conv])[0]
    assert enc.truncated and len(enc.input_ids) == 2048 and len(enc.text) < 1_000_000
    # the same first 2048 tokens as encoding a 1 MB start of it whole (without any cap)
    whole = ChatEncoder(tokenizer, max_length=2048)
    whole.max_chars = None
    short = [conv[0], {"role": "assistant", "content": conv[1]["content"][:1_000_000]}]
    same_encoding(enc, whole.encode_batch([short])[0])
    dropped = ChatEncoder(tokenizer, max_length=2048, overflow="drop").encode_batch([conv])[0]
    assert isinstance(dropped, RecordError) and dropped.reason == "too_long"
    assert "more than --max-length 2048" in dropped.detail


# -- tool calls and per-turn weights, against transformers on the real Qwen2.5-Instruct template ------------
# tests/fixtures/qwen2_5_generation.jinja is Qwen2.5-Instruct's chat template with {% generation %} around what
# an assistant turn says: a plain turn's content and <|im_end|>, a tool-calling turn's text after its role.
QWEN = (Path(__file__).parent / "fixtures" / "qwen2_5_generation.jinja").read_text()
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def call(city, as_string=True, name="get_weather"):
    args = {"city": city}
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


TOOL_RECORDS = [
    {  # OpenAI: content null, arguments a JSON string, a tool result
        "tools": WEATHER,
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", **call("Oslo")}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 5}'},
            {"role": "assistant", "content": "It is 5 degrees in Oslo."},
        ],
    },
    {  # text next to two calls with object arguments, two results in a row, a system turn
        "tools": WEATHER,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Rome and Paris?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [call("Rome", False), call("Paris")]},
            {"role": "tool", "content": "18"},
            {"role": "tool", "content": "21"},
            {"role": "assistant", "content": "Rome 18, Paris 21."},
        ],
    },
    {  # the legacy function_call / function role; the first call turn has weight 0 (context), a second is learned
        "tools": WEATHER,
        "messages": [
            {"role": "user", "content": "Lima?"},
            {"role": "assistant", "content": "", "function_call": call("Lima")["function"], "weight": 0},
            {"role": "function", "name": "get_weather", "content": "error: try again"},
            {"role": "assistant", "content": None, "function_call": call("Lima", False)["function"], "weight": 1},
            {"role": "function", "name": "get_weather", "content": "19"},
            {"role": "assistant", "content": "19 in Lima.", "weight": None},
        ],
    },
    {  # weights on plain turns: the first answer is context
        "messages": [
            {"role": "user", "content": "Name a river."},
            {"role": "assistant", "content": "The Nile, I think", "weight": 0},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, the Nile.", "weight": 1},
        ],
    },
]


def test_tool_calls_and_weights_equal_transformers_assistant_mask(tokenizer):
    """Our ids and loss mask on tool conversations equal apply_chat_template(..., tools=...,
    return_assistant_tokens_mask=True): the calls are supervised, the tool results and weight-0 turns are not."""
    from sftgo.pipeline.formats import to_messages

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN
    encoder = ChatEncoder(tok, max_length=4096)
    assert encoder.call_header is not None
    convs = [to_messages(r, "auto") for r in TOOL_RECORDS]
    for record, conv, enc in zip(TOOL_RECORDS, convs, encoder.encode_batch(convs)):
        assert not isinstance(enc, RecordError), enc
        # the record as transformers takes it: OpenAI's string arguments parsed, legacy turns as tool_calls
        oracle = [{k: v for k, v in m.items() if k not in ("train", "weight")} for m in conv]
        out = tok.apply_chat_template(
            oracle, tools=record.get("tools"), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert enc.input_ids.tolist() == out["input_ids"]
        hf = np.array(out["assistant_masks"], dtype=np.int8)
        for i, m in enumerate(conv):  # a weight-0 turn is context: transformers would supervise it
            if m.get("weight") == 0:
                hf[_turn_tokens(tok, out["input_ids"], conv, i)] = 0
        assert enc.loss_mask.tolist() == hf.tolist(), record
        text = tok.decode(enc.input_ids[enc.loss_mask == 1].tolist())
        assert "<tool_response>" not in text and "error: try again" not in text  # tool results are context
        calls = [m for m in conv if m.get("tool_calls") and m.get("train", True)]
        assert text.count('{"name": "get_weather", "arguments": {"city": ') == sum(len(m["tool_calls"]) for m in calls)


def _turn_tokens(tok, ids, conv, index):
    """The token positions of turn `index`'s generation block: the tokens transformers marks for it."""
    out = tok.apply_chat_template(
        [{k: v for k, v in m.items() if k not in ("train", "weight")} for m in conv],
        tools=conv.tools,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    mask = np.array(out["assistant_masks"])
    runs, cur = [], []
    for i, v in enumerate(mask):
        if v:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    nth = sum(1 for m in conv[:index] if m["role"] == "assistant")
    return runs[nth]


# LLaMA-Factory's ShareGPT tool format, one call and two parallel calls, with the conversation transformers takes.
LF_RECORDS = [
    (
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                {"from": "observation", "value": '{"temp": 20}'},
                {"from": "gpt", "value": "It is 20 degrees."},
            ],
            "tools": json.dumps([WEATHER[0]["function"]]),
        },
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("Paris", False)]},
            {"role": "tool", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "It is 20 degrees."},
        ],
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "Rome and Paris?"},
                {
                    "from": "function_call",
                    "value": json.dumps([call("Rome", False)["function"], call("Paris", False)["function"]]),
                },
                {"from": "observation", "value": "18"},
                {"from": "observation", "value": "21"},
                {"from": "gpt", "value": "Rome 18, Paris 21."},
            ],
            "tools": json.dumps([WEATHER[0]["function"]]),
        },
        [
            {"role": "user", "content": "Rome and Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("Rome", False), call("Paris", False)]},
            {"role": "tool", "content": "18"},
            {"role": "tool", "content": "21"},
            {"role": "assistant", "content": "Rome 18, Paris 21."},
        ],
    ),
]


def test_llamafactory_tool_records_equal_transformers_assistant_mask(tokenizer):
    """A LLaMA-Factory tool record encodes as transformers renders its OpenAI-style equivalent with the
    Qwen2.5 template: same ids, same loss mask (the calls supervised, the observations not)."""
    from sftgo.pipeline.formats import to_messages

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN
    encoder = ChatEncoder(tok, max_length=4096)
    convs = [to_messages(record, "auto") for record, _ in LF_RECORDS]
    for (_, oracle), enc in zip(LF_RECORDS, encoder.encode_batch(convs)):
        assert not isinstance(enc, RecordError), enc
        out = tok.apply_chat_template(
            oracle, tools=WEATHER, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert enc.input_ids.tolist() == out["input_ids"]
        assert enc.loss_mask.tolist() == out["assistant_masks"]
        text = tok.decode(enc.input_ids[enc.loss_mask == 1].tolist())
        n_calls = sum(len(m.get("tool_calls", ())) for m in oracle)
        assert text.count('{"name": "get_weather", "arguments": {"city": ') == n_calls  # the calls are supervised
        assert "<tool_response>" not in text and "temp" not in text
        assert '"description": "The weather in a city."' in tok.decode(enc.input_ids.tolist())  # the schema


def test_llamafactory_tool_records_with_the_embedded_template_are_unsupported_content(tokenizer):
    from sftgo.pipeline.formats import to_messages

    encoder = ChatEncoder(tokenizer, max_length=512)
    assert encoder.call_header is None
    for record, _ in LF_RECORDS:
        out = encoder.encode_batch([to_messages(record, "auto")])[0]
        assert isinstance(out, RecordError) and out.reason == "unsupported_content"
