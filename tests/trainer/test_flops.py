"""The MFU formula (sftgo.trainer.flops) against torch.utils.flop_counter on real transformers models.

FlopCounterMode counts the FLOPs of every matmul aten runs (mm, addmm, bmm, attention kernels), forward
and backward.  The formula with the full-square attended length (causal=False) must match it: attention
computed eagerly is Q K^T and P V over the whole [n, n] square, masked afterwards, and that is what any
attention kernel is counted as.  Tolerance 1e-3 relative: the formula leaves out the rotary embedding's
frequency outer product, a [head_dim / 2, 1] x [1, n] bmm per sequence (head_dim FLOPs per token, forward
only), against at least 6 N (> 10^5) per token here; addmm's bias add is not counted by either.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sftgo.trainer import flops

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
    vocab_size=320,
    max_position_embeddings=256,
)

# The published shapes the GPU benchmark trains (built on the meta device: no memory, no download).
PUBLISHED = {
    "llama-3.2-1b": (LlamaConfig, dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                       num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                       tie_word_embeddings=True), 1_235_814_400),
    "qwen2.5-1.5b": (Qwen2Config, dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                       num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                       tie_word_embeddings=True), 1_543_714_304),
}  # fmt: skip


def counted_flops(model, lengths) -> int:
    """FlopCounterMode's total over one forward + backward per sample (batch of one: no padding)."""
    with FlopCounterMode(display=False) as counter:
        for i, n in enumerate(lengths):
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(i))
            model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "cls,config,tied",
    [
        (LlamaForCausalLM, LlamaConfig, True),
        (LlamaForCausalLM, LlamaConfig, False),
        (Qwen2ForCausalLM, Qwen2Config, True),
    ],
)
def test_formula_matches_flop_counter(cls, config, tied):
    cfg = config(**TINY, tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    model = cls(cfg).train()
    assert flops.matmul_parameters(cfg) == flops.linear_parameters(model)  # the config count = the modules'
    lengths = [24, 40, 7]
    want = counted_flops(model, lengths)
    got = flops.flops_per_token(cfg, lengths, causal=False) * sum(lengths)
    assert got == pytest.approx(want, rel=1e-3)
    # and the attention term is there: without it the formula is off by far more than the tolerance
    assert 6 * flops.matmul_parameters(cfg) * sum(lengths) < want * (1 - 1e-2)


def test_causal_attended_length_counts_the_pairs_a_causal_mask_keeps():
    lengths = [1, 5, 64, 17]
    pairs = sum(int(torch.ones(n, n).tril().sum()) for n in lengths)  # the (query, key) pairs attended
    assert flops.attended_length(lengths) == pytest.approx(pairs / sum(lengths))
    assert flops.attended_length([9]) == 5.0  # (n + 1) / 2
    assert flops.attended_length(lengths, causal=False) == sum(n * n for n in lengths) / sum(lengths)
    with pytest.raises(ValueError):
        flops.attended_length([])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_count(name):
    config, kw, published_total = PUBLISHED[name]
    cfg = config(**kw)
    with torch.device("meta"):
        model = (LlamaForCausalLM if config is LlamaConfig else Qwen2ForCausalLM)(cfg)
    n = flops.matmul_parameters(cfg)
    assert n == flops.linear_parameters(model)
    # the published parameter count minus what is no matmul weight (norms, biases), plus the tied head
    others = sum(p.numel() for name_, p in model.named_parameters() if "norm" in name_ or name_.endswith(".bias"))
    assert n == published_total - others  # the tied head and the embedding are the same published tensor


def test_mfu():
    assert flops.mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        flops.mfu(1.0, 1.0, 0.0)
