"""Semantic importance: the LLMLingua-2 compressor path (tiny token classifier) and the default
sentence-embedding occlusion with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftgo.grouping.semantic import SemanticConfig, SemanticScorer, packaged_encoder_dir
from sftgo.grouping.tfidf import token_word_index, word_bounds
from sftgo.pipeline.chat import ChatEncoder

KEY = "The Varnish Tower was designed by the architect Idris Pellow."
RESPONSES = [
    KEY,
    "Sure! The capital of Zelt is Omberg, a city of 42,000 people. I hope this helps.",
    "Naïve café owners in Zürich serve crème brûlée -- twice a day, the locals say.",
    "!!!",
]


def encode(tokenizer, responses, max_length=512):
    convs = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": r}]
        for i, r in enumerate(responses)
    ]
    return ChatEncoder(tokenizer, max_length=max_length).encode_batch(convs)


def run(scorer, encs):
    return scorer.score(
        [e.text for e in encs], [e.content_spans for e in encs], [e.offsets for e in encs], [e.loss_mask for e in encs]
    )


def token_words(e):
    """Per supervised token: the word index (or -1) and the words' text."""
    starts, ends = word_bounds(e.text, e.content_spans)
    sup = np.flatnonzero(e.loss_mask)
    w = token_word_index(starts, ends, e.offsets[sup, 0], e.offsets[sup, 1])
    return sup, w, [e.text[a:b] for a, b in zip(starts, ends)]


@pytest.fixture(scope="module")
def compressor_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    path = tmp_path_factory.mktemp("compressor")
    tok = AutoTokenizer.from_pretrained(packaged_encoder_dir())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
        num_labels=2,
    )
    BertForTokenClassification(cfg).save_pretrained(path)
    tok.model_max_length = 24
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def occlusion():
    return SemanticScorer(SemanticConfig())


def check_shape_and_zeros(encs, got):
    for e, g in zip(encs, got):
        assert g.dtype == np.float32 and g.shape == e.loss_mask.shape
        assert (g[e.loss_mask == 0] == 0).all()
        sup, w, _ = token_words(e)
        assert (g[sup[w < 0]] == 0).all()  # punctuation, end-of-turn


def test_compressor_keep_probability_per_word(compressor_dir, tokenizer):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    encs = encode(tokenizer, RESPONSES)
    scorer = SemanticScorer(SemanticConfig(compressor_model=compressor_dir))
    assert scorer.mode == "compressor" and scorer.max_length == 24
    got = run(scorer, encs)
    check_shape_and_zeros(encs, got)
    model = AutoModelForTokenClassification.from_pretrained(compressor_dir).eval()
    tok = AutoTokenizer.from_pretrained(compressor_dir)
    # the key sentence fits in one chunk (12 sub-words): compare with a direct forward
    e, g = encs[0], got[0]
    sup, w, words = token_words(e)
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        keep = torch.softmax(model(**enc).logits[0], -1)[:, 1].numpy()
    wid = np.array([-1 if x is None else x for x in enc.word_ids(0)])
    want_word = np.array([keep[wid == k].mean() for k in range(len(words))])
    ok = w >= 0
    np.testing.assert_allclose(g[sup[ok]], want_word[w[ok]], atol=1e-5)
    assert (g[sup[ok]] > 0).all() and (g[sup[ok]] < 1).all()
    # the longer responses were chunked (more sub-words than 22) and every word still got a probability
    for e, g in zip(encs[1:3], got[1:3]):
        sup, w, _ = token_words(e)
        assert (g[sup[w >= 0]] > 0).all()
    # batched equals one chunk at a time
    one = run(SemanticScorer(SemanticConfig(compressor_model=compressor_dir, batch_size=1)), encs)
    for a, b in zip(got, one):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_compressor_long_response_chunked_matches_words(compressor_dir, tokenizer):
    long = " ".join(f"word{i} alpha" for i in range(40))  # ~120 sub-words, model max 24
    encs = encode(tokenizer, [long])
    got = run(SemanticScorer(SemanticConfig(compressor_model=compressor_dir)), encs)[0]
    sup, w, words = token_words(encs[0])
    assert len(words) == 80 and (got[sup[w >= 0]] > 0).all()
    # a token of the same word gets the same score
    for k in range(len(words)):
        assert len(set(got[sup[w == k]].tolist())) == 1


def test_occlusion_key_words_outrank_articles(occlusion, tokenizer):
    encs = encode(tokenizer, [KEY])
    g = run(occlusion, encs)[0]
    sup, w, words = token_words(encs[0])
    word_score = {words[k]: float(g[sup[w == k]][0]) for k in range(len(words))}
    # "the" occurs twice ("The", "the"): both articles rank below the key content words
    for article in ("The", "the"):
        assert word_score["Pellow"] > word_score[article]
        assert word_score["Varnish"] > word_score[article]
    assert max(word_score, key=word_score.get) in {"Varnish", "Pellow", "Tower", "Idris"}


def test_occlusion_equals_direct_embedding_distance_and_batching(occlusion, tokenizer):
    from transformers import AutoModel, AutoTokenizer

    encs = encode(tokenizer, RESPONSES)
    got = run(occlusion, encs)
    check_shape_and_zeros(encs, got)
    # direct computation, sentence-transformers style (mean pooling + L2 norm), for the second response
    e, g = encs[1], got[1]
    tok = AutoTokenizer.from_pretrained(packaged_encoder_dir())
    model = AutoModel.from_pretrained(packaged_encoder_dir()).eval()

    def emb(s):
        x = tok(s, return_tensors="pt")
        with torch.no_grad():
            h = model(**x).last_hidden_state[0]
        v = h.mean(0)
        return (v / v.norm()).numpy()

    ((a, b),) = e.content_spans
    response = e.text[a:b]
    starts, ends = word_bounds(e.text, e.content_spans)
    full = emb(response)
    sup, w, words = token_words(e)
    for k in (0, 3, 6):
        s0, e0 = starts[k] - a, ends[k] - a
        want = 1.0 - float(emb(response[:s0] + response[e0:]) @ full)
        np.testing.assert_allclose(g[sup[w == k]], want, atol=1e-5)
    assert response.startswith("Sure!")
    one = run(SemanticScorer(SemanticConfig(batch_size=1)), encs[:3])
    for x, y in zip(got, one):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_occlusion_windows_and_multi_turn(occlusion, tokenizer):
    conv = [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": KEY},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Omberg is the capital of Zelt."},
    ]
    e = ChatEncoder(tokenizer, max_length=512).encode_batch([conv])[0]
    assert len(e.content_spans) == 2
    whole = run(occlusion, [e])[0]
    windowed = run(SemanticScorer(SemanticConfig(max_words=3)), [e])[0]
    sup, w, words = token_words(e)
    assert (whole[sup[w >= 0]] > 0).all() and (windowed[sup[w >= 0]] > 0).all()
    # each turn is its own response: scoring the second turn alone gives the same scores
    alone = encode(tokenizer, ["Omberg is the capital of Zelt."])[0]
    a_sup, a_w, _ = token_words(alone)
    second = sup[w >= 10]  # the first turn has 10 words
    np.testing.assert_allclose(whole[second], run(occlusion, [alone])[0][a_sup[a_w >= 0]], atol=1e-5)
    # windows of 3 words give different scores than the whole response (each word occluded from its window)
    assert not np.allclose(whole[sup[w >= 0]], windowed[sup[w >= 0]])
