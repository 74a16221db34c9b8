"""Per-strategy hooks shared by `build` and `score`: what each strategy stages in pass 1, what it
fits between the passes, and how pass 2 turns the staged columns into importance scores.

Input: the in-memory columns of a partition (ids, masks, rendered texts, character offsets,
content spans) and the build parameters.
Output: staged Arrow columns (pass 1), fitted artifacts (tfidf only: idf.parquet), and a
float32 importance list column per strategy (pass 2).
Cost: tfidf is linear in tokens; reference and semantic run a model over every staged
token (no grad, batched), once per record, loaded once per worker process.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa

from sftgo.grouping import tfidf

NEEDS_FIT = {"tfidf"}


def list_column(arrays: list[np.ndarray], type_: pa.DataType) -> pa.ListArray:
    """A list<type_> column from per-row NumPy arrays in one copy."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


def scorer_params(strategy: str, params: dict) -> dict:
    """The parameters that determine a model strategy's scores (recorded in the manifest)."""
    if strategy == "reference":
        return {
            "model": params["reference_model"],
            "mode": params["reference_mode"],
            "base_model": params["base_model"],
            "batch_tokens": params["score_batch_tokens"],
        }
    if strategy == "semantic":
        return {"compressor_model": params["compressor_model"], "encoder": params["semantic_encoder"]}
    return {}


@functools.lru_cache(maxsize=2)
def _scorer(strategy: str, key: str, tokenizer_location: str, trust_remote_code: bool):
    """One model-backed scorer per worker process (key: its parameters as JSON)."""
    cfg = json.loads(key)
    if strategy == "reference":
        from sftgo.grouping.reference import ReferenceConfig, ReferenceScorer
        from sftgo.core import models

        return ReferenceScorer(
            ReferenceConfig(cfg["model"], cfg["mode"], cfg["base_model"], cfg["batch_tokens"], trust_remote_code=trust_remote_code),
            models.load_tokenizer(tokenizer_location, trust_remote_code),
        )
    from sftgo.grouping.semantic import SemanticConfig, SemanticScorer

    return SemanticScorer(SemanticConfig(compressor_model=cfg["compressor_model"], encoder=cfg["encoder"]))


def stage(strategy: str, cols: dict, params: dict, tokenizer_location: str) -> dict[str, pa.Array]:
    """Pass 1: the staged columns of one strategy for a partition held in memory."""
    if strategy == "tfidf":
        t = tfidf.extract_batch(
            cols["text"], cols["spans"], cols["offsets"], cols["loss_mask"], cols["input_ids"],
            params["tfidf_unit"], params["tfidf_token_pattern"],
        )
        return {"tfidf_terms": t.terms, "tfidf_counts": t.counts, "tfidf_token_term": t.token_term}
    key = json.dumps(scorer_params(strategy, params), sort_keys=True)
    scorer = _scorer(strategy, key, tokenizer_location, params["trust_remote_code"])
    if strategy == "reference":
        scores = scorer.score(cols["input_ids"], cols["loss_mask"], cols["text"], cols["offsets"])
    else:
        scores = scorer.score(cols["text"], cols["spans"], cols["offsets"], cols["loss_mask"])
    return {f"importance_{strategy}": list_column([np.asarray(s, np.float32) for s in scores], pa.float32())}


def importance(strategy: str, staged: pa.Table, artifacts: dict) -> pa.ListArray:
    """Pass 2: float32 importance per token for a staged partition."""
    if strategy == "tfidf":
        return tfidf.score(
            staged["tfidf_terms"].combine_chunks(),
            staged["tfidf_counts"].combine_chunks(),
            staged["tfidf_token_term"].combine_chunks(),
            tfidf.load_idf(artifacts["tfidf"]["path"], artifacts["tfidf"]["sha256"]),
        )
    return staged[f"importance_{strategy}"].combine_chunks()


def manifest_entry(strategy: str, params: dict, artifacts: dict, documents: int) -> dict:
    entry = {"eta": params["eta"], "num_groups": params["num_groups"]}
    if strategy == "tfidf":
        entry.update(
            unit=params["tfidf_unit"],
            token_pattern=params["tfidf_token_pattern"],
            idf={"path": tfidf.IDF_FILE, "sha256": artifacts["tfidf"]["sha256"], "documents": documents},
        )
    else:
        entry.update(scorer_params(strategy, params))
    return entry
