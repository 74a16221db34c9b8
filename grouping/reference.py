"""Reference-model importance: each supervised token's loss under a reference causal LM.

Input: per sample the pipeline's token ids, loss mask, rendered text and token character
offsets (pipeline.chat.Encoded), plus a ReferenceConfig naming the reference LM (default:
the embedded SmolLM2-135M-Instruct; any hub id, local dir or .gguf).
Output: per sample a float32 array [T]: mode "loss" -> the reference model's cross-entropy
of token t given tokens < t; mode "excess" (Rho-1) -> base CE - reference CE.  0.0 where
loss_mask == 0 and for the very first token (nothing to predict it from).
Cost: one no-grad forward per model over the samples (length-bucketed, padded rows x
longest length <= batch_tokens per batch); the LM head and the softmax are computed only
at the positions that predict a needed token, in chunks, so memory stays at about
batch_tokens x hidden plus a bounded [chunk, vocab] block instead of [batch_tokens, vocab].

Tokenizers.  When the model's tokenizer has the pipeline tokenizer's fingerprint
(sftgo.core.models.tokenizer_fingerprint) the pipeline ids are fed directly (fast path).
Otherwise the rendered text is re-tokenized with the model's own (fast) tokenizer, without
adding special tokens (the text is already chat-rendered), each model token's CE is
computed, and **each model token's loss is spread over the characters it covers and every
pipeline token receives the sum over its characters** -- i.e. a model token overlapping
several pipeline tokens splits its loss among them in proportion to the shared characters,
and a pipeline token overlapping several model tokens gets the (proportional) sum.  The
total loss over a span is conserved, and with identical tokenizations the result equals the
fast path.  A model whose tokenizer is not fast (no offsets) is refused with ValueError.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sftgo.core import models, shards
from sftgo.core.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("loss", "excess")
_HEAD_CHUNK_ELEMENTS = 1 << 25  # logits elements per LM-head chunk (128 MiB in fp32)


@dataclass
class ReferenceConfig:
    model: str | None = None  # reference LM: None = embedded SmolLM2-135M-Instruct; hub id, local dir or .gguf
    mode: str = "loss"  # "loss": score = reference per-token CE; "excess": score = base CE - reference CE (Rho-1)
    base_model: str | None = None  # required for mode="excess"
    batch_tokens: int = 8192  # token budget per forward batch (padded rows x longest length)
    device: str = "auto"  # auto: cuda if available else cpu
    dtype: str = "auto"  # auto: bf16 on CUDA that supports it, else fp32
    trust_remote_code: bool = False


def pick_device(device: str):
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device):
    import torch

    if dtype in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ConfigError(f"dtype must be auto or one of {sorted(names)}, got {dtype!r}.")
    return names[dtype]


def set_threads_from_env() -> None:
    """Respect OMP_NUM_THREADS (Dask workers set it to 1) so workers do not oversubscribe the cores."""
    n = os.environ.get("OMP_NUM_THREADS", "").strip()
    if n.isdigit() and int(n) > 0:
        import torch

        if torch.get_num_threads() != int(n):
            torch.set_num_threads(int(n))


def buckets(lengths, batch_tokens: int) -> list[list[int]]:
    """Length bucketing: indices sorted by length (longest first, stable), packed greedily into
    batches with rows x longest length <= batch_tokens (a longer sample goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = int(lengths[cur[0]]) if cur else int(lengths[i])
        if cur and (len(cur) + 1) * longest > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class _LM:
    """One causal LM with the means to score pipeline samples (fast path or character alignment)."""

    def __init__(self, name: str | None, pipeline_tokenizer, device, dtype, trust_remote_code: bool, role: str):
        import torch

        self.name = name or models.EMBEDDED
        self.role = role
        self.model = models.load_causal_lm(name, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        tok = self._load_tokenizer(name, trust_remote_code)
        self.same_vocab = models.tokenizer_fingerprint(tok) == models.tokenizer_fingerprint(pipeline_tokenizer)
        self.backend = None
        if not self.same_vocab:
            # our own copy of the Rust tokenizer without the truncation/padding some tokenizer.json files enable
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) and pad >= 0 else 0
        self.head = self.model.get_output_embeddings()
        self.decoder = getattr(self.model, self.model.base_model_prefix, None)
        self.split_head = self.decoder is not None and self.head is not None and self._check_split_head(torch)
        log.info(
            "%s model %s: %s, device %s, dtype %s, %s",
            role,
            self.name,
            "same vocabulary as the pipeline (ids used directly)"
            if self.same_vocab
            else "own tokenizer (aligned by character offsets)",
            device,
            dtype,
            "chunked LM head" if self.split_head else "full logits",
        )

    def _load_tokenizer(self, name, trust_remote_code):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(models.tokenizer_dir(name), trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise models.ModelNotFound(
                f"Cannot load the tokenizer of {self.name!r}: {str(exc).splitlines()[0]}"
            ) from None
        if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
            raise ConfigError(
                f"The {self.role} model {self.name!r} has a slow tokenizer without character offsets, so its tokens "
                "cannot be aligned with the pipeline's; use a model that ships a fast tokenizer (tokenizer.json)."
            )
        return tok

    def _check_split_head(self, torch) -> bool:
        """Hidden states of the base model + the output embedding must reproduce model(...).logits
        (models with extra logit post-processing, e.g. soft-capping, fall back to full logits)."""
        ids = torch.arange(1, 9, device=self.device).remainder(self.head.weight.shape[0]).unsqueeze(0)
        with torch.inference_mode():
            full = self.model(input_ids=ids).logits.float()
            split = self.head(self.decoder(input_ids=ids).last_hidden_state).float()
        return full.shape == split.shape and torch.allclose(full, split, atol=1e-4, rtol=1e-4)

    # -- per-sample token streams -------------------------------------------------------------------
    def streams(self, input_ids, loss_mask, texts, offsets):
        """Per sample: (ids fed to this model, bool mask of positions whose CE is needed, alignment info)."""
        if self.same_vocab:
            return [(np.asarray(i, dtype=np.int64), np.asarray(m) != 0, None) for i, m in zip(input_ids, loss_mask)]
        out = []
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        for enc, m, off in zip(encs, loss_mask, offsets):
            ids = np.asarray(enc.ids, dtype=np.int64)
            moff = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            sup = np.asarray(off, dtype=np.int64)[np.asarray(m) != 0]
            # characters covered by supervised pipeline tokens; a model token is needed if it covers one
            n_chars = int(max(moff[:, 1].max(initial=0), sup[:, 1].max(initial=0))) + 1
            diff = np.zeros(n_chars + 1, dtype=np.int64)
            np.add.at(diff, sup[:, 0], 1)
            np.add.at(diff, sup[:, 1], -1)
            covered = np.concatenate([[0], np.cumsum(np.cumsum(diff)[:n_chars] > 0)])
            need = covered[moff[:, 1]] - covered[moff[:, 0]] > 0
            out.append((ids, need, moff))
        return out

    # -- forward ------------------------------------------------------------------------------------
    def token_ce(self, streams, batch_tokens: int) -> list[np.ndarray]:
        """CE of each needed position (t >= 1) of each stream, float64 [len], 0 elsewhere; input order kept."""
        import torch
        import torch.nn.functional as F

        results: list[np.ndarray | None] = [None] * len(streams)
        for batch in buckets([len(s[0]) for s in streams], batch_tokens):
            longest = len(streams[batch[0]][0])
            ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), longest), dtype=torch.long)
            need = torch.zeros((len(batch), longest), dtype=torch.bool)
            for r, i in enumerate(batch):
                x, m, _ = streams[i]
                ids[r, : len(x)] = torch.from_numpy(x)
                attn[r, : len(x)] = 1
                need[r, : len(x)] = torch.from_numpy(m)
            need[:, 0] = False  # the first token has no context
            ids, attn, need = ids.to(self.device), attn.to(self.device), need.to(self.device)
            ce = torch.zeros((len(batch), longest), dtype=torch.float64, device=self.device)
            with torch.inference_mode():
                rows, cols = need.nonzero(as_tuple=True)
                if self.split_head:
                    hidden = self.decoder(input_ids=ids, attention_mask=attn).last_hidden_state
                    h = hidden[rows, cols - 1]
                    targets = ids[rows, cols]
                    vocab = self.head.weight.shape[0]
                    step = max(1, _HEAD_CHUNK_ELEMENTS // vocab)
                    vals = [
                        F.cross_entropy(self.head(h[a : a + step]).float(), targets[a : a + step], reduction="none")
                        for a in range(0, len(rows), step)
                    ]
                    if vals:
                        ce[rows, cols] = torch.cat(vals).double()
                else:
                    logits = self.model(input_ids=ids, attention_mask=attn).logits
                    if len(rows):
                        ce[rows, cols] = F.cross_entropy(
                            logits[rows, cols - 1].float(), ids[rows, cols], reduction="none"
                        ).double()
            ce = ce.cpu().numpy()
            for r, i in enumerate(batch):
                results[i] = ce[r, : len(streams[i][0])]
        return results  # type: ignore[return-value]

    def score(self, input_ids, loss_mask, texts, offsets, batch_tokens: int) -> list[np.ndarray]:
        """float64 per pipeline token (0 where not supervised)."""
        streams = self.streams(input_ids, loss_mask, texts, offsets)
        ces = self.token_ce(streams, batch_tokens)
        if self.same_vocab:
            return ces
        return [
            _spread(ce, s[2], np.asarray(off, dtype=np.int64), np.asarray(m) != 0)
            for ce, s, off, m in zip(ces, streams, offsets, loss_mask)
        ]


def _spread(model_ce: np.ndarray, model_offsets: np.ndarray, offsets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each model token's CE spread evenly over its characters; each pipeline token gets the sum over its characters."""
    n_chars = int(max(model_offsets[:, 1].max(initial=0), offsets[:, 1].max(initial=0))) + 1
    width = model_offsets[:, 1] - model_offsets[:, 0]
    live = width > 0  # zero-width model tokens cover no character: their loss is not attributed
    density = np.zeros(n_chars + 1, dtype=np.float64)
    d = model_ce[live] / width[live]
    np.add.at(density, model_offsets[live, 0], d)
    np.add.at(density, model_offsets[live, 1], -d)
    per_char = np.cumsum(density)[:n_chars]
    cum = np.concatenate([[0.0], np.cumsum(per_char)])
    out = cum[offsets[:, 1]] - cum[offsets[:, 0]]
    return np.where(mask, out, 0.0)


class ReferenceScorer:
    """Loads the reference (and, for mode "excess", the base) model once; score() many times."""

    def __init__(self, cfg: ReferenceConfig, tokenizer):
        if cfg.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {cfg.mode!r}.")
        if cfg.mode == "excess" and not cfg.base_model:
            raise ConfigError(
                "mode 'excess' needs a base model (--base-model): the score is base loss minus reference loss."
            )
        if cfg.batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be positive, got {cfg.batch_tokens}.")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("The pipeline tokenizer must be a fast tokenizer (character offsets are needed).")
        set_threads_from_env()
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        log.info("reference scoring on %s with %s (torch threads %d)", self.device, self.dtype, _threads())
        self.reference = _LM(cfg.model, tokenizer, self.device, self.dtype, cfg.trust_remote_code, "reference")
        self.base = (
            _LM(cfg.base_model, tokenizer, self.device, self.dtype, cfg.trust_remote_code, "base")
            if cfg.mode == "excess"
            else None
        )

    def score(
        self, input_ids: list[np.ndarray], loss_mask: list[np.ndarray], texts: list[str], offsets: list[np.ndarray]
    ) -> list[np.ndarray]:
        """float32 per token, 0.0 where loss_mask == 0; results in the input order."""
        if not (len(input_ids) == len(loss_mask) == len(texts) == len(offsets)):
            raise ValueError("input_ids, loss_mask, texts and offsets must have one entry per sample.")
        bt = self.cfg.batch_tokens
        ref = self.reference.score(input_ids, loss_mask, texts, offsets, bt)
        if self.base is not None:
            base = self.base.score(input_ids, loss_mask, texts, offsets, bt)
            ref = [b - r for b, r in zip(base, ref)]
        return [np.where(np.asarray(m) != 0, s, 0.0).astype(np.float32) for s, m in zip(ref, loss_mask)]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --- strategy plug-in (grouping/registry.py)
@functools.lru_cache(maxsize=2)
def _scorer(key: tuple, tokenizer_location: str) -> ReferenceScorer:
    """One scorer per worker process and setting (the models load once)."""
    model, mode, base_model, batch_tokens, trust_remote_code = key
    tok = models.load_tokenizer(tokenizer_location, trust_remote_code)
    return ReferenceScorer(
        ReferenceConfig(model, mode, base_model, batch_tokens, trust_remote_code=trust_remote_code), tok
    )


class ReferenceStrategy:
    """Importance = a reference LM's loss per token (or Rho-1's excess loss); no corpus fit."""

    name = "reference"
    accelerator = True  # stage() runs the reference model: on GPU workers when the cluster has them (pipeline/gpus.py)

    def params(self, cfg) -> dict:
        return {
            "model": cfg.reference_model,
            "mode": cfg.reference_mode,
            "base_model": cfg.base_model,
            "batch_tokens": cfg.score_batch_tokens,
        }

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict:
        key = (cfg.reference_model, cfg.reference_mode, cfg.base_model, cfg.score_batch_tokens, cfg.trust_remote_code)
        scores = _scorer(key, tokenizer).score(cols["input_ids"], cols["loss_mask"], cols["text"], cols["offsets"])
        return {shards.importance_column(self.name): shards.list_column(scores, pa.float32())}

    def importance(self, staged, artifacts: dict, folder: str):
        return staged[shards.importance_column(self.name)].combine_chunks()


STRATEGY = ReferenceStrategy()
