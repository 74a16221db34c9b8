"""TokenLossModel on a tiny Llama: equals transformers' own loss; packing isolates samples."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sftgo.trainer.batching import collate
from sftgo.trainer.model import TokenLossModel


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _sample(rng, n, p):
    ids = rng.integers(5, 400, size=n)
    mask = np.r_[np.zeros(p, np.int8), np.ones(n - p, np.int8)]
    return {"id": "x", "input_ids": ids, "loss_mask": mask, "groups": np.where(mask == 1, 0, -1), "length": n}


def test_token_losses_equal_transformers_loss(tiny):
    rng = np.random.default_rng(0)
    samples = [_sample(rng, 12, 4), _sample(rng, 9, 3)]
    batch = collate([[s] for s in samples], pad_id=0, packed_rows=False)
    net = TokenLossModel(tiny, ce_chunk=5)
    with torch.no_grad():
        got = net(batch.input_ids, None, batch.targets)
        for r, s in enumerate(samples):
            ids = torch.as_tensor(s["input_ids"])[None]
            labels = torch.where(torch.as_tensor(s["loss_mask"])[None] == 1, ids, -100)
            want = tiny(input_ids=ids, labels=labels).loss
            n_before = int((batch.targets[:r] != -100).sum())
            n = int((batch.targets[r] != -100).sum())
            assert torch.allclose(got[n_before : n_before + n].mean(), want, atol=1e-5)


def test_packed_rows_give_the_same_token_losses_as_one_sample_per_row(tiny):
    rng = np.random.default_rng(1)
    samples = [_sample(rng, 10, 3), _sample(rng, 7, 2), _sample(rng, 12, 5)]
    net = TokenLossModel(tiny)
    with torch.no_grad():
        padded = collate([[s] for s in samples], pad_id=0, packed_rows=False)
        packed = collate([samples], pad_id=0, packed_rows=True)
        a = net(padded.input_ids, None, padded.targets)
        b = net(packed.input_ids, packed.position_ids, packed.targets)
        # the same rows concatenated without restarting positions do attend across samples
        c = net(packed.input_ids, None, packed.targets)
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def _tied_lm(seed: int = 0):
    """A tiny Llama whose LM head is its input embedding (as SmolLM2's), with a padding row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=500,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(cfg).train()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def _grads(model, net, batches) -> dict:
    model.zero_grad(set_to_none=True)
    for batch in batches:
        net(batch.input_ids, batch.position_ids, batch.targets).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_lookup_into_grad_gives_autograds_gradients():
    """The in-place embedding gradient (no full-size copies for a tied embedding) against autograd's own:
    bitwise for one micro-batch on a CPU, to rounding for accumulated ones; ids that repeat, the padding
    row (no gradient) and a frozen embedding (the plain path) included."""
    rng = np.random.default_rng(0)
    model = _tied_lm()
    samples = [_sample(rng, 14, 4), _sample(rng, 9, 2), _sample(rng, 11, 5)]
    samples[0]["input_ids"][[1, 5, 9]] = 7  # one id three times
    samples[1]["input_ids"][2] = 3  # the padding id inside a sample: nn.Embedding gives its row no lookup gradient
    batches = [
        collate([[s] for s in samples[:2]], pad_id=3, packed_rows=False),
        collate([[samples[2]]], pad_id=3, packed_rows=False),
    ]
    plain, into = TokenLossModel(model, ce_chunk=4), TokenLossModel(model, ce_chunk=4, lookup_into_grad=True)
    want, got = _grads(model, plain, batches[:1]), _grads(model, into, batches[:1])
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    want, got = _grads(model, plain, batches), _grads(model, into, batches)
    assert all(torch.allclose(want[n], got[n], rtol=1e-5, atol=1e-7) for n in want)
    with torch.no_grad():  # evaluation: the plain lookup, same losses
        assert torch.equal(
            into(batches[0].input_ids, None, batches[0].targets), plain(batches[0].input_ids, None, batches[0].targets)
        )
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen (LoRA): no gradient to add
    model.zero_grad(set_to_none=True)
    into(batches[0].input_ids, None, batches[0].targets).sum().backward()
    assert model.get_input_embeddings().weight.grad is None
