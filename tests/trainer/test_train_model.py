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
