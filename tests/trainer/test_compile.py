"""--compile: decoder layers compiled with torch.compile (aot_eager on the CPU, chosen through
SFTGO_COMPILE_BACKEND as a run would) train with the eager losses and gradients, and a batch of a new length
reuses the compiled graph; what --compile does not support is refused in one sentence."""

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftgo.core.errors import ConfigError
from sftgo.trainer import compiling
from sftgo.trainer.batching import collate
from sftgo.trainer.config import TrainConfig
from sftgo.trainer.fsdp import decoder_layers
from sftgo.trainer.model import TokenLossModel
from sftgo.trainer.step import Objective, backward_step


def _sample(rng, n, p):
    ids = rng.integers(5, 200, size=n)
    mask = np.r_[np.zeros(p, np.int8), np.ones(n - p, np.int8)]
    groups = np.where(mask == 1, rng.integers(0, 2, n), -1)
    return {"id": "x", "input_ids": ids, "loss_mask": mask, "groups": groups, "length": n}


def _step(model, micro):
    model.zero_grad(set_to_none=True)
    stats = backward_step(TokenLossModel(model, ce_chunk=8), micro, Objective("sftgo", 2), lam=0.5)
    return stats.loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_layers_train_with_the_eager_losses_and_gradients(monkeypatch):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = LlamaForCausalLM(
        LlamaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    model = copy.deepcopy(eager)
    monkeypatch.setenv(compiling.BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    assert compiling.compile_layers(decoder_layers(model)) == "aot_eager"
    clock = compiling.CompileClock()
    rng = np.random.default_rng(0)
    samples = [_sample(rng, n, p) for n, p in ((11, 3), (7, 2), (9, 4), (13, 5), (6, 1))]
    first = [collate([[samples[0]], [samples[1]]], 0, False), collate([[samples[2]], [samples[3]]], 0, False)]
    for micro in (first, [collate([[samples[4]], [samples[2]]], 0, False)]):  # a third length, new rows
        want_loss, want = _step(eager, micro)
        got_loss, got = _step(model, micro)
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name
        if micro is first:
            assert clock.since() > 0  # it compiled, and says how long that took
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # dynamic shapes: the new length reused the graph
    assert clock.since() == 0


@pytest.mark.parametrize("other", [{"grad_checkpointing": True}, {"lora_r": 4}])
def test_compile_with_what_it_does_not_support_is_refused_in_one_sentence(other):
    with pytest.raises(ConfigError, match=r"^--compile with --(grad-checkpointing|lora-r) is not supported;"):
        TrainConfig(data="d", out="o", compile=True, **other).validate()


def test_compile_defaults_to_on_for_cuda_only():
    cfg = TrainConfig(data="d", out="o")
    assert compiling.resolve(cfg, torch.device("cpu")) == (False, None)
    assert compiling.resolve(cfg, torch.device("cuda")) == (True, None)
    on, note = compiling.resolve(TrainConfig(data="d", out="o", grad_checkpointing=True), torch.device("cuda"))
    assert not on and "--grad-checkpointing" in note
