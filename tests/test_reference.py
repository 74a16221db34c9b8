"""Reference-model importance: batching, bucketing, tokenizer alignment, excess mode, and equality
with the per-token loss computed directly with transformers on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftgo.grouping import reference
from sftgo.grouping.reference import ReferenceConfig, ReferenceScorer, buckets
from sftgo.grouping.semantic import packaged_encoder_dir
from sftgo.pipeline.chat import ChatEncoder


def _load_generate():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "sftgo_data_generate", Path(__file__).resolve().parents[1] / "data" / "generate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.generate


generate = _load_generate()


@pytest.fixture(scope="module")
def ref_dir(tiny_lm):
    return tiny_lm(0)


@pytest.fixture(scope="module")
def base_dir(tiny_lm):
    return tiny_lm(1)


@pytest.fixture(scope="module")
def bert_tok_dir(tiny_lm):
    """A tiny causal LM whose tokenizer is MiniLM's WordPiece (a different fast tokenizer)."""
    from transformers import AutoTokenizer

    return tiny_lm(2, AutoTokenizer.from_pretrained(packaged_encoder_dir()))


@pytest.fixture(scope="module")
def samples(tokenizer):
    convs = [r["messages"] for r in generate(10, seed=3, kind="chat")]
    encs = ChatEncoder(tokenizer, max_length=384).encode_batch(convs)
    assert len({len(e.input_ids) for e in encs}) > 3  # varied lengths, so bucketing reorders
    return encs


def run(scorer, encs):
    return scorer.score(
        [e.input_ids for e in encs], [e.loss_mask for e in encs], [e.text for e in encs], [e.offsets for e in encs]
    )


def test_buckets_cover_all_and_respect_budget():
    lengths = [5, 40, 12, 40, 7, 100, 3, 33]
    for budget in (1, 50, 100, 120, 10_000):
        bs = buckets(lengths, budget)
        assert sorted(i for b in bs for i in b) == list(range(len(lengths)))
        for b in bs:
            longest = max(lengths[i] for i in b)
            assert len(b) == 1 or len(b) * longest <= budget
            assert lengths[b[0]] == longest
    assert buckets(lengths, 10_000) == [[5, 1, 3, 7, 2, 4, 0, 6]]


def test_batched_equals_one_at_a_time_in_input_order(ref_dir, tokenizer, samples):
    batched = ReferenceScorer(ReferenceConfig(model=ref_dir, batch_tokens=1500), tokenizer)
    assert batched.reference.same_vocab and batched.device.type == "cpu" and batched.dtype == torch.float32
    got = run(batched, samples)
    assert len(buckets([len(e.input_ids) for e in samples], 1500)) < len(samples)  # really several rows per batch
    for e, g in zip(samples, got):
        alone = run(batched, [e])[0]  # one sample, its own batch
        assert g.dtype == np.float32 and g.shape == e.input_ids.shape
        np.testing.assert_allclose(g, alone, atol=1e-5, rtol=0)
        assert (g[e.loss_mask == 0] == 0).all() and g[0] == 0
        assert (g[e.loss_mask == 1] > 0).all()
    one = run(ReferenceScorer(ReferenceConfig(model=ref_dir, batch_tokens=1), tokenizer), samples)
    for g, o in zip(got, one):
        np.testing.assert_allclose(g, o, atol=1e-5, rtol=0)


def direct_ce(model, ids) -> np.ndarray:
    """Per-token CE computed directly with transformers: position t scored from the logits at t-1."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    ce = F.cross_entropy(logits[:-1], torch.as_tensor(ids[1:], dtype=torch.long), reduction="none")
    return np.concatenate([[0.0], ce.numpy()])


def test_excess_is_base_minus_reference(ref_dir, base_dir, tokenizer, samples):
    from sftgo.core.models import load_causal_lm

    enc = samples[:4]
    excess = run(ReferenceScorer(ReferenceConfig(model=ref_dir, mode="excess", base_model=base_dir), tokenizer), enc)
    ref_m, base_m = load_causal_lm(ref_dir), load_causal_lm(base_dir)
    for e, x in zip(enc, excess):
        want = np.where(e.loss_mask == 1, direct_ce(base_m, e.input_ids) - direct_ce(ref_m, e.input_ids), 0.0)
        np.testing.assert_allclose(x, want, atol=1e-4, rtol=0)
        assert (x < 0).any() and (x > 0).any()
    with pytest.raises(ValueError, match="base model"):
        ReferenceScorer(ReferenceConfig(model=ref_dir, mode="excess"), tokenizer)
    with pytest.raises(ValueError, match="mode"):
        ReferenceScorer(ReferenceConfig(model=ref_dir, mode="rho"), tokenizer)


def test_alignment_path_equals_fast_path_on_identical_tokenization(ref_dir, tokenizer, samples, monkeypatch):
    fast = run(ReferenceScorer(ReferenceConfig(model=ref_dir), tokenizer), samples)
    prints = iter(range(10**6))
    monkeypatch.setattr(reference.models, "tokenizer_fingerprint", lambda tok: str(next(prints)))  # never equal
    aligned = ReferenceScorer(ReferenceConfig(model=ref_dir, batch_tokens=700), tokenizer)
    assert not aligned.reference.same_vocab
    for f, a in zip(fast, run(aligned, samples)):
        np.testing.assert_allclose(a, f, atol=1e-5, rtol=0)


def test_different_tokenizer_aligned_by_characters(bert_tok_dir, tokenizer, samples):
    from transformers import AutoTokenizer

    from sftgo.core.models import load_causal_lm

    enc = samples[:5]
    scorer = ReferenceScorer(ReferenceConfig(model=bert_tok_dir, batch_tokens=900), tokenizer)
    assert not scorer.reference.same_vocab
    got = run(scorer, enc)
    bert = AutoTokenizer.from_pretrained(bert_tok_dir)
    model = load_causal_lm(bert_tok_dir)
    for e, g in zip(enc, got):
        assert (g[e.loss_mask == 0] == 0).all() and np.isfinite(g).all()
        # the model's own tokens and their CE, computed directly
        be = bert(e.text, add_special_tokens=False, return_offsets_mapping=True)
        ce = direct_ce(model, be["input_ids"])
        moff = np.array(be["offset_mapping"])
        # rule: each model token's CE spread over its characters; a pipeline token sums its characters
        for t in np.flatnonzero(e.loss_mask)[:60]:
            a, b = e.offsets[t]
            want = sum(c * max(0, min(b, me) - max(a, ms)) / (me - ms) for c, (ms, me) in zip(ce, moff) if me > ms)
            assert abs(g[t] - want) < 1e-4, (t, g[t], want)
        # conservation: a supervised word fully inside the response carries its model tokens' whole loss
        assert g[e.loss_mask == 1].sum() > 0


def test_slow_tokenizer_refused(tmp_path, tokenizer, tiny_lm):
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy(str(packaged_encoder_dir()) + "/vocab.txt")
    assert not slow.is_fast
    path = tiny_lm(0, slow)
    with pytest.raises(ValueError, match="slow tokenizer without character offsets"):
        ReferenceScorer(ReferenceConfig(model=path), tokenizer)


def test_threads_follow_omp_num_threads(ref_dir, tokenizer, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        ReferenceScorer(ReferenceConfig(model=ref_dir), tokenizer)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_embedded_reference_equals_direct_transformers_loss(tokenizer):
    from sftgo.core.models import load_causal_lm

    convs = [r["messages"] for r in generate(2, seed=11, kind="chat")]
    convs.append(
        [
            {"role": "user", "content": "Who designed the Varnish Tower?"},
            {"role": "assistant", "content": "The Varnish Tower was designed by the architect Idris Pellow."},
        ]
    )
    encs = ChatEncoder(tokenizer, max_length=128).encode_batch(convs)  # truncated: a forward is slow on 2 cores
    scorer = ReferenceScorer(ReferenceConfig(), tokenizer)  # the embedded SmolLM2-135M-Instruct
    assert scorer.reference.same_vocab
    got = run(scorer, encs)
    model = load_causal_lm(None, dtype=torch.float32)
    for e, g in zip(encs, got):
        want = np.where(e.loss_mask == 1, direct_ce(model, e.input_ids), 0.0)
        np.testing.assert_allclose(g, want, atol=2e-4, rtol=1e-5)
