"""Token ids and character offsets of a batch of texts, without asking the Rust encoder for offsets.

Input: the `tokenizers.Tokenizer` behind a fast tokenizer, then batches of texts.
Output: `ByteOffsets.encode(texts)` -> (ids int32 [T], character offsets int32 [T, 2], each text's bounds
in them [n + 1]): exactly what `encode_batch(texts, add_special_tokens=False)` gives as `.ids` and
`.offsets`; or None for a batch it cannot vouch for (the caller then encodes the usual way).

Why: reading `.offsets` of every encoding builds one Python tuple per token; with the Rust encoder's own
offset tracking, that is a sizeable share of pass 1's encoding time (figures in bench/analysis.md).  For
a byte-level BPE tokenizer the offsets follow from the ids alone: the
tokens of a text are its UTF-8 bytes cut into consecutive pieces, and a token's length in bytes is a
property of its id.  So `encode_batch_fast` (ids only), a table of byte lengths, a cumulative sum, and
bytes -> characters (a token that ends inside a character reaches to that character's end, as the
encoder's own conversion does).

When (`plan`, once per tokenizer; anything else gets None and the usual path):
- a BPE model without byte fallback or sub-word prefixes/suffixes, whose vocabulary is written in the
  byte-level alphabet (one character per byte);
- no normalizer, or NFC (then only batches whose every text is already NFC);
- a ByteLevel pre-tokenizer that adds no prefix space, alone or after splitting steps that keep every
  character;
- no post-processor that trims offsets (ByteLevel/Roberta with trim_offsets);
- no added token that swallows the whitespace beside it (lstrip/rstrip);
- and the derived offsets equal the encoder's on probe texts (specials, accents, combining marks, CJK,
  emoji, whitespace runs).
Every batch is checked as well: each text's tokens must add up to exactly its bytes, else None, and the
encoder's own offsets from then on.
Cost: plan reads the vocabulary once (O(vocabulary size)); encode is NumPy over the batch.
"""

from __future__ import annotations

import json
import unicodedata
from itertools import chain

import numpy as np

# splitting pre-tokenizers that keep every character (a Split that removes its matches would not)
_SPLITTERS = {"Split", "Digits", "Punctuation"}
_KEEPING_SPLIT = {"Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"}
_PROBES = [
    "<|im_start|>user\nh\u00e9llo w\u00f6rld \U0001f600 \u65e5\u672c\u8a9e\u30c6\u30ad\u30b9\u30c8 x\u0301<|im_end|>\n",
    "\u03a9\u2248\u00e7\u221a\u222b \U0001f3f3\ufe0f\u200d\U0001f308 \u2103 \u00a0\t\r\n   end  ",
    "  two  spaces, a tab\tand\nnew\n\nlines\u3000\u2028 caf\u00e9 na\u00efve \u0915\u094d\u0937 \U00010348\U0010fffd",
]


def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE writes its vocabulary in (GPT-2's bytes_to_unicode)."""
    shown = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    hidden = [b for b in range(256) if b not in shown]
    return frozenset(map(chr, shown + [256 + i for i in range(len(hidden))]))


def _byte_level_pre(spec: dict | None) -> bool:
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    levels = [s for s in steps if s and s.get("type") == "ByteLevel"]
    rest = [s for s in steps if s and s.get("type") != "ByteLevel"]
    return (
        len(levels) == 1
        and not levels[0].get("add_prefix_space")
        and all(s.get("type") in _SPLITTERS and s.get("behavior", "Isolated") in _KEEPING_SPLIT for s in rest)
    )


def _keeps_offsets(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_offsets(s) for s in spec.get("processors", []))
    if kind in ("ByteLevel", "RobertaProcessing"):
        return not spec.get("trim_offsets", True)
    return kind in ("TemplateProcessing", "BertProcessing")


class ByteOffsets:
    """A byte-level tokenizer's byte length per token id, and the fast encode that uses it."""

    def __init__(self, backend, token_bytes: np.ndarray, nfc: bool):
        self.backend = backend
        self.token_bytes = token_bytes
        self.nfc = nfc
        self.active = True  # False after a batch whose tokens missed its bytes: not tried again

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.active or (self.nfc and not all(unicodedata.is_normalized("NFC", t) for t in texts)):
            return None
        ids, bounds = _ids(self.backend.encode_batch_fast(texts, add_special_tokens=False))
        n = len(bounds) - 1
        known = not len(ids) or (ids.min() >= 0 and ids.max() < len(self.token_bytes))
        size = self.token_bytes[ids] if known else None
        if size is None or not size.all():  # an id with no known byte length (outside the vocabulary)
            self.active = False
            return None
        ends = np.cumsum(size)  # byte positions in the texts laid end to end
        starts = ends - size
        chars = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=n), out=chars[1:])
        joined = "".join(texts)
        ascii_ = joined.isascii()
        if ascii_:
            byte_base = chars
        else:
            data = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
            lead = (data & 0xC0) != 0x80  # the first byte of each character
            char_of = np.cumsum(lead) - 1
            byte_base = np.append(np.flatnonzero(lead), len(data))[chars]
        covered = np.concatenate(([0], ends))[bounds]
        if not np.array_equal(covered, byte_base):  # some text's tokens are not exactly its bytes
            self.active = False  # something plan's checks did not foresee: the encoder's offsets from now on
            return None
        if not ascii_:
            starts, ends = char_of[starts], char_of[ends - 1] + 1
        base = np.repeat(chars[:-1], np.diff(bounds))
        offsets = np.empty((len(ids), 2), dtype=np.int32)
        offsets[:, 0] = starts - base
        offsets[:, 1] = ends - base
        return ids, offsets, bounds


def _ids(encodings) -> tuple[np.ndarray, np.ndarray]:
    """The ids (int32 [T]) of several Rust encodings laid end to end, and each encoding's bounds in them ([n + 1])."""
    n = len(encodings)
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encodings), dtype=np.int64, count=n), out=bounds[1:])
    return np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(bounds[-1])), bounds


def flat_arrays(encodings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids (int32 [T]) and the encoder's own character offsets (int32 [T, 2]) of several Rust encodings
    laid end to end, and each encoding's bounds in them ([n + 1]): one Python tuple per token read."""
    ids, bounds = _ids(encodings)
    offsets = np.fromiter(
        chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), dtype=np.int32, count=2 * len(ids)
    ).reshape(-1, 2)
    return ids, offsets, bounds


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def plan(backend) -> ByteOffsets | None:
    """The fast encode for this tokenizer, or None when its offsets do not follow from its ids."""
    model = backend.model
    if (
        type(model).__name__ != "BPE"
        or model.byte_fallback
        or model.continuing_subword_prefix
        or model.end_of_word_suffix
    ):
        return None
    normalizer = _state(backend.normalizer)
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    if not _byte_level_pre(_state(backend.pre_tokenizer)) or not _keeps_offsets(_state(backend.post_processor)):
        return None
    added = backend.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip for t in added.values()):
        return None
    vocab = {text: i for text, i in backend.get_vocab(with_added_tokens=True).items() if i not in added}
    if not vocab or not set("".join(vocab)) <= _byte_level_alphabet():  # one character per byte
        return None
    ids, sizes = np.fromiter(vocab.values(), dtype=np.int64), np.fromiter(map(len, vocab), dtype=np.int64)
    if not sizes.all() or not all(t.content for t in added.values()):  # an empty token would point at no byte
        return None
    token_bytes = np.zeros(max(int(ids.max()), max(added, default=0)) + 1, dtype=np.int64)
    token_bytes[ids] = sizes
    for i, token in added.items():  # an added token stands for its own text
        token_bytes[i] = len(token.content.encode("utf-8"))
    fast = ByteOffsets(backend, token_bytes, normalizer is not None)
    probes = [unicodedata.normalize("NFC", p) for p in _PROBES] + ["".join(t.content + " x" for t in added.values())]
    got = fast.encode(probes)
    want = flat_arrays(backend.encode_batch(probes, add_special_tokens=False))
    if got is None or not all(np.array_equal(a, b) for a, b in zip(got, want)):
        return None
    return fast
