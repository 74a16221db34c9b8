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
    # one-letter words, Turkish dotted capitals (İ lower-cases to "i" + U+0307), German, Greek with
    # final sigma, CJK, accented capitals, digits
    "I saw a cat, a dog and 5 birds: x y z.",
    "İSTANBUL'DA KİRLİ SU. İstanbul'da kirli su, İ i ı I.",
    "Die Straße ist groß; STRASSE und Maß, ẞ.",
    "ΟΔΟΣ και οδός: Σ ΣΑΣ σας. Ο Σωκράτης.",
    "東京は日本の首都です。北京 上海 中文字 한국어 단어",
    "ÉCOLE École école; ÀÉÎÕÜ Ñandú ÅNGSTRÖM.",
    ["First turn: İzmir ΟΔΟΣ.", "Second turn, a B 7 ΟΔΟΣ"],  # two assistant turns: one document
]


def document(response) -> str:
    """The document scikit-learn sees: a response's assistant contents, one per line."""
    return "\n".join(response) if isinstance(response, list) else response


def conversation(i: int, response) -> list[dict]:
    turns = response if isinstance(response, list) else [response]
    conv = []
    for k, content in enumerate(turns):
        conv += [{"role": "user", "content": f"Question {i}.{k}?"}, {"role": "assistant", "content": content}]
    return conv


def encoded(tokenizer, responses):
    return ChatEncoder(tokenizer, max_length=4096).encode_batch([conversation(i, r) for i, r in enumerate(responses)])


def scores_by_pipeline(tokenizer, responses, unit, partitions, pattern=tfidf.WORD_PATTERN):
    """What a build does: extract and count per partition, fit the IDF over all, score per partition."""
    encs = encoded(tokenizer, responses)
    chunks = [c.tolist() for c in np.array_split(np.arange(len(encs)), partitions)]
    parts = [
        tfidf.extract_batch(
            *zip(*[(e.text, e.content_spans, e.offsets, e.loss_mask, e.input_ids) for e in (encs[i] for i in c)]),
            unit=unit,
            pattern=pattern,
        )
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


def assert_equal_to_sklearn(tokenizer, vec, responses, partitions, pattern=tfidf.WORD_PATTERN):
    """Our IDF, terms and per-token scores against a fitted TfidfVectorizer on the same documents."""
    encs, extracted, idf, scores = scores_by_pipeline(tokenizer, responses, "word", partitions, pattern)
    docs = [document(r) for r in responses]
    matrix = vec.fit_transform(docs)
    vocab, analyzer = vec.vocabulary_, vec.build_analyzer()
    sk_idf = dict(zip(vec.get_feature_names_out(), vec.idf_))
    ours_idf = dict(zip(idf.column("term").to_pylist(), idf.column("idf").to_pylist()))
    assert ours_idf.keys() == sk_idf.keys()
    for term, value in sk_idf.items():
        assert ours_idf[term] == pytest.approx(value, rel=1e-12)
    for d, (enc, (terms, counts, token_term), tok_scores) in enumerate(zip(encs, extracted, scores)):
        assert dict(zip(terms, counts)) == {t: analyzer(docs[d]).count(t) for t in set(analyzer(docs[d]))}
        row = matrix[d].toarray()[0]
        for t, token_score in zip(token_term, tok_scores):
            expected = row[vocab[terms[t]]] if t >= 0 else 0.0
            assert token_score == pytest.approx(expected, rel=1e-6, abs=1e-7)
        # every term of the response is reached by at least one token, and a token's term lies in its characters
        assert {terms[t] for t in token_term if t >= 0} == set(terms)
        starts, ends, found = tfidf.find_terms(enc.text, enc.content_spans, pattern)
        for (a, b), t in zip(enc.offsets.tolist(), token_term):
            if t >= 0:
                assert any(w == terms[t] and s < b and e > a for s, e, w in zip(starts, ends, found))
        assert all(w in enc.text[s:e].lower() for s, e, w in zip(starts, ends, found))
        sup = enc.loss_mask == 1
        assert all(s == 0.0 for s, m in zip(tok_scores, sup) if not m)  # prompt tokens score 0


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_word_scores_equal_sklearn_defaults(tokenizer, partitions):
    """The default is exactly TfidfVectorizer(): one-letter words are no terms, the text is lower-cased
    before it is split (the Turkish İ splits as scikit-learn splits it), multilingual text."""
    assert_equal_to_sklearn(tokenizer, TfidfVectorizer(), RESPONSES, partitions)
    assert TfidfVectorizer().token_pattern == tfidf.WORD_PATTERN


def test_one_letter_words_score_zero(tokenizer):
    enc = encoded(tokenizer, ["I saw a cat."])[0]
    terms, _, token_term = tfidf.extract(enc.text, enc.content_spans, enc.offsets, enc.loss_mask, enc.input_ids)
    assert terms == ["saw", "cat"]
    pieces = {tokenizer.decode([i]).strip(): t for i, t, m in zip(enc.input_ids, token_term, enc.loss_mask) if m}
    assert pieces["I"] == -1 and pieces["a"] == -1 and terms[pieces["saw"]] == "saw"


def test_turkish_dotted_capital_maps_back_to_the_original_characters():
    text = "KİRLİ İstanbul'da İ"
    starts, ends, terms = tfidf.find_terms(text, [(0, len(text))])
    assert terms == TfidfVectorizer().build_analyzer()(text) == ["ki", "rli", "stanbul", "da"]
    assert [text[a:b] for a, b in zip(starts.tolist(), ends.tolist())] == ["Kİ", "RLİ", "stanbul", "da"]
    # the same positions with the text inside a template and after another span
    pre, mid = "<|im_start|>assistant\n", "<|im_end|>\nİİ\n"
    full = pre + "İİ x" + mid + text
    spans = [(len(pre), len(pre) + 4), (len(pre) + 4 + len(mid), len(full))]
    s2, e2, t2 = tfidf.find_terms(full, spans)
    assert t2 == terms and [full[a:b] for a, b in zip(s2.tolist(), e2.tolist())] == ["Kİ", "RLİ", "stanbul", "da"]


def test_lowering_the_whole_text_gives_each_span_what_lowering_it_alone_gives():
    """Without a capital sigma (the one context rule of str.lower) the text is lower-cased in one call; in the
    spans that equals lower-casing each span alone (as with a sigma elsewhere in the text), beside prompt
    characters whose lower case is shorter in UTF-8 (the Kelvin and ohm signs), and scikit-learn agrees."""
    answer, second = "Hello WORLD, \u212aelvin ÜBER 7\u2126 Ünïcode", "ÉCOLE Straße"
    text = f"Q: \u212a\u2126 TEMP?\nA: {answer}\nQ: more\nA: {second}\n"
    spans = [
        (text.index(answer), text.index(answer) + len(answer)),
        (text.index(second), text.index(second) + len(second)),
    ]
    lowered, low_spans, back = tfidf._lower_spans(text, spans)
    assert back is None and low_spans == spans and lowered[: spans[0][0]] != text[: spans[0][0]]  # lowered whole
    slow_text = text + "\u03a3"  # a capital sigma outside the spans: each span is lowered alone
    slow, _, _ = tfidf._lower_spans(slow_text, spans)
    assert slow[: spans[0][0]] == text[: spans[0][0]]
    assert all(lowered[a:b] == slow[a:b] == text[a:b].lower() for a, b in spans)
    found = tfidf.find_terms(text, spans)
    assert [x.tolist() if hasattr(x, "tolist") else x for x in found] == [
        x.tolist() if hasattr(x, "tolist") else x for x in tfidf.find_terms(slow_text, spans)
    ]
    assert found[2] == TfidfVectorizer().build_analyzer()(answer + "\n" + second)
    _, starts, ends, _ = tfidf._term_positions(text, spans, tfidf.WORD_PATTERN)
    assert (
        tfidf._slices(lowered, starts, ends).to_pylist() == found[2]
    )  # cut from UTF-8 bytes of the whole lowered text
    plain = "plain ascii: the words, cut where they lie."  # ASCII: byte positions are the character positions
    _, starts, ends, _ = tfidf._term_positions(plain, [(0, len(plain))], tfidf.WORD_PATTERN)
    assert tfidf._slices(plain, starts, ends).to_pylist() == TfidfVectorizer().build_analyzer()(plain)


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


def test_fast_word_runs_equal_the_regex_and_sklearn():
    """The NumPy splitter gives exactly re's matches within each span, Unicode included, for both
    patterns it serves; find_terms equals scikit-learn's analyzer (fast path and re path alike)."""
    import random
    import re

    alphabet = list("aZ0_ .,-'\nIΣ") + ["é", "ß", "İ", "中", "\u0301", "٣", "\U0001f600", "Ⅻ", "\u00a0", "\u0307"]
    rng = random.Random(0)
    slow = tfidf.WORD_PATTERN + "(?#no fast path)"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        cut = sorted(rng.sample(range(len(text) + 1), 4)) if len(text) >= 3 else [0, len(text), len(text), len(text)]
        spans = [(cut[0], cut[1]), (cut[2], cut[3])]
        for pattern, k in [(tfidf.RUN_PATTERN, 1), (tfidf.WORD_PATTERN, 2)]:
            starts, ends = tfidf._word_runs(text, spans, k)
            expected = [(a + m.start(), a + m.end()) for a, b in spans for m in re.finditer(pattern, text[a:b])]
            assert list(zip(starts.tolist(), ends.tolist())) == expected, (text, spans)
        doc = "\n".join(text[a:b] for a, b in spans)
        for pattern in [tfidf.WORD_PATTERN, tfidf.RUN_PATTERN, slow]:
            assert tfidf.find_terms(text, spans, pattern)[2] == TfidfVectorizer(token_pattern=pattern).build_analyzer()(
                doc
            )


@pytest.mark.parametrize("pattern", [r"(?u)\b\w+\b", r"[^\W\d_]+", r"(?u)\b(\w)\w*\b"])
def test_custom_token_pattern(tokenizer, pattern):
    """Other scikit-learn token_patterns work, one capturing group included (its group is the term)."""
    assert_equal_to_sklearn(tokenizer, TfidfVectorizer(token_pattern=pattern), RESPONSES, 2, pattern)


def test_bad_token_pattern_is_one_sentence():
    with pytest.raises(ValueError, match="at most one"):
        tfidf.find_terms("ab cd", [(0, 5)], r"(a)(b)")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        tfidf.find_terms("ab cd", [(0, 5)], r"(ab")


def test_semantic_words_keep_one_letter_words_and_case():
    """word_bounds (the words the semantic scorer reads) is every run of word characters of the original
    text: one-letter words and İ stay words, case is kept."""
    text = "I saw a KİRLİ cat, 5 x."
    starts, ends = tfidf.word_bounds(text, [(0, len(text))])
    assert [text[a:b] for a, b in zip(starts.tolist(), ends.tolist())] == ["I", "saw", "a", "KİRLİ", "cat", "5", "x"]
