"""Render conversations with the tokenizer's chat template, tokenize, mark assistant tokens.

Input: conversations (lists of {"role", "content"}, formats.Conversation; an assistant turn with "train": False is
context, rendered but not supervised; tool calls, tool results and the conversation's `tools` are passed to the
template) and a fast tokenizer with a chat template.
Output: per conversation an Encoded (input_ids int32, loss_mask int8, token character
offsets, the rendered text and the character spans of the assistant turns), or a
RecordError (too long, nothing supervised after truncation, template failure).
Cost: one template render per conversation (assistant contents are swapped for
sentinels so their positions are exact even when the same text occurs twice; a sentinel's start is
one that no text of the conversation holds, so data cannot imitate one) and one
batched Rust tokenizer call per batch; both linear in text length.  For byte-level BPE tokenizers the
token offsets are derived from the ids (fastencode.py), which saves a fifth of the encoding time.  The tokenizer sees
at most max_chars characters of a sample (2 x max_length x the longest token + 4096):
a sample longer than that has more than max_length tokens, so only its start is
encoded -- the kept tokens are the ones a whole encoding gives (checked: they must end in
the first half of the encoded characters, else the whole text is encoded).

Supervised tokens are every token that contains an assistant character (also a token the
byte-level BPE merged from the template's "\n" and an answer's leading whitespace, as
transformers' return_assistant_tokens_mask marks it) plus the template's end-of-turn
token (e.g. `<|im_end|>`), so the model learns to stop -- what TRL's assistant-only loss does.  Of an
assistant turn with tool calls, everything the template renders after the turn's header (its text and its
calls, e.g. Qwen2.5's `\n<tool_call>...</tool_call>`) up to and with the end-of-turn token is supervised; tool
results are context.  Whether the template can render tools is probed once (a render of one and of two probe
calls, with a tool result and a tool schema): a template that fails, drops any of them, or ends turns with no
end-of-turn token makes every record with tools unsupported_content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from jinja2.runtime import new_context

from sftgo.core.errors import ConfigError
from sftgo.pipeline import fastencode
from sftgo.pipeline.formats import RecordError

# An assistant content is swapped for a sentinel, _MARK + its number + _END (private-use code points:
# never produced by templates).  A text that holds the sentinel's start gets another one (_sentinel_start).
_MARK, _END = "\ue000SFTGO", "\ue001"
_MARK_TRIES = 64  # other sentinel starts tried before a text full of them is rejected
_PROBE = "sftgoprobe"
_PROBE_CALLS = ("sftgoprobecalla", "sftgoprobecallb")  # same length: the second call's render is the first's, renamed
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "sftgoprobeschema",
            "description": "Probe.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
]


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # int8 [T]
    offsets: np.ndarray  # int32 [T, 2] character span of each token in `text`
    text: str  # the chat-rendered sample (its first max_chars characters when only those were encoded)
    content_spans: list[tuple[int, int]]  # assistant contents in `text` (without end-of-turn), truncated
    truncated: bool


def _memo_safe_attribute(check):
    """jinja2's SandboxedEnvironment.is_safe_attribute(obj, attr, value), remembered per (type(obj), attr).
    Exact for jinja2's own checks (ImmutableSandboxedEnvironment): they read the attribute's name and
    isinstance of obj against fixed types, never the value."""
    known: dict = {}

    def is_safe_attribute(obj, attr, value) -> bool:
        key = (type(obj), attr)
        safe = known.get(key)
        if safe is None:
            safe = known[key] = bool(check(obj, attr, value))
        return safe

    return is_safe_attribute


class ChatEncoder:
    """Chat template + tokenizer + assistant mask, configured once per tokenizer."""

    def __init__(self, tokenizer, max_length: int, overflow: str = "truncate"):
        if not tokenizer.chat_template:
            raise ConfigError("The tokenizer has no chat template; choose a chat/instruct tokenizer with --tokenizer.")
        from tokenizers import Tokenizer
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tok = tokenizer
        # A private copy without the truncation/padding some tokenizer.json files switch on: those
        # would cut samples silently; max_length is applied below, and counted.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self._fast = fastencode.plan(self.backend)  # ids -> offsets for byte-level BPE (None: ask the encoder)
        self.max_length = max_length
        self.overflow = overflow
        # Render with the compiled template directly: apply_chat_template's per-call normalisation
        # costs about as much as the render itself.  Same variables as transformers passes.
        # It is compiled again in an overlay of transformers' sandboxed environment (same class, filters,
        # globals and extensions) whose attribute check is memoised per (type, attribute): the sandbox's
        # check depends on nothing else, and it ran on every attribute a template reads (a tenth of a render).
        env = _compile_jinja_template(tokenizer.chat_template).environment.overlay()
        env.is_safe_attribute = _memo_safe_attribute(env.is_safe_attribute)
        self._template = env.from_string(tokenizer.chat_template)
        self._variables = {**tokenizer.special_tokens_map, "add_generation_prompt": False}
        # Template.render copies the template's globals, a ChainMap, into every context: a third of a
        # render.  The same context is built here from one flat copy made now (they do not change).
        self._globals = dict(self._template.globals)
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        if self._render(probe) != tokenizer.apply_chat_template(probe, tokenize=False):
            self._render = lambda messages, tools=None: tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False
            )
        # Control tokens typed inside a message would be parsed as real ones (prompt injection into the
        # turn structure); such records are rejected.
        specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]
        self._control = (
            re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        )
        self.trims, self.eot = self._probe_template()
        self.call_header = self._probe_tools()  # None: the template cannot render tool calls
        # characters encoded per sample at most (None: all).  A token covers at most as many characters as its
        # vocabulary string has (a byte-level string has one per byte), so max_length tokens lie in the first half.
        longest = max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)
        self.max_chars: int | None = 2 * max_length * max(longest, 1) + 4096

    def _render(self, messages, tools=None) -> str:
        """Template.render(messages=..., tools=..., **variables), without its per-call copy of the globals."""
        t = self._template
        variables = dict(self._variables, messages=messages, tools=tools, documents=None)
        context = new_context(t.environment, t.name, t.blocks, variables, False, self._globals)
        return t.environment.concat(t.root_render_func(context))

    def _probe_template(self) -> tuple[bool, str]:
        """Learn whether the template trims contents and which special token ends a turn."""
        raw = f" \n{_PROBE}\n "
        text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": raw}])
        trims = raw not in text
        if _PROBE not in text:
            raise ConfigError("The chat template drops assistant contents; sftgo cannot locate the responses.")
        after = text[text.index(_PROBE) + len(_PROBE) + (0 if trims else 2) :]
        specials = sorted(self.tok.get_added_vocab(), key=len, reverse=True)
        eot = next((s for s in specials if s and after.startswith(s)), "")
        return trims, eot

    def _probe_tools(self) -> str | None:
        """The text the template puts between the end of the previous turn and a tool-calling assistant turn's
        own text (e.g. Qwen2.5's "\\n<|im_start|>assistant"), or None when it cannot render tools.  Learned from
        renders with one and with two probe calls: the second call's render is the text inserted between
        them, and the first call's render is the same text just before it."""
        if not self.eot:
            return None

        def render(names):
            calls = [{"type": "function", "function": {"name": n, "arguments": {"q": "x"}}} for n in names]
            conv = [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "sftgoproberesult"},
                {"role": "assistant", "content": "ok"},
            ]
            return self._render(conv, _PROBE_TOOLS)

        try:
            one, two = render(_PROBE_CALLS[:1]), render(_PROBE_CALLS)
        except Exception:  # a template that refuses tool turns
            return None
        shown = all(s in one for s in (_PROBE_CALLS[0], "sftgoproberesult", "sftgoprobeschema"))
        p = next((i for i, (x, y) in enumerate(zip(one, two)) if x != y), len(one))
        size = len(two) - len(one)
        inserted = two[p : p + size]
        same = size > 0 and two == one[:p] + inserted + one[p:] and p >= size
        if not (shown and same and one[p - size : p] == inserted.replace(*reversed(_PROBE_CALLS))):
            return None
        turn = p - size  # where the first call's render starts
        ends = one.rfind(self.eot, 0, turn)
        header = one[ends + len(self.eot) if ends >= 0 else 0 : turn]
        return header if header and self.eot in one[p:] else None

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and the (start, end) of every supervised assistant turn's text in it (an assistant
        turn with "train": False is rendered as it is, as context; of a turn with tool calls, the text after
        its header up to its end-of-turn token).  The sentinels that stand for the contents (and mark the
        calls' names) start with a string no text of the conversation holds, and the rendered template must
        hold each exactly once: a text cannot move a response."""
        texts = _texts(messages, tools)
        control = self._control
        if control is not None:
            for text in texts:
                found = control.search(text)
                if found:
                    raise RecordError("control_token_in_text", f"a text contains the control token {found.group()!r}")
        with_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if with_tools and self.call_header is None:
            raise RecordError(
                "unsupported_content",
                "the tokenizer's chat template cannot render tool calls, tool results or tools; "
                "choose one that can with --tokenizer",
            )
        start = _sentinel_start(texts)
        contents, swapped, calls_at = [], [], []  # calls_at: the sentinels marking each turn's call names
        expected = []  # the sentinels' keys in the order they must appear
        for m in messages:
            if m["role"] == "assistant" and m.get("train", True):
                mark = f"{start}{len(contents)}{_END}"
                calls = m.get("tool_calls")
                if not calls:
                    swapped.append({"role": "assistant", "content": mark})
                    calls_at.append([])
                    expected.append(f"{len(contents)}")
                else:
                    names = [f"{start}{len(contents)}.{j}{_END}" for j in range(len(calls))]
                    renamed = [
                        {**c, "function": {**c["function"], "name": n + c["function"]["name"]}}
                        for n, c in zip(names, calls)
                    ]
                    swapped.append(
                        {"role": "assistant", "content": mark if m["content"] else "", "tool_calls": renamed}
                    )
                    calls_at.append(names)
                    expected.extend(
                        ([f"{len(contents)}"] if m["content"] else []) + [n[len(start) : -len(_END)] for n in names]
                    )
                contents.append(m["content"].strip() if self.trims else m["content"])
            else:
                swapped.append({k: v for k, v in m.items() if k not in ("train", "weight")})
        try:
            template = self._render(swapped, tools)
        except Exception as exc:  # jinja raises for conversations a template refuses (e.g. role order)
            raise RecordError("template_error", f"the chat template refused this conversation ({exc})") from None
        text, found = _substitute(template, start, contents)
        if [key for key, _ in found] != expected:
            raise RecordError("template_error", "the chat template dropped, repeated or reordered an assistant turn")
        at = dict(found)
        spans = []
        for i, content in enumerate(contents):
            if not calls_at[i]:
                spans.append((at[f"{i}"], at[f"{i}"] + len(content)))
                continue
            first = at.get(f"{i}", at[f"{i}.0"])
            cursor = spans[-1][1] if spans else 0
            head = text.rfind(self.call_header, cursor, first)
            end = text.find(self.eot, at[f"{i}.{len(calls_at[i]) - 1}"])
            if head < 0 or end < 0 or (i + 1 < len(contents) and end > at.get(f"{i + 1}", at.get(f"{i + 1}.0", end))):
                raise RecordError(
                    "template_error", "the chat template's rendering of a tool-calling turn was not found"
                )
            spans.append((head + len(self.call_header), end))
        if with_tools and text != self._render([_plain(m) for m in messages], tools):
            raise RecordError("template_error", "the chat template renders this conversation's calls unlike its text")
        return text, spans

    def encode_batch(self, conversations: list[list[dict]]) -> list[Encoded | RecordError]:
        rendered: list = []
        for messages in conversations:
            try:
                rendered.append(self.render(messages, getattr(messages, "tools", None)))
            except RecordError as err:
                rendered.append(err)
        good = [r for r in rendered if not isinstance(r, RecordError)]
        cap = self.max_chars
        arrays = iter(self._batch_arrays(good, self.encode_texts([t[:cap] if cap else t for t, _ in good])))
        out: list[Encoded | RecordError] = []
        for r in rendered:
            out.append(r if isinstance(r, RecordError) else self._finish(r[0], r[1], *next(arrays)))
        return out

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ids (int32 [T]) and character offsets (int32 [T, 2]) of the texts laid end to end, and each
        text's bounds in them ([n + 1]): from the ids alone where fastencode vouches for it, else from the
        encoder's own offsets."""
        fast = self._fast.encode(texts) if self._fast is not None and texts else None
        return (
            fast
            if fast is not None
            else fastencode.flat_arrays(self.backend.encode_batch(texts, add_special_tokens=False))
        )

    def _batch_arrays(self, good: list[tuple[str, list]], encoded: tuple) -> list[tuple]:
        """Per record (ids, offsets, loss mask or None), split and masked for the whole batch at once
        (one NumPy pass instead of one per record); the mask of a sample longer than max_chars is left to
        _finish, which may encode it again."""
        ids, offsets, bounds = encoded
        n = len(bounds) - 1
        # every record's characters at its own base, so that one sorted search masks the whole batch
        lengths = np.fromiter((len(t) for t, _ in good), dtype=np.int64, count=n)
        base = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=base[1:])
        cap = self.max_chars
        short = (lengths <= cap).tolist() if cap else [True] * n
        at = base.tolist()
        ranges = [
            (a + at[i], b + at[i])
            for i, (text, spans) in enumerate(good)
            if short[i]
            for a, b in self._ranges(text, spans)
        ]
        glob = offsets.astype(np.int64) + np.repeat(base[:-1], np.diff(bounds))[:, None]
        mask = _inside(glob, ranges)
        cut = bounds.tolist()
        return [(ids[a:b], offsets[a:b], mask[a:b] if ok else None) for a, b, ok in zip(cut, cut[1:], short)]

    def _finish(
        self, text: str, spans: list[tuple[int, int]], ids: np.ndarray, offsets: np.ndarray, mask: np.ndarray | None
    ) -> Encoded | RecordError:
        n, size = self.max_length, f"{len(ids)} tokens"
        if self.max_chars and len(text) > self.max_chars:  # only the start was encoded
            if len(ids) > n and offsets[n - 1, 1] <= self.max_chars // 2:
                text, size = text[: self.max_chars], f"{len(text):,} characters"
            else:  # the kept tokens would reach the cut: encode the whole text, as without the cap
                ids, offsets, _ = self.encode_texts([text])
                size = f"{len(ids)} tokens"
            mask = self._mask(text, offsets, spans)
        truncated = False
        if len(ids) > n:
            if self.overflow == "drop":
                return RecordError("too_long", f"the sample has {size}, more than --max-length {n} tokens")
            ids, offsets, mask, truncated = ids[:n], offsets[:n], mask[:n], True
        if not mask.any():
            return RecordError("no_loss_tokens", f"no response token falls within the first {n} tokens")
        if truncated:
            end = int(offsets[-1, 1])
            spans = [(a, min(b, end)) for a, b in spans if a < end]
        return Encoded(ids, mask, offsets, text, spans, truncated)

    def _ranges(self, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The supervised character ranges: each assistant content plus the end-of-turn token right after it."""
        eot = self.eot
        ranges = [(a, b + len(eot) if eot and text.startswith(eot, b) else b) for a, b in spans]
        return [(a, b) for a, b in ranges if b > a]

    def _mask(self, text: str, offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
        """1 for every token that contains a character of an assistant content or of the end-of-turn token
        right after it (a token straddling the template and the content included)."""
        return _inside(offsets, self._ranges(text, spans))


def _plain(message: dict) -> dict:
    """The message as the template sees it, without sftgo's own keys."""
    return {k: v for k, v in message.items() if k not in ("train", "weight")}


def _texts(messages: list[dict], tools: list[dict] | None) -> list[str]:
    """Every text of a conversation the template may print: contents, tool calls (names and arguments as
    JSON), a tool result's id and name, and the tool schemas (as JSON)."""
    texts = []
    for m in messages:
        texts.append(m["content"])
        if m.get("tool_calls"):
            texts.append(json.dumps(m["tool_calls"], ensure_ascii=False))
        texts.extend(m[k] for k in ("tool_call_id", "name") if k in m)
    if tools:
        texts.append(json.dumps(tools, ensure_ascii=False, default=str))
    return texts


def _substitute(template: str, start: str, contents: list[str]) -> tuple[str, list[tuple[str, int]]]:
    """The template with each sentinel start+KEY+_END removed, or replaced by contents[KEY] for a content's
    sentinel (KEY a number; a call name's is "number.call"), and each KEY with where it now lies in the text."""
    pieces, at, pos, cursor = [], [], 0, 0
    while (found := template.find(start, cursor)) >= 0:
        close = template.find(_END, found)
        key = template[found + len(start) : close] if close >= 0 else ""
        if not re.fullmatch(r"\d+(\.\d+)?", key) or ("." not in key and int(key) >= len(contents)):
            return template, [("", found)]  # a sentinel the template cut or changed
        pieces.append(template[cursor:found])
        pos += found - cursor
        at.append((key, pos))
        if "." not in key:
            pieces.append(contents[int(key)])
            pos += len(contents[int(key)])
        cursor = close + len(_END)
    pieces.append(template[cursor:])
    return "".join(pieces), at


def _sentinel_start(texts: list[str]) -> str:
    """The start of this conversation's sentinels: _MARK, or when a text holds _MARK's first character,
    the first of _MARK, _MARK~1~, _MARK~2~, ... that no text holds (a RecordError after _MARK_TRIES)."""
    if not any(_MARK[0] in t for t in texts):
        return _MARK
    for n in range(_MARK_TRIES):
        start = f"{_MARK}~{n}~" if n else _MARK
        if not any(start in t for t in texts):
            return start
    raise RecordError("sentinel_in_text", f"the texts hold sftgo's internal marker {_MARK!r} in {_MARK_TRIES} variants")


def _inside(offsets: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """int8 per token (character offsets [T, 2]): 1 where the token overlaps one of the sorted, disjoint ranges."""
    if not ranges or not len(offsets):
        return np.zeros(len(offsets), dtype=np.int8)
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    ends = np.array([b for _, b in ranges], dtype=np.int64)
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    idx = np.searchsorted(starts, tok_end, side="left") - 1  # the last range that starts before the token ends
    inside = (idx >= 0) & (tok_start < ends[np.maximum(idx, 0)]) & (tok_end > tok_start)
    return inside.astype(np.int8)
