"""pipeline.formats: every format, field maps, detection, and every rejection reason."""

import json
import pickle

import pytest

from sftgo.pipeline.formats import (
    FORMATS,
    RecordError,
    detect_format,
    mapped_fields,
    parse_field_map,
    record_id,
    to_messages,
)

U, A, S = "user", "assistant", "system"


def m(role, content):
    return {"role": role, "content": content}


def reject(record, fmt="auto", field_map=None) -> RecordError:
    with pytest.raises(RecordError) as e:
        to_messages(record, fmt, field_map)
    assert e.value.detail and e.value.detail.endswith(".") and "\n" not in e.value.detail
    return e.value


# ---------------------------------------------------------------- alpaca
def test_alpaca_basic():
    r = {"instruction": "Name a river.", "input": "", "output": "The Norford River."}
    assert to_messages(r, "alpaca") == [m(U, "Name a river."), m(A, "The Norford River.")]


def test_alpaca_input_appended_after_blank_line_and_system_first():
    r = {"instruction": "Translate.", "input": "the tower", "output": "dhi dufic", "system": "Be brief."}
    assert to_messages(r, "alpaca") == [m(S, "Be brief."), m(U, "Translate.\n\nthe tower"), m(A, "dhi dufic")]


def test_alpaca_null_input_and_blank_system_are_dropped():
    r = {"instruction": "Q", "input": None, "output": "X", "system": "  "}
    assert to_messages(r, "alpaca") == [m(U, "Q"), m(A, "X")]


def test_alpaca_history_becomes_earlier_turns():
    r = {"instruction": "And the third?", "output": "C", "history": [["First?", "A"], ("Second?", "B")]}
    assert to_messages(r, "alpaca") == [
        m(U, "First?"),
        m(A, "A"),
        m(U, "Second?"),
        m(A, "B"),
        m(U, "And the third?"),
        m(A, "C"),
    ]


@pytest.mark.parametrize("history", ["not a list", [["only question"]], [["q", 3]], ["qa"]])
def test_alpaca_bad_history(history):
    e = reject({"instruction": "Q", "output": "A", "history": history}, "alpaca")
    assert e.reason == "wrong_type" and "history" in e.detail


def test_alpaca_empty_history_in_history_rejected():
    e = reject({"instruction": "Q", "output": "A", "history": [["q", "  "]]}, "alpaca")
    assert e.reason == "empty_response"


# ---------------------------------------------------------------- messages
def test_messages_multi_turn_with_system_and_trailing_user():
    msgs = [m(S, "sys"), m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d"), m(U, "unanswered")]
    out = to_messages({"messages": msgs, "extra": 1}, "messages")
    assert out == msgs
    assert all(set(x) == {"role", "content"} for x in out)


def test_messages_extra_keys_dropped_and_input_not_modified():
    turn = {"role": "user", "content": "hi", "name": "x", "weight": 0}
    rec = {"messages": [turn, m(A, "hello")]}
    assert to_messages(rec, "messages") == [m(U, "hi"), m(A, "hello")]
    assert turn == {"role": "user", "content": "hi", "name": "x", "weight": 0}


def test_messages_text_parts_are_joined():
    content = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    out = to_messages({"messages": [m(U, content), m(A, [{"type": "text", "text": "ok"}])]}, "messages")
    assert out == [m(U, "Hello world"), m(A, "ok")]


def test_messages_image_part_is_unsupported_content():
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]
    e = reject({"messages": [m(U, content), m(A, "a cat")]})
    assert e.reason == "unsupported_content" and "image_url" in e.detail


def test_messages_tool_call_without_function_is_missing_field():
    e = reject({"messages": [m(U, "q"), {"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}]})
    assert e.reason == "missing_field" and "tool_calls[0].function" in e.detail


def test_messages_human_role_is_unknown():
    e = reject({"messages": [m("human", "q"), m(A, "a")]}, "messages")
    assert e.reason == "unknown_role" and "human" in e.detail


def test_messages_tool_and_function_roles_are_tool_results():
    out = to_messages(
        {"messages": [m(U, "q"), m("tool", "{}"), {"role": "function", "name": "f", "content": "1"}, m(A, "a")]}, "auto"
    )
    assert out[1:3] == [m("tool", "{}"), {"role": "tool", "content": "1", "name": "f"}]


def test_messages_role_case_is_normalised():
    assert to_messages({"messages": [m("User", "q"), m("ASSISTANT", "a")]}, "messages") == [m(U, "q"), m(A, "a")]


def test_messages_under_conversations_key():
    rec = {"conversations": [m(U, "q"), m(A, "a")]}
    assert detect_format(rec) == "messages"
    assert to_messages(rec, "messages") == [m(U, "q"), m(A, "a")]


# ---------------------------------------------------------------- sharegpt
def test_sharegpt_roles_map():
    conv = [
        {"from": "system", "value": "s"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"},
        {"from": "bot", "value": "a2"},
        {"from": "human", "value": "q3"},
        {"from": "model", "value": "a3"},
        {"from": "human", "value": "q4"},
        {"from": "chatgpt", "value": "a4"},
        {"from": "user", "value": "q5"},
        {"from": "assistant", "value": "a5"},
    ]
    out = to_messages({"conversations": conv}, "sharegpt")
    assert [x["role"] for x in out] == [S] + [U, A] * 5
    assert [x["content"] for x in out] == ["s", "q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4", "q5", "a5"]


@pytest.mark.parametrize("role", ["tool", "ipython"])
def test_sharegpt_roles_outside_the_map_rejected(role):
    conv = [{"from": "human", "value": "q"}, {"from": role, "value": "{}"}, {"from": "gpt", "value": "a"}]
    e = reject({"conversations": conv})
    assert e.reason == "unknown_role" and role in e.detail


def test_sharegpt_under_messages_key_detected():
    rec = {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert detect_format(rec) == "sharegpt"
    assert to_messages(rec, "auto") == [m(U, "q"), m(A, "a")]


# ---------------------------------------------------------------- prompt_completion
def test_prompt_completion_strings():
    assert to_messages({"prompt": "2+2?", "completion": "4"}, "prompt_completion") == [m(U, "2+2?"), m(A, "4")]


def test_prompt_completion_conversational():
    rec = {"prompt": [m(S, "s"), m(U, "q")], "completion": [m(A, "a")]}
    assert to_messages(rec, "auto") == [m(S, "s"), m(U, "q"), m(A, "a")]


def test_prompt_completion_wrong_type():
    e = reject({"prompt": 5, "completion": "x"}, "prompt_completion")
    assert e.reason == "wrong_type" and "'prompt'" in e.detail and "int" in e.detail


# ---------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": [m(U, "q"), m(A, "a")]}, "messages"),
        ({"messages": [], "instruction": "x", "output": "y"}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"conversations": []}, "sharegpt"),
        ({"conversations": [m(U, "q")], "instruction": "x", "output": "y"}, "messages"),
        ({"instruction": "x", "output": "y", "prompt": "p", "completion": "c"}, "alpaca"),
        ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt
    assert fmt in FORMATS


def test_detect_unknown_format():
    with pytest.raises(RecordError) as e:
        detect_format({"question": "q", "answer": "a"})
    assert e.value.reason == "unknown_format" and "question" in e.value.detail


def test_detect_not_an_object():
    with pytest.raises(RecordError) as e:
        detect_format(["a", "b"])
    assert e.value.reason == "not_an_object"


def test_instruction_without_output_is_not_alpaca():
    with pytest.raises(RecordError) as e:
        detect_format({"instruction": "x"})
    assert e.value.reason == "unknown_format"


def test_unknown_format_name_is_a_programming_error():
    with pytest.raises(ValueError, match="Unknown format"):
        to_messages({"prompt": "p", "completion": "c"}, "csv")


# ---------------------------------------------------------------- field maps
def test_field_map_alpaca():
    fm = parse_field_map("instruction=question, output=answer,input=context")
    rec = {"question": "Q", "context": "C", "answer": "A"}
    assert detect_format(rec, fm) == "alpaca"
    assert to_messages(rec, "auto", fm) == [m(U, "Q\n\nC"), m(A, "A")]


def test_field_map_sharegpt_keys():
    fm = parse_field_map("conversations=dialog,from=speaker,value=text")
    rec = {"dialog": [{"speaker": "human", "text": "q"}, {"speaker": "gpt", "text": "a"}]}
    assert detect_format(rec, fm) == "sharegpt"
    assert to_messages(rec, "sharegpt", fm) == [m(U, "q"), m(A, "a")]


def test_field_map_messages_keys():
    fm = {"messages": "chat", "role": "r", "content": "c"}
    rec = {"chat": [{"r": "user", "c": "q"}, {"r": "assistant", "c": "a"}]}
    assert detect_format(rec, fm) == "messages"
    assert to_messages(rec, "messages", fm) == [m(U, "q"), m(A, "a")]


def test_field_map_prompt_completion_missing_names_user_field():
    fm = parse_field_map("prompt=src,completion=tgt")
    e = reject({"src": "p"}, "prompt_completion", fm)
    assert e.reason == "missing_field" and "'tgt'" in e.detail


@pytest.mark.parametrize(
    "record, field_map, found",
    [
        ({"question": "Q", "answer": "A"}, {"instruction": "question", "output": "answer"}, ["instruction", "output"]),
        ({"question": "Q", "output": "A"}, {"instruction": "question", "output": "answr"}, ["instruction"]),  # a typo
        (
            {"dialog": [{"speaker": "human", "text": "q"}]},
            {"conversations": "dialog", "from": "speaker", "value": "txt"},
            ["conversations", "from"],
        ),  # turn fields are looked up inside the turns
        (
            {"src": [{"r": "user", "c": "q"}], "tgt": "a"},
            {"prompt": "src", "role": "r", "content": "c"},
            ["prompt", "role", "content"],
        ),
        ({"r": "user"}, {"role": "r"}, []),  # a turn field at the top of the record is not a turn
        ([1, 2], {"instruction": "q"}, []),
        ({"question": "Q"}, None, []),
    ],
)
def test_mapped_fields(record, field_map, found):
    assert mapped_fields(record, field_map) == found


def test_parse_field_map_empty():
    assert parse_field_map("") == {} and parse_field_map("  ") == {}


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("instruction", "canonical=name"),
        ("instruction=", "canonical=name"),
        ("=question", "canonical=name"),
        ("question=instruction", "unknown field 'question'"),
        ("output=a,output=b", "twice"),
    ],
)
def test_parse_field_map_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_field_map(spec)


# ---------------------------------------------------------------- rejection reasons
def test_reason_not_an_object():
    for fmt in ("auto",) + FORMATS:
        assert reject("a string", fmt).reason == "not_an_object"


def test_reason_missing_field_names_field():
    e = reject({"instruction": "Q"}, "alpaca")
    assert e.reason == "missing_field" and "'output'" in e.detail
    e = reject({"instruction": None, "output": "A"}, "alpaca")
    assert e.reason == "missing_field" and "'instruction'" in e.detail
    e = reject({"messages": [{"content": "q"}]}, "messages")
    assert e.reason == "missing_field" and "messages[0].role" in e.detail
    e = reject({"messages": [{"role": "user"}]}, "messages")
    assert e.reason == "missing_field" and "messages[0].content" in e.detail
    e = reject({"other": 1}, "sharegpt")
    assert e.reason == "missing_field" and "'conversations'" in e.detail


def test_reason_wrong_type_names_field_and_type():
    e = reject({"instruction": "Q", "output": 42}, "alpaca")
    assert e.reason == "wrong_type" and "'output'" in e.detail and "int" in e.detail
    e = reject({"messages": "hello"}, "messages")
    assert e.reason == "wrong_type" and "'messages'" in e.detail and "str" in e.detail
    e = reject({"messages": ["hello"]}, "messages")
    assert e.reason == "wrong_type" and "messages[0]" in e.detail
    e = reject({"conversations": [{"from": 1, "value": "q"}]}, "sharegpt")
    assert e.reason == "wrong_type" and "conversations[0].from" in e.detail
    e = reject({"messages": [m(U, {"text": "x"}), m(A, "a")]}, "messages")
    assert e.reason == "wrong_type" and "dict" in e.detail


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "Q", "output": ""},
        {"instruction": "Q", "output": " \n\t"},
        {"messages": [m(U, "q"), m(A, "a"), m(U, "q2"), m(A, "  ")]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        {"prompt": "p", "completion": ""},
        {"messages": [m(U, "q"), m(A, [])]},
    ],
)
def test_reason_empty_response(record):
    assert reject(record).reason == "empty_response"


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [m(S, "s"), m(U, "q")]},
        {"messages": []},
        {"conversations": [{"from": "human", "value": "q"}]},
        {"prompt": [m(U, "q")], "completion": []},
    ],
)
def test_reason_no_assistant_turn(record):
    assert reject(record).reason == "no_assistant_turn"


def test_reason_misplaced_system():
    e = reject({"messages": [m(U, "q"), m(S, "s"), m(A, "a")]})
    assert e.reason == "misplaced_system" and "1" in e.detail
    e = reject({"prompt": "q", "completion": [m(S, "s"), m(A, "a")]})
    assert e.reason == "misplaced_system"


def test_reason_unknown_format_through_auto():
    assert reject({"text": "raw pretraining text"}).reason == "unknown_format"


def test_record_error_survives_pickling():
    e = pickle.loads(pickle.dumps(RecordError("wrong_type", "Field 'x' must be a string, got int.")))
    assert (e.reason, e.detail, str(e)) == ("wrong_type", "Field 'x' must be a string, got int.", e.detail)
    assert isinstance(e, ValueError)


# ---------------------------------------------------------------- record_id
@pytest.mark.parametrize(
    "record, expected",
    [
        ({"id": "abc"}, "abc"),
        ({"id": 7}, "7"),
        ({"id": ""}, "fb"),
        ({"id": "  "}, "fb"),
        ({"id": None}, "fb"),
        ({"id": True}, "fb"),
        ({"id": 1.5}, "fb"),
        ({"id": ["x"]}, "fb"),
        ({}, "fb"),
        ("not a dict", "fb"),
    ],
)
def test_record_id(record, expected):
    assert record_id(record, "fb") == expected


def test_record_id_numpy_integer():
    np = pytest.importorskip("numpy")
    assert record_id({"id": np.int64(12)}, "fb") == "12"


# ---------------------------------------------------------------- per-turn weight (OpenAI's fine-tuning format)
def test_weight_zero_makes_an_assistant_turn_context():
    out = to_messages(
        {"messages": [m(U, "a"), {**m(A, "b"), "weight": 0}, m(U, "c"), {**m(A, "d"), "weight": 1}]}, "auto"
    )
    assert out == [m(U, "a"), {**m(A, "b"), "train": False, "weight": 0}, m(U, "c"), m(A, "d")]
    assert out.weight_zero == 1
    # null is no weight (a Parquet/datasets column fills it in on every turn); 0 on a user turn is what happens anyway
    out = to_messages({"messages": [{**m(U, "a"), "weight": 0}, {**m(A, "b"), "weight": None}]}, "auto")
    assert out == [m(U, "a"), m(A, "b")] and out.weight_zero == 0
    assert to_messages({"messages": [m(U, "a"), {**m(A, "b"), "weight": 1.0}]}, "auto") == [m(U, "a"), m(A, "b")]


@pytest.mark.parametrize("weight", ["0", "1", 0.5, True, False, -1, 2, float("nan"), [], {}])
def test_weight_other_than_0_or_1_is_invalid(weight):
    e = reject({"messages": [m(U, "a"), {**m(A, "b"), "weight": weight}]})
    assert e.reason == "invalid_weight" and "messages[1]" in e.detail


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{**m(U, "a"), "weight": 1}, m(A, "b")]},  # a user turn is never supervised
        {"messages": [{**m(S, "s"), "weight": 1}, m(U, "a"), m(A, "b")]},
        {"conversations": [{"from": "human", "value": "a", "weight": 1}, {"from": "gpt", "value": "b"}]},
        {
            "prompt": [m(U, "a"), {**m(A, "b"), "weight": 1}, m(U, "c")],
            "completion": [m(A, "d")],
        },  # a prompt is context
    ],
)
def test_weight_one_on_a_turn_never_supervised_is_invalid(record):
    assert reject(record).reason == "invalid_weight"


def test_every_assistant_turn_weight_zero_is_no_assistant_turn():
    e = reject({"messages": [m(U, "a"), {**m(A, "b"), "weight": 0}, m(U, "c"), {**m(A, "d"), "weight": 0}]})
    assert e.reason == "no_assistant_turn" and "weight 0" in e.detail


# ---------------------------------------------------------------- tool calls
CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}


def test_tool_calls_normalised_with_arguments_parsed():
    record = {
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "messages": [
            m(U, "q"),
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "5C"},
            {"role": "assistant", "content": "", "function_call": {"name": "weather", "arguments": {"city": "Rome"}}},
            {"role": "function", "name": "weather", "content": "20C"},
            m(A, "Oslo 5C, Rome 20C."),
        ],
    }
    out = to_messages(record, "auto")
    fn = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}, "id": "c1"}
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [fn]}
    assert out[2] == {"role": "tool", "content": "5C", "tool_call_id": "c1"}
    assert out[3]["tool_calls"] == [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}
    ]
    assert out.tools == record["tools"]


@pytest.mark.parametrize(
    "turn, reason",
    [
        ({"tool_calls": [{**CALL, "function": {"name": "w", "arguments": "{not json"}}]}, "wrong_type"),
        ({"tool_calls": [{**CALL, "function": {"name": "w", "arguments": "[1, 2]"}}]}, "wrong_type"),
        ({"tool_calls": [{**CALL, "function": {"name": "", "arguments": "{}"}}]}, "wrong_type"),
        ({"tool_calls": [{**CALL, "function": {"arguments": "{}"}}]}, "missing_field"),
        ({"function_call": {"name": "w", "arguments": 3}}, "wrong_type"),
        ({"tool_calls": [{**CALL, "type": "code_interpreter"}]}, "unsupported_content"),
        ({"tool_calls": "weather()"}, "wrong_type"),
        ({"tool_calls": [CALL], "function_call": {"name": "w"}}, "unsupported_content"),
    ],
)
def test_bad_tool_calls_are_rejected(turn, reason):
    assert reject({"messages": [m(U, "q"), {"role": "assistant", "content": None, **turn}]}).reason == reason


def test_bad_tools_list_is_wrong_type():
    assert reject({"messages": [m(U, "q"), m(A, "a")], "tools": {"name": "w"}}).reason == "wrong_type"
    assert reject({"messages": [m(U, "q"), m(A, "a")], "tools": ["w"]}).reason == "wrong_type"


# ---------------------------------------------------------------- LLaMA-Factory's ShareGPT tool format
WEATHER_SCHEMA = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


WEATHER_TOOLS = json.dumps([WEATHER_SCHEMA])  # LLaMA-Factory stores "tools" as a JSON string


def lf(*turns, tools=WEATHER_TOOLS):
    """A ShareGPT record in LLaMA-Factory's tool format from (from, value) pairs."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "tools": tools}


def openai_call(city):
    return {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


@pytest.mark.parametrize(
    "record, equivalent",
    [
        (
            lf(
                ("human", "Weather in Paris?"),
                ("function_call", json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})),
                ("observation", '{"temp": 20}'),
                ("gpt", "It is 20 degrees."),
            ),
            {
                "tools": [{"type": "function", "function": WEATHER_SCHEMA}],
                "messages": [
                    m(U, "Weather in Paris?"),
                    {"role": "assistant", "content": None, "tool_calls": [openai_call("Paris")]},
                    m("tool", '{"temp": 20}'),
                    m(A, "It is 20 degrees."),
                ],
            },
        ),
        (  # two parallel calls, a system turn, tools as a list, the role's case
            lf(
                ("system", "Be terse."),
                ("human", "Rome and Paris?"),
                (
                    "Function_Call",
                    json.dumps([{"name": "get_weather", "arguments": {"city": c}} for c in ("Rome", "Paris")]),
                ),
                ("observation", "18"),
                ("observation", "21"),
                ("gpt", "Rome 18, Paris 21."),
                tools=[WEATHER_SCHEMA],
            ),
            {
                "tools": [{"type": "function", "function": WEATHER_SCHEMA}],
                "messages": [
                    m(S, "Be terse."),
                    m(U, "Rome and Paris?"),
                    {"role": "assistant", "content": "", "tool_calls": [openai_call("Rome"), openai_call("Paris")]},
                    m("tool", "18"),
                    m("tool", "21"),
                    m(A, "Rome 18, Paris 21."),
                ],
            },
        ),
    ],
)
def test_llamafactory_tool_record_equals_its_openai_equivalent(record, equivalent):
    out = to_messages(record, "auto")
    assert detect_format(record) == "sharegpt"
    assert out == to_messages(equivalent, "auto")
    assert out.tools == [{"type": "function", "function": WEATHER_SCHEMA}] == to_messages(equivalent, "auto").tools


def test_llamafactory_tool_turn_weights():
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}})
    out = to_messages(
        lf(("human", "Lima?"), ("function_call", call), ("observation", "19"), ("gpt", "19.")), "sharegpt"
    )
    assert [x["role"] for x in out] == [U, A, "tool", A] and out[1]["tool_calls"]
    weighted = lf(("human", "Lima?"), ("function_call", call), ("observation", "19"), ("gpt", "19."))
    weighted["conversations"][1]["weight"] = 0
    out = to_messages(weighted, "auto")
    assert out[1]["train"] is False and out.weight_zero == 1
    weighted["conversations"][2]["weight"] = 1  # a tool result is never supervised
    assert reject(weighted).reason == "invalid_weight"


def test_llamafactory_without_tools_or_empty_tools_has_none():
    call = json.dumps({"name": "get_weather", "arguments": {}})
    for tools in (None, "", " ", "[]", []):
        out = to_messages(
            lf(("human", "q"), ("function_call", call), ("observation", "1"), ("gpt", "a"), tools=tools), "auto"
        )
        assert out.tools is None and out[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {}}


@pytest.mark.parametrize(
    "value, reason, field",
    [
        ("get_weather(city='Paris')", "wrong_type", "conversations[1].value"),  # not JSON
        ("", "wrong_type", "conversations[1].value"),
        (None, "missing_field", "conversations[1].value"),
        ('{"arguments": {"city": "Paris"}}', "missing_field", "conversations[1].value.name"),  # no name
        ('{"name": "", "arguments": {}}', "wrong_type", "conversations[1].value.name"),
        ('{"name": 3, "arguments": {}}', "wrong_type", "conversations[1].value.name"),
        ('{"name": "get_weather", "arguments": [1, 2]}', "wrong_type", "conversations[1].value.arguments"),
        ('{"name": "get_weather", "arguments": "Paris"}', "wrong_type", "conversations[1].value.arguments"),
        ('{"name": "get_weather", "arguments": 7}', "wrong_type", "conversations[1].value.arguments"),
        ('[{"name": "get_weather"}, {"arguments": {}}]', "missing_field", "conversations[1].value[1].name"),
        ('[{"name": "get_weather"}, "get_weather"]', "wrong_type", "conversations[1].value[1]"),
        ("[]", "wrong_type", "conversations[1].value"),
        ('"get_weather"', "wrong_type", "conversations[1].value"),
        ("42", "wrong_type", "conversations[1].value"),
    ],
)
def test_llamafactory_malformed_function_call_is_rejected(value, reason, field):
    e = reject(lf(("human", "q"), ("function_call", value), ("observation", "1"), ("gpt", "a")))
    assert e.reason == reason and f"'{field}'" in e.detail


@pytest.mark.parametrize(
    "tools, field",
    [("[{name: get_weather}]", "tools"), (json.dumps(WEATHER_SCHEMA), "tools"), ('["get_weather"]', "tools[0]")],
)
def test_llamafactory_malformed_tools_is_wrong_type(tools, field):
    call = json.dumps({"name": "get_weather", "arguments": {}})
    e = reject(lf(("human", "q"), ("function_call", call), ("gpt", "a"), tools=tools), "auto")
    assert e.reason == "wrong_type" and f"'{field}'" in e.detail


def test_llamafactory_function_call_turn_with_tool_calls_too_is_unsupported():
    call = json.dumps({"name": "get_weather", "arguments": {}})
    record = lf(("human", "q"), ("function_call", call), ("gpt", "a"))
    record["conversations"][1]["tool_calls"] = [openai_call("Oslo")]
    assert reject(record).reason == "unsupported_content"


def test_function_call_role_only_in_sharegpt():
    e = reject({"messages": [m(U, "q"), m("function_call", '{"name": "w"}'), m(A, "a")]})
    assert e.reason == "unknown_role"


def test_tools_as_a_json_string_or_bare_schemas_in_any_format():
    wrapped = [{"type": "function", "function": WEATHER_SCHEMA}]
    flat = {"type": "function", **WEATHER_SCHEMA}  # the name beside "type", as OpenAI's Responses API writes it
    for tools in (json.dumps(wrapped), [WEATHER_SCHEMA], json.dumps([flat])):
        assert to_messages({"messages": [m(U, "q"), m(A, "a")], "tools": tools}, "auto").tools == wrapped
    other = [{"type": "code_interpreter"}]  # not a function schema: kept as given
    assert to_messages({"messages": [m(U, "q"), m(A, "a")], "tools": other}, "auto").tools == other


# a record-level system prompt beside the turns (LLaMA-Factory's sharegpt `system` column) is never dropped
@pytest.mark.parametrize(
    "record",
    [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": "Be terse."},
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "system": "Be terse.",
        },
    ],
)
def test_a_record_level_system_prompt_is_the_first_turn(record):
    assert list(to_messages(record, "auto")) == [m("system", "Be terse."), m("user", "hi"), m("assistant", "yo")]


def test_a_record_level_system_prompt_equal_to_the_system_turn_counts_once_and_a_different_one_is_rejected():
    turns = [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    same = {"conversations": turns, "system": "Be terse."}
    assert list(to_messages(same, "auto")) == [m("system", "Be terse."), m("user", "hi"), m("assistant", "yo")]
    err = reject({"conversations": turns, "system": "Be long."})
    assert err.reason == "unsupported_content" and "'system'" in err.detail
    assert reject({"conversations": turns[1:], "system": 3}).reason == "wrong_type"
    renamed = {"conversations": turns[1:], "prompt_sys": "Be terse."}
    assert list(to_messages(renamed, "auto", {"system": "prompt_sys"}))[0] == m("system", "Be terse.")
