"""Offsets derived from token ids (pipeline/fastencode.py) against the Rust encoder's own offsets.

The oracle is `tokenizers`' encode_batch(...).offsets.  Besides the embedded SmolLM2 tokenizer, variants
of it stand in for other tokenizer families: an NFC normalizer (Qwen), a Split + ByteLevel pre-tokenizer
with a non-trimming ByteLevel post-processor (Llama 3), and the set-ups whose offsets do not follow from
the ids (trimmed offsets, a prefix space, whitespace-stripping added tokens, other models)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer

from sftgo.pipeline import fastencode
from sftgo.pipeline.chat import ChatEncoder

PIECES = [
    "the",
    " river",
    "Stra\u00dfe",
    "\u0130stanbul",
    "\u039f\u0394\u039f\u03a3",
    "\u4e2d\u6587\u5b57",
    "\u00c9",
    " a",
    "42,000",
    "\u2014",
    "\n\n",
    "  ",
    "\t",
    "na\u00efve",
    "x=1;",
    "\U0001f600",
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "e\u0301",
    "\u212b",
    "\u0915\u094d\u0937",
    "\u00a0",
    "\u3000",
    "<|im_end|>",
    "<|im_start|>",
    "\r\n",
    "'s",
    "don't",
    "\U00010348",
    "\u0651\u064e",
    "\ufeff",
    "   \n",
    "123456789",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def oracle(backend: Tokenizer, texts: list[str]) -> tuple[list[int], list[list[int]]]:
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [i for e in encodings for i in e.ids], [list(o) for e in encodings for o in e.offsets]


def variant(tokenizer, change) -> Tokenizer:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    change(spec)
    return Tokenizer.from_str(json.dumps(spec))


def assert_like_oracle(fast: fastencode.ByteOffsets, backend: Tokenizer, texts: list[str]) -> None:
    ids, offsets, bounds = fast.encode(texts)
    want_ids, want_offsets = oracle(backend, texts)
    assert ids.tolist() == want_ids and offsets.tolist() == want_offsets
    assert ids.dtype == np.int32 and offsets.dtype == np.int32 and offsets.shape == (len(ids), 2)
    assert (
        bounds.tolist()
        == np.cumsum([0] + [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]).tolist()
    )


def test_offsets_from_ids_equal_the_encoders_on_any_text(tokenizer):
    backend = tokenizer.backend_tokenizer
    fast = fastencode.plan(backend)
    assert fast is not None
    texts = random_texts(400) + ["", " ", "a", "\U0001f600"] + [t for t in random_texts(50, seed=1) if t.isascii()]
    for start in range(0, len(texts), 64):  # batches, some all-ASCII, some not
        assert_like_oracle(fast, backend, texts[start : start + 64])
    ascii_only = ["plain ascii text, with  spaces\nand lines", "x=1; y = 2"]
    assert_like_oracle(fast, backend, ascii_only)


def test_chat_encoder_gives_the_same_with_and_without_the_fast_offsets(tokenizer):
    """The whole encoding (ids, mask, offsets, spans) of chat data and of odd texts is the same both ways."""
    from sftgo.pipeline.formats import to_messages

    lines = Path(__file__).resolve().parents[1].joinpath("data", "chat.jsonl").read_text().splitlines()[:200]
    convs = [to_messages(json.loads(line), "messages") for line in lines]
    convs += [
        [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
        for a, b in zip(random_texts(100, seed=2), random_texts(100, seed=3))
        if "<|im_" not in a + b
    ]
    fast, slow = ChatEncoder(tokenizer, max_length=4096), ChatEncoder(tokenizer, max_length=4096)
    slow._fast = None
    assert fast._fast is not None
    for a, b in zip(fast.encode_batch(convs), slow.encode_batch(convs)):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
        assert a.offsets.tolist() == b.offsets.tolist() and a.content_spans == b.content_spans and a.text == b.text


def _llama3_like(spec: dict) -> None:
    split = {
        "type": "Split",
        "pattern": {
            "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| "
            r"?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        },
        "behavior": "Isolated",
        "invert": False,
    }
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            split,
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    spec["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            spec["post_processor"],
        ],
    }


@pytest.mark.parametrize("family", ["llama3", "qwen"])
def test_other_byte_level_families_get_the_same_offsets(tokenizer, family):
    def change(spec):
        if family == "llama3":
            _llama3_like(spec)
        else:
            spec["normalizer"] = {"type": "NFC"}
            spec["post_processor"] = {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": False,
            }

    backend = variant(tokenizer, change)
    fast = fastencode.plan(backend)
    assert fast is not None
    import unicodedata

    texts = random_texts(300, seed=4)
    nfc = [unicodedata.normalize("NFC", t) for t in texts]
    for start in range(0, len(nfc), 50):
        assert_like_oracle(fast, backend, nfc[start : start + 50])
    if family == "qwen":  # text the normaliser would change: not vouched for, the encoder's offsets are used
        assert fast.encode(["e\u0301 and \u212b"]) is None
        tok = copy.deepcopy(tokenizer)
        tok.backend_tokenizer.normalizer = backend.normalizer
        tok.backend_tokenizer.post_processor = backend.post_processor
        enc = ChatEncoder(tok, max_length=4096)
        assert enc._fast is not None
        conv = [
            {"role": "user", "content": "caf\u0065\u0301?"},
            {"role": "assistant", "content": "\u212b and e\u0301 \U0001f600"},
        ]
        got = enc.encode_batch([conv])[0]
        want = enc.backend.encode(got.text, add_special_tokens=False)
        assert got.input_ids.tolist() == want.ids and got.offsets.tolist() == [list(o) for o in want.offsets]


@pytest.mark.parametrize(
    "setup",
    [
        "trimmed offsets",
        "trimmed (Roberta)",
        "prefix space",
        "stripping added token",
        "lowercase normalizer",
        "removing split",
        "whitespace split",
        "byte fallback",
    ],
)
def test_tokenizers_whose_offsets_do_not_follow_from_ids_keep_the_encoders(tokenizer, setup):
    def change(spec):
        if setup == "trimmed offsets":
            spec["post_processor"] = {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            }
        elif setup == "trimmed (Roberta)":
            spec["post_processor"] = {
                "type": "RobertaProcessing",
                "sep": ["<|im_end|>", 2],
                "cls": ["<|im_start|>", 1],
                "trim_offsets": True,
                "add_prefix_space": False,
            }
        elif setup == "prefix space":
            spec["pre_tokenizer"]["add_prefix_space"] = True
        elif setup == "stripping added token":
            spec["added_tokens"][2]["lstrip"] = True
        elif setup == "lowercase normalizer":
            spec["normalizer"] = {"type": "Lowercase"}
        elif setup == "removing split":
            spec["pre_tokenizer"] = {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Removed", "invert": False},
                    spec["pre_tokenizer"],
                ],
            }
        elif setup == "whitespace split":  # drops the whitespace
            spec["pre_tokenizer"] = {
                "type": "Sequence",
                "pretokenizers": [{"type": "WhitespaceSplit"}, spec["pre_tokenizer"]],
            }
        else:
            spec["model"]["byte_fallback"] = True

    backend = variant(tokenizer, change)
    assert fastencode.plan(backend) is None
    if setup not in ("trimmed offsets", "stripping added token"):
        return  # the fallback below is one code path whatever the reason; two set-ups exercise it
    # and ChatEncoder still gives the encoder's own offsets with such a tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.__setstate__(backend.__getstate__())
    enc = ChatEncoder(tok, max_length=4096)
    assert enc._fast is None
    conv = [{"role": "user", "content": "  Hi there\n"}, {"role": "assistant", "content": " Fine, thanks. \U0001f600"}]
    got = enc.encode_batch([conv])[0]
    want = enc.backend.encode(got.text, add_special_tokens=False)
    assert got.input_ids.tolist() == want.ids and got.offsets.tolist() == [list(o) for o in want.offsets]


def test_other_models_are_not_planned():
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    assert fastencode.plan(tok) is None


def test_a_batch_whose_tokens_miss_its_bytes_is_not_vouched_for(tokenizer):
    """The per-batch check: with a wrong byte length for one token, the batch is refused, not mis-placed."""
    backend = tokenizer.backend_tokenizer
    fast = fastencode.plan(backend)
    ids, _, _ = fast.encode(["hello world"])
    wrong = fastencode.ByteOffsets(backend, fast.token_bytes.copy(), fast.nfc)
    wrong.token_bytes[ids[-1]] += 1
    assert wrong.encode(["hi", "hello world", "x"]) is None
    assert not wrong.active and wrong.encode(["nothing in common"]) is None  # not tried again
    wrong.token_bytes[ids[-1]] -= 1
    wrong.active = True
    assert_like_oracle(wrong, backend, ["hi", "hello world", "x"])


def test_added_tokens_are_placed_by_their_own_text(tokenizer):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_tokens(
        [AddedToken("caf\u00e9bar", special=False, normalized=False), AddedToken("<my\U0001f600tag>", special=True)]
    )
    fast = fastencode.plan(backend)
    assert fast is not None
    assert_like_oracle(
        fast, backend, ["x caf\u00e9bar y <my\U0001f600tag>z", "<my\U0001f600tag><my\U0001f600tag>", "caf\u00e9bar"]
    )
