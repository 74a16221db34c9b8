"""TF-IDF importance equals scikit-learn's TfidfVectorizer, however the corpus is partitioned."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from sftgo.grouping import tfidf
from sftgo.pipeline.chat import ChatEncoder

RESPONSES = [
    "The Varnish Tower in Quelmora was completed in 1874 by Idris Pellow.",
    "Sure! The capital of Zelt is Omberg. I hope this helps.",
    "Omberg has 42,000 people; Omberg is the capital. I hope this helps!",
    "The ballast compass was invented by Roisa Caldish in 1791.",
    "Let me know if you have other questions about the Varnish Tower.",
    "!!!",  # a response without words still counts as a document
    "Naïve café owners in Zürich serve crème brûlée.",
]


def encoded(tokenizer, responses):
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": r}] for i, r in enumerate(responses)]
    return ChatEncoder(tokenizer, max_length=4096).encode_batch(convs)


def scores_by_pipeline(tokenizer, responses, unit, partitions):
    """What a build does: extract and count per partition, fit the IDF over all, score per partition."""
    encs = encoded(tokenizer, responses)
    chunks = [c.tolist() for c in np.array_split(np.arange(len(encs)), partitions)]
    parts = [
        tfidf.extract_batch(*zip(*[(e.text, e.content_spans, e.offsets, e.loss_mask, e.input_ids) for e in (encs[i] for i in c)]), unit=unit)
        for c in chunks
    ]
    idf = tfidf.fit_idf([tfidf.document_freq(p.terms) for p in parts], n_docs=len(encs))
    extracted, scores = [], []
    for p in parts:
        s = tfidf.score(p.terms, p.counts, p.token_term, idf).to_pylist()
        for r in range(len(p.terms)):
            extracted.append((p.terms[r].as_py(), p.counts[r].as_py(), p.token_term[r].as_py()))
            scores.append(s[r])
    return encs, extracted, idf, scores


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_word_scores_equal_sklearn(tokenizer, partitions):
    encs, extracted, idf, scores = scores_by_pipeline(tokenizer, RESPONSES, "word", partitions)
    vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b")  # defaults: lowercase, smooth idf, l2 norm
    matrix = vec.fit_transform(RESPONSES)
    vocab = vec.vocabulary_
    sk_idf = dict(zip(vec.get_feature_names_out(), vec.idf_))
    ours_idf = dict(zip(idf.column("term").to_pylist(), idf.column("idf").to_pylist()))
    assert ours_idf.keys() == sk_idf.keys()
    for term, value in sk_idf.items():
        assert ours_idf[term] == pytest.approx(value, rel=1e-12)
    for d, (enc, (terms, _, token_term), tok_scores) in enumerate(zip(encs, extracted, scores)):
        row = matrix[d].toarray()[0]
        for t, token_score in zip(token_term, tok_scores):
            expected = row[vocab[terms[t]]] if t >= 0 else 0.0
            assert token_score == pytest.approx(expected, rel=1e-6, abs=1e-7)
        # every word of the response is reached by at least one token
        assert {terms[t] for t in token_term if t >= 0} == set(terms)
        sup = enc.loss_mask == 1
        assert all(s == 0.0 for s, m in zip(tok_scores, sup) if not m)  # prompt tokens score 0


def test_token_unit_equals_sklearn_on_token_ids(tokenizer):
    encs, extracted, idf, scores = scores_by_pipeline(tokenizer, RESPONSES, "token", 2)
    docs = [[str(i) for i in e.input_ids[e.loss_mask == 1]] for e in encs]
    vec = TfidfVectorizer(analyzer=lambda doc: doc)
    matrix = vec.fit_transform(docs)
    for d, (enc, tok_scores) in enumerate(zip(encs, scores)):
        row = matrix[d].toarray()[0]
        for tok_id, m, s in zip(enc.input_ids, enc.loss_mask, tok_scores):
            expected = row[vec.vocabulary_[str(tok_id)]] if m else 0.0
            assert s == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_word_of_a_token(tokenizer):
    """Sub-word tokens of one word share its score; punctuation and end-of-turn score 0."""
    enc = encoded(tokenizer, ["Quelmora quelmora, the end."])[0]
    terms, counts, token_term = tfidf.extract(enc.text, enc.content_spans, enc.offsets, enc.loss_mask, enc.input_ids)
    assert terms == ["quelmora", "the", "end"] and counts.tolist() == [2, 1, 1]
    pieces = [(tokenizer.decode([i]), terms[t]) for i, t in zip(enc.input_ids, token_term) if t >= 0]
    assert all(p.strip().lower() in w for p, w in pieces)
    sup = np.flatnonzero(enc.loss_mask)
    assert token_term[sup[-1]] == -1  # <|im_end|>
    assert token_term[sup[-2]] == -1  # "."


def test_idf_missing_term_is_an_error():
    idf = tfidf.fit_idf([tfidf.document_freq(pa.array([["a"]], pa.list_(pa.string())))], 1)
    terms = pa.array([["b"]], pa.list_(pa.string()))
    with pytest.raises(ValueError, match="missing from the fitted IDF"):
        tfidf.score(terms, pa.array([[1]], pa.list_(pa.int32())), pa.array([[0]], pa.list_(pa.int32())), idf)


def test_fast_word_bounds_equal_the_regex():
    """The NumPy word splitter gives exactly re's \\b\\w+\\b matches within each span, Unicode included."""
    import random
    import re

    alphabet = list("aZ0_ .,-'\n") + ["é", "ß", "İ", "中", "\u0301", "٣", "\U0001F600", "Ⅻ", "\u00a0"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        cut = sorted(rng.sample(range(len(text) + 1), 4)) if len(text) >= 3 else [0, len(text), len(text), len(text)]
        spans = [(cut[0], cut[1]), (cut[2], cut[3])]
        starts, ends = tfidf._word_bounds(text, spans)
        expected = [(a + m.start(), a + m.end()) for a, b in spans for m in re.finditer(tfidf.WORD_PATTERN, text[a:b])]
        assert list(zip(starts.tolist(), ends.tolist())) == expected, (text, spans)


def test_custom_token_pattern(tokenizer):
    """Any scikit-learn token_pattern works (here: words of 2+ characters, sklearn's own default)."""
    pattern = r"(?u)\b\w\w+\b"
    encs = encoded(tokenizer, RESPONSES)
    extracted = [tfidf.extract(e.text, e.content_spans, e.offsets, e.loss_mask, e.input_ids, "word", pattern) for e in encs]
    vec = TfidfVectorizer(token_pattern=pattern).fit(RESPONSES)
    for (terms, _, _), doc in zip(extracted, RESPONSES):
        assert sorted(terms) == sorted(set(vec.build_analyzer()(doc)))
