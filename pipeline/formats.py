"""Normalise one raw instruction record into chat messages.

Input: one record (a dict parsed from JSON, JSONL, Parquet, CSV or `datasets`) in one of
FORMATS, plus an optional field map {canonical name: name used in the user's data}.
Output: a Conversation, a list [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...] (an
assistant turn that is context, not a response to learn, also carries "train": False; an assistant turn
that calls tools carries "tool_calls" [{"type": "function", "function": {"name": str, "arguments": dict}}];
a tool result may carry "tool_call_id" and "name") whose `tools` is the record's tool schemas (or None) and
whose `weight_zero` counts its assistant turns with weight 0, or a RecordError
whose `reason` (a short snake_case key) the manifest counts and whose `detail` is one
sentence naming the field at fault.
`mapped_fields()` says which fields of a field map a record has (a build counts them to
refuse a map naming a field that no record has).
Cost: a few dict lookups and one small dict per turn; no copying of the record, no regex.

Formats (auto-detection order: messages > conversations > instruction+output >
prompt+completion):
- alpaca: instruction, optional input (appended after a blank line), output, optional
  system, optional history [[q, a], ...] (LLaMA-Factory) as earlier turns.
- messages: "messages" [{role, content}], content a string or a list of OpenAI-style
  text parts [{"type": "text", "text": ...}] (joined without separator, as chat
  templates render them).  Tool turns as OpenAI writes them: an assistant turn with
  "tool_calls" (or the legacy "function_call"), content null or text; "tool" turns (legacy
  role "function") with the result as content; the record's "tools" list of JSON schemas.
- sharegpt: "conversations" [{from, value}]; from human/user -> user,
  gpt/assistant/bot/model/chatgpt -> assistant, system -> system; a record-level "system" string
  (LLaMA-Factory's column; also beside "messages") is the first turn.  Tool turns as LLaMA-Factory
  writes them: "function_call", whose value is a JSON object {"name", "arguments"} (or a JSON list of
  them, parallel calls), becomes an assistant turn with those "tool_calls" and no text; "observation"
  becomes a tool result.
- prompt_completion: prompt and completion, each a string (user / assistant) or a list
  of messages (TRL's conversational prompt-completion).  As in TRL, only the completion is
  learned: assistant turns inside the prompt are context ("train": False).

Rules for every format: at least one assistant turn to learn, no empty assistant turn (one with tool
calls may have no text), a system turn only first, tool calls only on assistant turns (elsewhere
unsupported_content: dropping them would train on a different conversation); a call's "arguments" is
an object or a JSON string of one (parsed, as chat templates print it with `tojson`).  The record's
"tools" is a list of schemas or a JSON string of one (as LLaMA-Factory and Arrow-typed datasets
store it; empty means none); a bare function schema {"name", ...} is wrapped as {"type": "function",
"function": schema}, the shape chat templates document.  Per-turn "weight" (OpenAI's fine-tuning
format): 1 or absent (null) supervises an assistant turn, 0 makes it context ("train": False); any
other value (true, "0", 0.5), or 1 on a turn that is never supervised (a non-assistant turn, an
assistant turn of a prompt), is invalid_weight; 0 on a non-assistant turn says what happens anyway
and is accepted.
Trailing user turns after the last assistant turn are kept (they are not supervised: loss
masks cover assistant turns only).
"""

from __future__ import annotations

import json
import operator

from sftgo.core.errors import ConfigError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion")

# Canonical field names a field map may rename.
CANONICAL_FIELDS = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "role",
    "content",
    "from",
    "value",
    "tools",
)

# Field-map names that live inside turns rather than at the top of a record.
_TURN_FIELDS = frozenset({"role", "content", "from", "value"})

# LLaMA-Factory's ShareGPT role whose value is the call(s) of an assistant turn, not text.
_CALL_TURN = "function_call"
_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "observation": "tool",
    "function_call": _CALL_TURN,
}
_EMPTY: dict[str, str] = {}


class RecordError(ValueError):
    """A record that cannot become a training sample; `reason` is counted in the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep both fields when sent between Dask workers
        return (RecordError, (self.reason, self.detail))


class Conversation(list):
    """The chat messages of one record, with the record's tool schemas (`tools`, None without) and the
    number of its assistant turns that weight 0 left unsupervised (`weight_zero`)."""

    tools: list[dict] | None = None
    weight_zero: int = 0


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _wrong_type(field: str, expected: str, value) -> RecordError:
    return RecordError("wrong_type", f"Field '{field}' must be {expected}, got {_type_name(value)}.")


def _missing(field: str) -> RecordError:
    return RecordError("missing_field", f"Field '{field}' is missing.")


def _name(fm: dict[str, str], canonical: str) -> str:
    return fm.get(canonical, canonical)


def _is_list(value) -> bool:
    return type(value) is list or type(value) is tuple


def detect_format(record: dict, field_map: dict[str, str] | None = None) -> str:
    """Which of FORMATS the record is in, from its keys (see the module docstring)."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"Record must be a JSON object, got {_type_name(record)}.")
    fm = field_map or _EMPTY
    for key, default in (("messages", "messages"), ("conversations", "sharegpt")):
        turns = record.get(_name(fm, key))
        if turns is not None:
            # The turn keys decide: some datasets put from/value under "messages" and
            # role/content under "conversations".
            if _is_list(turns) and turns and isinstance(turns[0], dict):
                first = turns[0]
                if _name(fm, "from") in first or _name(fm, "value") in first:
                    return "sharegpt"
                if _name(fm, "role") in first or _name(fm, "content") in first:
                    return "messages"
            return default
    if _name(fm, "instruction") in record and _name(fm, "output") in record:
        return "alpaca"
    if _name(fm, "prompt") in record and _name(fm, "completion") in record:
        return "prompt_completion"
    keys = ", ".join(sorted(map(str, record))[:8]) or "none"
    raise RecordError(
        "unknown_format",
        f"Record has none of messages, conversations, instruction+output or prompt+completion (keys: {keys}).",
    )


def to_messages(record: dict, fmt: str, field_map: dict[str, str] | None = None) -> Conversation:
    """The record as chat messages; fmt is one of FORMATS or "auto"."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"Record must be a JSON object, got {_type_name(record)}.")
    fm = field_map or _EMPTY
    if fmt == "auto":
        fmt = detect_format(record, fm)
    if fmt == "alpaca":
        msgs = _alpaca(record, fm)
    elif fmt == "messages":
        msgs = _with_system(
            record, fm, _turns(record, fm, "messages", "conversations", "role", "content", _MESSAGE_ROLES)
        )
    elif fmt == "sharegpt":
        msgs = _with_system(
            record, fm, _turns(record, fm, "conversations", "messages", "from", "value", _SHAREGPT_ROLES)
        )
    elif fmt == "prompt_completion":
        msgs = _prompt_completion(record, fm)
    else:
        raise ConfigError(f"Unknown format {fmt!r}; expected one of {', '.join(FORMATS)} or auto.")
    _validate(msgs)
    out = Conversation(msgs)
    out.tools = _record_tools(record, fm)
    out.weight_zero = sum(m.get("weight") == 0 for m in msgs)
    return out


def _with_system(record: dict, fm: dict[str, str], msgs: list[dict]) -> list[dict]:
    """A record-level system prompt (LLaMA-Factory's `system` column beside `conversations`) as the first turn;
    one that differs from the conversation's own system turn is the record's rejection, never dropped."""
    system = _string_field(record, fm, "system", False)
    if not system.strip():
        return msgs
    if msgs and msgs[0]["role"] == "system":
        if msgs[0]["content"] == system:
            return msgs
        raise RecordError(
            "unsupported_content",
            f"Field '{_name(fm, 'system')}' and the conversation's own system turn differ; keep one of them.",
        )
    return [{"role": "system", "content": system}, *msgs]


def _string_field(record: dict, fm: dict[str, str], canonical: str, required: bool) -> str:
    name = _name(fm, canonical)
    value = record.get(name)
    if type(value) is str:
        return value
    if value is None:
        if required:
            raise _missing(name)
        return ""
    if isinstance(value, str):
        return str(value)
    raise _wrong_type(name, "a string", value)


def _alpaca(record: dict, fm: dict[str, str]) -> list[dict[str, str]]:
    instruction = _string_field(record, fm, "instruction", True)
    output = _string_field(record, fm, "output", True)
    extra = _string_field(record, fm, "input", False)
    system = _string_field(record, fm, "system", False)
    msgs: list[dict[str, str]] = []
    if system.strip():
        msgs.append({"role": "system", "content": system})
    history_name = _name(fm, "history")
    history = record.get(history_name)
    if history is not None:
        if not _is_list(history):
            raise _wrong_type(history_name, "a list of [question, answer] pairs", history)
        for i, pair in enumerate(history):
            if not _is_list(pair) or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
                raise _wrong_type(f"{history_name}[{i}]", "a [question, answer] pair of strings", pair)
            msgs.append({"role": "user", "content": pair[0]})
            msgs.append({"role": "assistant", "content": pair[1]})
    if extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    msgs.append({"role": "user", "content": instruction})
    msgs.append({"role": "assistant", "content": output})
    return msgs


def _turns(record, fm, key, alt_key, role_key, content_key, roles, where=None) -> list[dict[str, str]]:
    """Parse a list of turns from record[key] (or record[alt_key]); `where` overrides the lookup."""
    if where is None:
        name = _name(fm, key)
        turns = record.get(name)
        if turns is None:
            alt = _name(fm, alt_key)
            if record.get(alt) is None:
                raise _missing(name)
            name, turns = alt, record[alt]
    else:
        name, turns = where
    if not _is_list(turns):
        raise _wrong_type(name, "a list of turns", turns)
    role_name = _name(fm, role_key)
    content_name = _name(fm, content_key)
    msgs: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            raise _wrong_type(f"{name}[{i}]", "an object", turn)
        raw_role = turn.get(role_name)
        if type(raw_role) is not str:
            if raw_role is None:
                raise _missing(f"{name}[{i}].{role_name}")
            raise _wrong_type(f"{name}[{i}].{role_name}", "a string", raw_role)
        role = roles.get(raw_role) or roles.get(raw_role.strip().lower())
        if role is None:
            raise RecordError("unknown_role", f"Turn {name}[{i}] has role '{raw_role[:40]}', which is not supported.")
        where_i = f"{name}[{i}]"
        content = turn.get(content_name)
        calls = _tool_calls(turn, where_i) if "tool_calls" in turn or "function_call" in turn else None
        if role == _CALL_TURN:
            if calls:
                raise RecordError("unsupported_content", f"Turn {where_i} is a function_call turn with tool calls.")
            role, calls, content = "assistant", _call_value(content, f"{where_i}.{content_name}"), None
        if calls and role != "assistant":
            raise RecordError("unsupported_content", f"Turn {where_i} is a {role} turn with tool calls.")
        if calls and (content is None or content == []):
            content = ""
        elif type(content) is not str:
            content = _content_parts(content, f"{where_i}.{content_name}")
        msg: dict = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(turn.get(key), str):
                    msg[key] = str(turn[key])
        if turn.get("weight") is not None and _weight(turn["weight"], role, where_i) == 0 and role == "assistant":
            msg["train"] = False
            msg["weight"] = 0
        msgs.append(msg)
    return msgs


def _weight(value, role: str, where: str) -> int:
    """A turn's weight, 0 or 1 (an integer or a float equal to one; not a boolean, a string or NaN)."""
    if type(value) in (int, float) and value in (0, 1):
        if value == 1 and role != "assistant":
            raise RecordError(
                "invalid_weight", f"Turn {where} is a {role} turn with weight 1; only assistant turns are supervised."
            )
        return int(value)
    shown = json.dumps(value)[:40] if type(value) in (str, int, float, bool) else _type_name(value)
    raise RecordError("invalid_weight", f"Turn {where} has weight {shown}; a weight is 0 or 1.")


def _tool_calls(turn: dict, where: str) -> list[dict] | None:
    """The turn's calls, OpenAI's "tool_calls" list or the legacy "function_call" object, as
    [{"type": "function", "function": {"name", "arguments": dict}}] (plus "id" where given); None or
    an empty list is no call."""
    calls, legacy = turn.get("tool_calls"), turn.get("function_call")
    if calls and legacy:
        raise RecordError("unsupported_content", f"Turn {where} holds both 'tool_calls' and 'function_call'.")
    if legacy:
        calls, field = [{"type": "function", "function": legacy}], f"{where}.function_call"
    elif not calls:
        return None
    else:
        field = f"{where}.tool_calls"
        if not _is_list(calls):
            raise _wrong_type(field, "a list of tool calls", calls)
    out = []
    for j, call in enumerate(calls):
        at = f"{field}[{j}]" if not legacy else field
        if type(call) is not dict:
            raise _wrong_type(at, "a tool call object", call)
        kind = call.get("type", "function")
        if kind != "function":
            raise RecordError(
                "unsupported_content", f"Field '{at}' is a '{str(kind)[:40]}' call; only function calls are supported."
            )
        fn = call.get("function")
        if type(fn) is not dict:
            raise _wrong_type(f"{at}.function", "an object", fn) if fn is not None else _missing(f"{at}.function")
        item = {"type": "function", "function": _function(fn, f"{at}.function")}
        if isinstance(call.get("id"), str):
            item["id"] = str(call["id"])
        out.append(item)
    return out


def _function(fn: dict, at: str) -> dict:
    """A called function {"name", "arguments"} as {"name": str, "arguments": dict}; arguments may be a
    JSON string of an object, absent or blank means none."""
    name = fn.get("name")
    if type(name) is not str or not name.strip():
        raise _missing(f"{at}.name") if name is None else _wrong_type(f"{at}.name", "a non-empty string", name)
    args = fn.get("arguments", {})
    if type(args) is str:
        args = _json(args, f"{at}.arguments", "a JSON object") if args.strip() else {}
    if type(args) is not dict:
        raise _wrong_type(f"{at}.arguments", "a JSON object", args)
    return {"name": str(name), "arguments": args}


def _json(text: str, field: str, expected: str):
    """The JSON value a string field holds; text that is not JSON is the field's wrong_type."""
    try:
        return json.loads(text)
    except ValueError:
        raise _wrong_type(field, expected, text) from None


def _call_value(value, field: str) -> list[dict]:
    """A ShareGPT function_call turn's value: a JSON object {"name", "arguments"} or a non-empty JSON
    list of them (the objects themselves also accepted), as tool_calls."""
    expected = "a JSON object with name and arguments, or a list of them"
    if value is None:
        raise _missing(field)
    if isinstance(value, str):
        value = _json(str(value), field, expected)
    single = type(value) is dict
    if single:
        value = [value]
    elif not _is_list(value) or not value:
        raise _wrong_type(field, expected, value)
    calls = []
    for j, fn in enumerate(value):
        at = field if single else f"{field}[{j}]"
        if type(fn) is not dict:
            raise _wrong_type(at, "a JSON object with name and arguments", fn)
        calls.append({"type": "function", "function": _function(fn, at)})
    return calls


def _record_tools(record: dict, fm: dict[str, str]) -> list[dict] | None:
    """The record's "tools", a list of JSON schema objects or a JSON string of one (None when absent,
    null or empty); a bare function schema (a "name", no "function"; also with "type": "function" beside
    the name) is wrapped as {"type": "function", "function": schema}."""
    name = _name(fm, "tools")
    tools = record.get(name)
    if isinstance(tools, str):
        tools = _json(str(tools), name, "a list of tool schemas") if tools.strip() else None
    if tools is None or (_is_list(tools) and not tools):
        return None
    if not _is_list(tools):
        raise _wrong_type(name, "a list of tool schemas", tools)
    out = []
    for j, tool in enumerate(tools):
        if type(tool) is not dict:
            raise _wrong_type(f"{name}[{j}]", "a tool schema object", tool)
        if "function" not in tool and "name" in tool and tool.get("type", "function") == "function":
            tool = {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
        out.append(tool)
    return out


def _content_parts(content, field: str) -> str:
    """OpenAI-style content: a list of parts, of which only text parts are supported."""
    if content is None:
        raise _missing(field)
    if isinstance(content, str):
        return str(content)
    if not _is_list(content):
        raise _wrong_type(field, "a string or a list of text parts", content)
    texts = []
    for j, part in enumerate(content):
        if type(part) is str:
            texts.append(part)
            continue
        if type(part) is not dict:
            raise _wrong_type(f"{field}[{j}]", "a content part object", part)
        kind = part.get("type", "text")
        if kind != "text":
            raise RecordError(
                "unsupported_content",
                f"Field '{field}[{j}]' is a '{str(kind)[:40]}' part; only text parts are supported.",
            )
        text = part.get("text")
        if type(text) is not str:
            raise _wrong_type(f"{field}[{j}].text", "a string", text)
        texts.append(text)
    return "".join(texts)


def _prompt_completion(record: dict, fm: dict[str, str]) -> list[dict]:
    """The prompt's turns then the completion's; an assistant turn of a list prompt is context
    ("train": False): only the completion is learned, as TRL's prompt-completion loss does."""
    msgs: list[dict] = []
    for canonical, role in (("prompt", "user"), ("completion", "assistant")):
        name = _name(fm, canonical)
        value = record.get(name)
        if type(value) is str:
            msgs.append({"role": role, "content": value})
        elif value is None:
            raise _missing(name)
        elif _is_list(value):
            turns = _turns(record, fm, "", "", "role", "content", _MESSAGE_ROLES, where=(name, value))
            if canonical == "prompt":
                for i, turn in enumerate(value):
                    weight = turn.get("weight")
                    if type(weight) in (int, float) and weight == 1 and turns[i]["role"] == "assistant":
                        raise RecordError(
                            "invalid_weight",
                            f"Turn {name}[{i}] has weight 1, but a prompt is context; only the completion is learned.",
                        )
                for m in turns:
                    if m["role"] == "assistant":
                        m["train"] = False
            msgs.extend(turns)
        else:
            raise _wrong_type(name, "a string or a list of messages", value)
    return msgs


def _validate(msgs: list[dict]) -> None:
    has_assistant = False
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "assistant":
            if not m["content"].strip() and not m.get("tool_calls"):
                raise RecordError("empty_response", f"Assistant turn {i} is empty.")
            has_assistant = has_assistant or m.get("train", True)
        elif role == "system" and i:
            raise RecordError("misplaced_system", f"Turn {i} is a system turn; a system turn is allowed only first.")
    if not has_assistant:
        raise RecordError(
            "no_assistant_turn",
            "Record has no assistant turn to learn from (an assistant turn of a prompt or with weight 0 is context).",
        )


def parse_field_map(spec: str) -> dict[str, str]:
    """'instruction=question,output=answer' -> {'instruction': 'question', 'output': 'answer'}."""
    result: dict[str, str] = {}
    if spec is None or not spec.strip():
        return result
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        canonical, sep, name = item.partition("=")
        canonical, name = canonical.strip(), name.strip()
        if not sep or not canonical or not name:
            raise ConfigError(f"Field map entry '{item}' must look like canonical=name, e.g. instruction=question.")
        if canonical not in CANONICAL_FIELDS:
            raise ConfigError(
                f"Field map names unknown field '{canonical}'; known fields: {', '.join(CANONICAL_FIELDS)}."
            )
        if canonical in result:
            raise ConfigError(f"Field map gives field '{canonical}' twice.")
        result[canonical] = name
    return result


def mapped_fields(record, field_map: dict[str, str] | None) -> list[str]:
    """Canonical names of `field_map` whose mapped field the record has: a top-level key for the
    record's fields, a key of a turn (a dict in any list of the record) for role/content/from/value."""
    if type(record) is not dict or not field_map:
        return []
    found = [c for c, name in field_map.items() if c not in _TURN_FIELDS and name in record]
    in_turns = [(c, name) for c, name in field_map.items() if c in _TURN_FIELDS]
    if in_turns:
        keys = {k for v in record.values() if _is_list(v) for turn in v if type(turn) is dict for k in turn}
        found += [c for c, name in in_turns if name in keys]
    return found


def record_id(record: dict, fallback: str) -> str:
    """The record's own id (a non-empty string or an integer) as a string, else fallback."""
    if type(record) is not dict:
        return fallback
    value = record.get("id")
    if type(value) is str:
        return value if value.strip() else fallback
    if type(value) is int or (hasattr(value, "__index__") and not isinstance(value, (bool, float))):
        return str(operator.index(value))  # also numpy integers (pandas-read records)
    return fallback
