r"""TF-IDF importance: terms per response, document frequencies, IDF, token scores.

Definitions are exactly scikit-learn's TfidfVectorizer() defaults: the document is
lower-cased as a whole, then split by token_pattern (?u)\b\w\w+\b (WORD_PATTERN: words of
two or more word characters; one-letter words are no terms), raw term counts, smooth idf
= ln((1 + n) / (1 + df)) + 1, L2-normalised rows.  A document is one sample's response:
its assistant contents, each lower-cased and split on its own (as scikit-learn would the
contents joined by newlines).  Terms are found in the lower-cased text and mapped back to
the original characters (a Turkish "İ" lower-cases to two code points, "i" + U+0307).
A token's score is the TF-IDF of the term it overlaps (unit "word"; a token over two terms
takes the first) or of its own id (unit "token"); supervised tokens in no term
(punctuation, one-letter words, end-of-turn) score 0.
word_bounds() (the words of the semantic scorer) is another unit: every run of word
characters of the original text, one-letter words included, case kept.

Three steps, so that the IDF is exact however the corpus is partitioned:
  extract_batch()  per partition -> per record its terms, their counts, each token's term index
  document_freq()  per partition -> table (term, df)
  fit_idf()        once          -> table (term, df, idf), saved as idf.parquet
  score()          per partition -> float32 importance per token (vectorised, Arrow/NumPy)
Cost: linear in tokens and characters (the default patterns are matched with NumPy, others
with re); score() hashes the partition's terms against the vocabulary.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sftgo.core.errors import ConfigError
from sftgo.core.shards import ShardError

IDF_FILE = "idf.parquet"
WORD_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default token_pattern (Python's \w: str.isalnum() or "_")
RUN_PATTERN = r"(?u)\b\w+\b"  # every run of word characters: the words of word_bounds()
# patterns matched with NumPy instead of re (the same matches): the shortest run that is a match
_FAST_RUNS = {WORD_PATTERN: 2, r"\b\w\w+\b": 2, RUN_PATTERN: 1, r"\b\w+\b": 1}

# \w for ASCII code points; others are classified once each with str.isalnum (what re's \w uses)
_ASCII_WORD = np.array([chr(c).isalnum() or chr(c) == "_" for c in range(128)], dtype=bool)


def _word_runs(text: str, spans: list[tuple[int, int]], min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Start/end of every maximal run of at least `min_len` word characters inside the spans: the
    matches of RUN_PATTERN (min_len 1) or WORD_PATTERN (2), with NumPy instead of one Python match
    object per word."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    inside = np.zeros(len(codes) + 1, dtype=bool)
    for a, b in spans:
        inside[a:b] = True
    word = np.zeros(len(codes) + 1, dtype=bool)
    ascii_ = codes < 128
    word[:-1][ascii_] = _ASCII_WORD[codes[ascii_]]
    if not ascii_.all():
        other = codes[~ascii_]
        uniq, inv = np.unique(other, return_inverse=True)
        flags = np.array([chr(c).isalnum() or chr(c) == "_" for c in uniq.tolist()], dtype=bool)
        word[:-1][~ascii_] = flags[inv]
    word &= inside
    # a span edge is a word boundary even between two word characters
    edge = np.zeros(len(codes) + 1, dtype=bool)
    for a, _ in spans:
        edge[a] = True
    prev = np.concatenate([[False], word[:-1]]) & ~edge
    starts = np.flatnonzero(word & ~prev)
    nxt = np.concatenate([word[1:], [False]])
    nxt_edge = np.concatenate([edge[1:], [False]])
    ends = np.flatnonzero(word & ~(nxt & ~nxt_edge)) + 1
    keep = ends - starts >= min_len
    return starts[keep], ends[keep]


def word_bounds(text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The words of `text` inside `spans` for word-level scorers (semantic): every run of word
    characters (RUN_PATTERN, each span matched alone) in the original text, one-letter words
    included and case kept -- what a sentence encoder or a compressor reads.  Start and end
    character positions, sorted.  (TF-IDF's terms are find_terms(): scikit-learn's analyzer.)"""
    return _word_runs(text, spans, 1)


def _lower_spans(text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]], np.ndarray | None]:
    """`text` with each span (sorted, disjoint) lower-cased on its own, the spans' places in the result,
    and for every position of the result the position of the character of `text` it comes from
    (None when no character changed length, so that positions agree).  str.lower() maps one code point
    to one except U+0130 (to two); the context rule of final sigma keeps the length.
    Outside the spans the result's characters are left unspecified (nothing reads them): a text with
    no capital sigma, whose lower-casing depends on no context, is lower-cased whole in one call."""
    if "\u03a3" not in text:
        lowered = text.lower()
        if len(lowered) == len(text):
            return lowered, list(spans), None
    pieces, low_spans, grown, cursor, shift = [], [], [], 0, 0
    for a, b in spans:
        low = text[a:b].lower()
        pieces += [text[cursor:a], low]
        low_spans.append((a + shift, a + shift + len(low)))
        if len(low) != b - a:
            grown.append((a, b))
        shift += len(low) - (b - a)
        cursor = b
    pieces.append(text[cursor:])
    lowered = "".join(pieces)
    if not grown:
        return lowered, low_spans, None
    lengths = np.ones(len(text), dtype=np.int64)
    for a, b in grown:
        lengths[a:b] = [len(c.lower()) for c in text[a:b]]
    return lowered, low_spans, np.repeat(np.arange(len(text), dtype=np.int64), lengths)


def find_terms(
    text: str, spans: list[tuple[int, int]], pattern: str = WORD_PATTERN
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's analyzer on the document made of `spans` (sorted, disjoint): each span lower-cased
    and split by `pattern` on its own (its one capturing group, if any, is the term; empty matches are
    no terms).  Returns every term occurrence's start and end in `text` (the original characters
    its lower-cased form came from) and the terms, in order."""
    lowered, starts, ends, back = _term_positions(text, spans, pattern)
    terms = [lowered[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
    return (*_original_positions(starts, ends, back), terms)


def _term_positions(text: str, spans: list[tuple[int, int]], pattern: str):
    """find_terms' matches: (the lower-cased text, term starts and ends in it, the map back to `text` or None)."""
    lowered, low_spans, back = _lower_spans(text, spans)
    run = _FAST_RUNS.get(pattern)
    if run:
        starts, ends = _word_runs(lowered, low_spans, run)
    else:
        regex = _compiled(pattern)
        group = 1 if regex.groups else 0
        found = [(a + m.start(group), a + m.end(group)) for a, b in low_spans for m in regex.finditer(lowered[a:b])]
        found = [(x, y) for x, y in found if y > x]
        starts = np.array([f[0] for f in found], dtype=np.int64)
        ends = np.array([f[1] for f in found], dtype=np.int64)
    return lowered, starts, ends, back


def _original_positions(starts: np.ndarray, ends: np.ndarray, back: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if back is not None and len(starts):
        return back[starts], back[ends - 1] + 1
    return starts, ends


def _slices(text: str, starts: np.ndarray, ends: np.ndarray) -> pa.Array | None:
    """text[a:b] for every (a, b) as one Arrow string array, cut from the UTF-8 bytes with NumPy (no Python
    string per term); None when the text cannot be UTF-8 encoded (a lone surrogate)."""
    try:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    except UnicodeEncodeError:
        return None
    if len(data) == len(text):  # ASCII: byte positions are character positions
        b_start, b_end = starts, ends
    else:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        width = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
        at = np.zeros(len(codes) + 1, dtype=np.int64)
        np.cumsum(width, out=at[1:])
        b_start, b_end = at[starts], at[ends]
    lengths = b_end - b_start
    out = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    gather = np.arange(int(out[-1]), dtype=np.int64) - np.repeat(out[:-1] - b_start, lengths)
    return pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(out), pa.py_buffer(data[gather].tobytes()))


def token_word_index(
    word_starts: np.ndarray, word_ends: np.ndarray, tok_starts: np.ndarray, tok_ends: np.ndarray
) -> np.ndarray:
    """Index of the word each token belongs to, -1 for none (words sorted and disjoint, as word_bounds gives).

    Rule: the first word that ends after the token starts; the token belongs to it if they overlap
    (a token that straddles two words belongs to the first)."""
    tok_starts = np.asarray(tok_starts, dtype=np.int64)
    first = np.searchsorted(word_ends, tok_starts, side="right")
    ok = first < len(word_ends)
    ok[ok] &= word_starts[first[ok]] < np.asarray(tok_ends, dtype=np.int64)[ok]
    return np.where(ok, first, -1)


@functools.lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"The TF-IDF token pattern {pattern!r} is not a valid regular expression ({exc}).") from None
    if regex.groups > 1:
        raise ConfigError(
            f"The TF-IDF token pattern {pattern!r} has {regex.groups} capturing groups; scikit-learn allows at "
            "most one."
        )
    return regex


@dataclass
class Terms:
    """Per record (Arrow list layout): its distinct terms, their counts, and for every token the
    index of its term in the record's term list (-1: no term)."""

    terms: pa.ListArray  # list<string>
    counts: pa.ListArray  # list<int32>
    token_term: pa.ListArray  # list<int32>, aligned with input_ids


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _list(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _group_terms(rec: np.ndarray, term: np.ndarray, n: int):
    """Occurrences (record, global term id) -> distinct terms per record, their counts, the
    record-local index of every occurrence, and the record offsets of the term lists."""
    width = int(term.max()) + 1 if len(term) else 1
    uniq, inverse, counts = np.unique(rec * width + term, return_inverse=True, return_counts=True)
    u_rec, u_term = uniq // width, uniq % width
    offsets = _offsets(np.bincount(u_rec, minlength=n))
    local = np.arange(len(uniq)) - offsets[u_rec]
    return u_term, counts.astype(np.int32), local[inverse.reshape(-1)], offsets


def extract_batch(
    texts: list[str],
    content_spans: list[list[tuple[int, int]]],
    offsets: list[np.ndarray],
    loss_masks: list[np.ndarray],
    input_ids: list[np.ndarray],
    unit: str = "word",
    pattern: str = WORD_PATTERN,
) -> Terms:
    """Terms of many responses at once (vectorised over the batch; Python work is one dict lookup per word)."""
    n = len(texts)
    tok_offsets = _offsets(np.fromiter((len(m) for m in loss_masks), dtype=np.int64, count=n))
    mask = np.concatenate(loss_masks) if n else np.zeros(0, np.int8)
    token_term = np.full(len(mask), -1, dtype=np.int32)
    sup = np.flatnonzero(mask)
    tok_rec = np.repeat(np.arange(n), np.diff(tok_offsets))
    if unit == "token":
        ids = np.concatenate(input_ids).astype(np.int64) if n else np.zeros(0, np.int64)
        u_term, counts, local, term_offsets = _group_terms(tok_rec[sup], ids[sup], n)
        token_term[sup] = local
        flat_terms = pa.array(u_term).cast(pa.string())
    else:
        base = _offsets(np.fromiter((len(t) for t in texts), dtype=np.int64, count=n))
        joined = "".join(texts)
        spans = [(a + int(base[r]), b + int(base[r])) for r, sp in enumerate(content_spans) for a, b in sp]
        lowered, l_starts, l_ends, back = _term_positions(joined, spans, pattern)
        starts, ends = _original_positions(l_starts, l_ends, back)
        words = _slices(lowered, l_starts, l_ends)
        if words is None:  # not UTF-8 encodable: one Python string per term
            words = pa.array([lowered[a:b] for a, b in zip(l_starts.tolist(), l_ends.tolist())], pa.large_string())
        coded = words.dictionary_encode()  # ids in order of first occurrence
        gid = coded.indices.to_numpy().astype(np.int64)
        word_rec = np.searchsorted(base, starts, side="right") - 1
        u_term, counts, word_local, term_offsets = _group_terms(word_rec, gid, n)
        flat_terms = coded.dictionary.take(pa.array(u_term, pa.int64())).cast(pa.string())
        if len(words):
            all_off = np.concatenate(offsets).astype(np.int64) + base[:-1][tok_rec][:, None]
            word = token_word_index(starts, ends, all_off[sup, 0], all_off[sup, 1])
            ok = word >= 0
            token_term[sup[ok]] = word_local[word[ok]]
    return Terms(
        _list(term_offsets, flat_terms),
        _list(term_offsets, pa.array(counts, pa.int32())),
        _list(tok_offsets, pa.array(token_term, pa.int32())),
    )


def extract(text, content_spans, offsets, loss_mask, input_ids, unit="word", pattern=WORD_PATTERN):
    """One record: (terms, counts, token_term) as Python list / NumPy arrays (for tests and tools)."""
    t = extract_batch([text], [content_spans], [offsets], [loss_mask], [input_ids], unit, pattern)
    return t.terms[0].as_py(), t.counts[0].values.to_numpy(), t.token_term[0].values.to_numpy()


def document_freq(terms: pa.ListArray) -> pa.Table:
    """(term, df) for a partition: in how many of its documents each term occurs (terms are distinct per record)."""
    table = pa.table({"term": terms.flatten()}).group_by("term").aggregate([("term", "count")])
    return table.rename_columns(["term", "df"]).cast(pa.schema([("term", pa.string()), ("df", pa.int64())]))


def fit_idf(df_tables: list[pa.Table], n_docs: int) -> pa.Table:
    """Sum partition document frequencies and compute smooth IDF; sorted by term (deterministic)."""
    merged = pa.concat_tables(df_tables).group_by("term").aggregate([("df", "sum")])
    merged = merged.rename_columns(["term", "df"]).sort_by("term")
    df = merged.column("df").to_numpy()
    idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    return pa.table({"term": merged.column("term"), "df": merged.column("df"), "idf": pa.array(idf, pa.float64())})


def save_idf(table: pa.Table, path: str) -> None:
    pq.write_table(table, path, compression="zstd")


@functools.lru_cache(maxsize=2)
def load_idf(path: str, sha256: str | None = None) -> pa.Table:
    """Read idf.parquet once per process (the sha256 argument keys the cache)."""
    return pq.read_table(path)


def score(terms: pa.ListArray, counts: pa.ListArray, token_term: pa.ListArray, idf: pa.Table) -> pa.ListArray:
    """float32 importance per token for a whole partition (list arrays aligned by row)."""
    flat_terms = terms.flatten()
    pos = pc.index_in(flat_terms, value_set=idf.column("term")).to_numpy(zero_copy_only=False)
    if len(pos) and np.isnan(pos.astype(float)).any():
        raise ShardError("A term is missing from the fitted IDF; the IDF does not belong to these shards.")
    weights = counts.flatten().to_numpy().astype(np.float64) * idf.column("idf").to_numpy()[pos.astype(np.int64)]
    term_row = pc.list_parent_indices(terms).to_numpy()
    norms = np.sqrt(np.bincount(term_row, weights=weights * weights, minlength=len(terms)))
    weights = weights / np.where(norms > 0, norms, 1.0)[term_row]
    tt = token_term.flatten().to_numpy()
    term_offsets = terms.offsets.to_numpy()
    term_base = term_offsets[:-1] - term_offsets[0]
    tok_row = pc.list_parent_indices(token_term).to_numpy()
    glob = term_base[tok_row] + tt
    values = np.where(tt >= 0, weights[np.where(tt >= 0, glob, 0)] if len(weights) else 0.0, 0.0).astype(np.float32)
    tok_offsets = token_term.offsets.to_numpy()
    return pa.ListArray.from_arrays(pa.array(tok_offsets - tok_offsets[0], pa.int32()), pa.array(values, pa.float32()))


# --- strategy plug-in (grouping/registry.py)
class TfidfStrategy:
    """Importance = TF-IDF of the token's word (or id); the IDF is fitted over the whole corpus."""

    name = "tfidf"
    artifacts = (IDF_FILE,)

    def params(self, cfg) -> dict:
        return {"unit": cfg.tfidf_unit, "token_pattern": cfg.tfidf_token_pattern}

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict:
        t = extract_batch(
            cols["text"],
            cols["spans"],
            cols["offsets"],
            cols["loss_mask"],
            cols["input_ids"],
            cfg.tfidf_unit,
            cfg.tfidf_token_pattern,
        )
        return {"tfidf_terms": t.terms, "tfidf_counts": t.counts, "tfidf_token_term": t.token_term}

    def partition_stats(self, staged: pa.Table) -> pa.Table:
        return document_freq(staged["tfidf_terms"].combine_chunks())

    def fit(self, stats: list[pa.Table], documents: int, folder: str) -> dict:
        """Write idf.parquet into `folder`; its manifest entry."""
        from sftgo.core.fileio import atomic_write, file_sha256

        table = fit_idf(stats, documents)
        if not table.num_rows:  # scikit-learn's "empty vocabulary": every token would score 0, one group
            raise ConfigError(
                f"The TF-IDF vocabulary is empty: the token pattern (--tfidf-token-pattern) finds no "
                f"term in any of the {documents} responses; give a pattern that matches their words "
                "(the default needs words of 2 or more characters; e.g. --tfidf-token-pattern "
                "'(?u)\\b\\w+\\b'), or --tfidf-unit token."
            )
        path = Path(folder) / IDF_FILE
        atomic_write(path, lambda tmp: save_idf(table, tmp))
        return {"idf": {"path": IDF_FILE, "sha256": file_sha256(path), "documents": documents}}

    def importance(self, staged: pa.Table, artifacts: dict, folder: str) -> pa.ListArray:
        idf = artifacts["idf"]
        return score(
            staged["tfidf_terms"].combine_chunks(),
            staged["tfidf_counts"].combine_chunks(),
            staged["tfidf_token_term"].combine_chunks(),
            load_idf(str(Path(folder) / idf["path"]), idf["sha256"]),
        )


STRATEGY = TfidfStrategy()
