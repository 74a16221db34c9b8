"""The training step never makes the host wait for the device: backward_step of every built-in objective
(padded and packed micro-batches, two per step) runs inside trainer.hostsync.NoHostSync, which raises on
.item(), nonzero, unique, boolean-mask indexing, bincount and device-to-CPU copies; and the guard itself
catches each of those."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftgo.trainer.batching import collate
from sftgo.trainer.hostsync import HostSyncError, NoHostSync
from sftgo.trainer.model import TokenLossModel
from sftgo.trainer.step import Objective, backward_step

MASKING = "transformers/masking_utils.py"
OBJECTIVES = {
    "sftgo-sample": (Objective("sftgo", 2, "sample"), None),
    "sftgo-batch": (Objective("sftgo", 2, "batch"), None),
    "sftgo-smooth": (Objective("sftgo", 2, "sample", temperature=0.5), None),
    "sftgo-dro": (Objective("sftgo", 2), torch.tensor([0.3, 0.7], dtype=torch.float64)),
    "sft": (Objective("sft", 2), None),
    "rho1": (Objective("rho1", 2), None),
    "dft": (Objective("dft", 2), None),
    "weighted": (Objective("weighted", 2, weight=3.0), None),
}


def _sample(rng, n, p):
    ids = rng.integers(5, 400, size=n)
    mask = np.r_[np.zeros(p, np.int8), np.ones(n - p, np.int8)]
    return {"id": "x", "input_ids": ids, "loss_mask": mask, "groups": np.where(mask == 1, rng.integers(0, 2, n), -1)}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, pad_token_id=0
    )
    model = LlamaForCausalLM(config)
    rng = np.random.default_rng(0)
    samples = [_sample(rng, n, p) for n, p in ((12, 3), (9, 2), (7, 4), (10, 1))]
    for s in samples:
        s["length"] = len(s["input_ids"])
    micro = [
        collate([[samples[0]], [samples[1]]], 0, False),  # padded
        collate([[samples[2], samples[3]]], 0, True),  # packed: position ids restart per sample
    ]
    return model, micro


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_backward_step_never_waits_for_the_device(setup, name):
    model, micro = setup
    obj, dro = OBJECTIVES[name]
    net = TokenLossModel(model, ce_chunk=8, lookup_into_grad=True)  # as sftgo-train in one process
    model.zero_grad(set_to_none=True)
    # transformers' own mask preparation reads one boolean per forward (are the rows packed?): the only
    # wait left, outside sftgo's code; at most one per micro-batch
    with NoHostSync(allow=(MASKING,)) as guard:
        stats = backward_step(net, micro, obj, lam=0.6, group_weights=dro)
    assert len(guard.allowed) <= len(micro)
    # what it computed is read afterwards, in one transfer: a real step, gradients and all
    assert np.isfinite(stats.loss) and stats.loss > 0
    assert stats.counts.loss_tokens == sum(int(mb.sup.num_targets) for mb in micro)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x.sum().item(),
        lambda x: float(x[0]),
        lambda x: torch.nonzero(x),
        lambda x: torch.unique(x),
        lambda x: x[x > 0],
        lambda x: x.masked_select(x > 0),
        lambda x: torch.bincount(x.long().abs(), minlength=4),
        lambda x: x.index_put_((x > 0,), torch.tensor(0.0)),
    ],
)
def test_the_guard_catches_what_syncs(op):
    x = torch.arange(-3.0, 3.0)
    with pytest.raises(HostSyncError, match="makes the host wait"), NoHostSync():
        op(x)
    with NoHostSync(record=True) as guard:
        op(x)
    assert len(guard.caught) >= 1


def test_the_in_place_embedding_gradient_from_host_ids_equals_the_plain_one(setup):
    """The lookup's gradient grouped by the distinct ids collate found (padding id included: no gradient)
    is exactly nn.Embedding's."""
    model, micro = setup
    grads = []
    for into in (False, True):
        model.zero_grad(set_to_none=True)
        backward_step(TokenLossModel(model, ce_chunk=8, lookup_into_grad=into), micro[:1], OBJECTIVES["sft"][0], 0.0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert (micro[0].input_ids == 0).any()  # the padding id occurs
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
