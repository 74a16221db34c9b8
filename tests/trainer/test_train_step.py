"""trainer.step, the step anyone can call: accumulated-batch denominators against transformers'
own loss, and the trainer's import boundary."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sftgo.trainer.batching import collate
from sftgo.trainer.model import TokenLossModel
from sftgo.trainer.step import Objective, backward_step

TRAINER = Path(__file__).resolve().parents[2] / "trainer"


def _sample(rng, n, p, k=2):
    ids = rng.integers(5, 400, size=n)
    mask = np.r_[np.zeros(p, np.int8), np.ones(n - p, np.int8)]
    groups = np.where(mask == 1, rng.integers(0, k, size=n), -1)
    return {"id": "x", "input_ids": ids, "loss_mask": mask, "groups": groups, "length": n}


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_accumulated_sft_step_equals_transformers_loss_of_the_whole_batch(tiny):
    """Two micro-batches of unequal supervised counts: the gradient equals that of HF's token-mean
    loss over all four samples at once (it would not with per-micro-batch means)."""
    rng = np.random.default_rng(0)
    samples = [_sample(rng, 12, 2), _sample(rng, 9, 6), _sample(rng, 15, 3), _sample(rng, 6, 4)]
    micro = [collate([[s] for s in samples[:1]], 0, False), collate([[s] for s in samples[1:]], 0, False)]
    stats = backward_step(TokenLossModel(tiny, ce_chunk=4), micro, Objective("sft", 2), lam=0.0)
    ours = _grads(tiny)

    width = max(s["length"] for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for r, s in enumerate(samples):
        n = s["length"]
        ids[r, :n] = torch.as_tensor(s["input_ids"])
        labels[r, :n] = torch.where(torch.as_tensor(s["loss_mask"]) == 1, ids[r, :n], -100)
        attn[r, :n] = 1
    loss = tiny(input_ids=ids, attention_mask=attn, labels=labels).loss
    loss.backward()
    want = _grads(tiny)
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    assert stats.counts.loss_tokens == sum(int(s["loss_mask"][1:].sum()) for s in samples)
    for name in want:
        assert torch.allclose(ours[name], want[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("reduce", ["sample", "batch"])
def test_splitting_a_step_into_micro_batches_keeps_the_sftgo_gradient(tiny, reduce):
    """sample reduce: exact; batch reduce: exact when the micro-batches agree on the worst group
    (here every sample has group 1 as its hardest, by construction of the single-group batch)."""
    rng = np.random.default_rng(1)
    samples = [_sample(rng, 10, 3), _sample(rng, 14, 4), _sample(rng, 8, 2)]
    if reduce == "batch":
        for s in samples:
            s["groups"] = np.where(s["loss_mask"] == 1, 1, -1)
    net = TokenLossModel(tiny)
    obj = Objective("sftgo", 2, reduce)
    whole = backward_step(net, [collate([[s] for s in samples], 0, False)], obj, lam=0.7)
    g_whole = _grads(tiny)
    split = backward_step(net, [collate([[s]], 0, False) for s in samples], obj, lam=0.7)
    g_split = _grads(tiny)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    for name in g_whole:
        assert torch.allclose(g_split[name], g_whole[name], rtol=1e-4, atol=1e-6), name


def test_the_trainer_imports_only_the_core():
    """sftgo.trainer may import sftgo.core and itself, never sftgo.pipeline or sftgo.grouping."""
    for path in TRAINER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.startswith("sftgo."):
                    assert name.startswith(("sftgo.core", "sftgo.trainer")), f"{path.name} imports {name}"
                assert name.split(".")[0] not in ("pipeline", "grouping", "trainer"), f"{path.name} imports {name}"
