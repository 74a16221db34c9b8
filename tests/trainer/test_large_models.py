"""Training larger models: --precision bf16-state, --ac-every, and FSDP2's embedding and head units.

- bf16-state keeps weights, gradients and AdamW's moments in bf16 (the library path, and a CPU run where the
  CPU has native bf16: a stopped and resumed run ends with the straight run's weights, bit for bit);
- --grad-checkpointing --ac-every N recomputes layers 0, N, 2N, ... only, with the losses and gradients of
  no checkpointing;
- --fsdp puts an untied embedding and LM head in FSDP units of their own (a tied pair stays in the root),
  with the loss and gradients of the unsharded model (one process, gloo).
The two-process FSDP runs of test_train_fsdp.py (exact resume, consolidated save) use the untied tiny model,
so they train through the split units too."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from sftgo.trainer.config import ConfigError, TrainConfig
from sftgo.trainer.distributed import bf16_native, state_dtype
from sftgo.trainer.model import TokenLossModel, load_for_training
from tests.trainer.tiny import tiny_config

CPU = torch.device("cpu")


_cfg = tiny_config  # a short run on the tiny model


def _batch(vocab: int, rows: int = 2, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[0, :3] = -100
    return ids, torch.arange(length).expand(rows, length), targets


def _tiny_llama(layers: int = 2, tie: bool = False, seed: int = 0):
    """A random Llama of real transformers classes, small enough (512 words, hidden 32) for many passes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def _loss_and_grads(net: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
    net.zero_grad(set_to_none=True)
    loss = net(*batch).sum()
    loss.backward()

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    return loss.detach(), {n: full(p.grad).clone() for n, p in net.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- --precision bf16-state
def test_bf16_state_keeps_weights_gradients_and_adam_moments_in_bf16(tiny_model_dir):
    from sftgo.trainer.optim import make_optimizer

    cfg = TrainConfig(data="d", out="o", precision="bf16-state", lr=1e-2)
    assert state_dtype(TrainConfig(data="d", out="o", precision="bf16"), CPU, allow_emulated=True) == torch.float32
    dtype = state_dtype(cfg, CPU, allow_emulated=True)  # the native-bf16 check is the CLI test's below
    assert dtype == torch.bfloat16
    model = load_for_training(tiny_model_dir, dtype=dtype)
    net = TokenLossModel(model, ce_chunk=8, lookup_into_grad=True)
    optimizer = make_optimizer(model, cfg, CPU)
    batch = _batch(model.config.vocab_size)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss, grads = _loss_and_grads(net, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the chunked CE sums in fp32
    optimizer.step()
    params = dict(net.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert set(grads) == set(params) and all(g.dtype == torch.bfloat16 for g in grads.values())
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(params) and all(m.dtype == torch.bfloat16 for m in moments)
    assert all(not torch.equal(before[n], p) for n, p in params.items())  # lr 1e-2: every weight moved
    # the trade-off: an update below bf16's resolution of a weight is rounded away, where fp32 state keeps it
    # (Adam's first update is about lr per weight; bf16 resolves 2**-8 of a weight, so lr 1e-5 is lost on most)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_for_training(tiny_model_dir, dtype=dtype)
        net = TokenLossModel(model, ce_chunk=8)
        optimizer = make_optimizer(model, TrainConfig(data="d", out="o", lr=1e-5), CPU)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        _, grads = _loss_and_grads(net, batch)
        optimizer.step()
        live = {n: g != 0 for n, g in grads.items()}  # Adam leaves a weight with no gradient (unseen tokens) alone
        changed = sum(int((before[n] != p)[live[n]].sum()) for n, p in net.named_parameters())
        moved[dtype] = changed / sum(int(m.sum()) for m in live.values())
    assert moved[torch.float32] > 0.99 and moved[torch.bfloat16] < 0.5, moved


def test_bf16_state_run_resumes_exactly_or_is_refused_on_a_cpu_without_native_bf16(tmp_path, shard_dir, tiny_model_dir):
    from sftgo.trainer.loop import run

    if not bf16_native(CPU):
        with pytest.raises(ConfigError, match="--precision bf16-state needs a GPU or a CPU with native bf16"):
            run(_cfg(shard_dir, tmp_path / "r", tiny_model_dir, precision="bf16-state"))
        return
    run(_cfg(shard_dir, tmp_path / "straight", tiny_model_dir, precision="bf16-state"))
    resumed = tmp_path / "resumed"
    run(_cfg(shard_dir, resumed, tiny_model_dir, precision="bf16-state", stop_after=1))
    ckpt = resumed / "checkpoints" / "step-0000001"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(ckpt / "model.safetensors")).values())
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert saved and all(s[k].dtype == torch.bfloat16 for s in saved.values() for k in ("exp_avg", "exp_avg_sq"))
    run(_cfg(shard_dir, resumed, tiny_model_dir, precision="bf16-state", resume=True))
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(resumed / "model") is not None


# ---------------------------------------------------------------- --ac-every
def test_ac_every_checkpoints_every_nth_layer_with_the_same_losses_and_gradients(tmp_path):
    from sftgo.trainer.fsdp import decoder_layers

    _tiny_llama(layers=4, seed=3).save_pretrained(tmp_path / "deep")  # checkpointing every 2nd: layers 0 and 2
    batch = _batch(512, seed=1)
    results = {}
    for every in (None, 1, 2, 3):
        torch.manual_seed(0)
        model = load_for_training(str(tmp_path / "deep"), grad_checkpointing=every is not None, ac_every=every or 1)
        runs = [0] * 4
        for i, layer in enumerate(decoder_layers(model)):  # its first norm runs again where the layer recomputes
            layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i, runs=runs: runs.__setitem__(i, runs[i] + 1))
        results[every] = _loss_and_grads(TokenLossModel(model, ce_chunk=8), batch)
        recomputed = [i for i in range(4) if runs[i] == 2]
        assert recomputed == {None: [], 1: [0, 1, 2, 3], 2: [0, 2], 3: [0, 3]}[every], (every, runs)
    loss, grads = results[None]
    for every in (1, 2, 3):
        assert torch.equal(results[every][0], loss)
        for name, g in grads.items():
            torch.testing.assert_close(results[every][1][name], g, rtol=0, atol=0, msg=name)


def test_ac_every_is_ignored_with_a_note_without_grad_checkpointing():
    from sftgo.trainer.config import ignored_settings

    cfg = TrainConfig(data="d", out="o", ac_every=2).validate()
    assert any(n.startswith("--ac-every is ignored") for n in ignored_settings(cfg))
    with pytest.raises(ConfigError, match="--ac-every must be at least 1"):
        TrainConfig(data="d", out="o", ac_every=0).validate()


# ---------------------------------------------------------------- FSDP2 units
@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    from sftgo.trainer.distributed import _free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_fsdp_gives_an_untied_embedding_and_head_units_of_their_own(one_rank_group, tie, dtype):
    """bf16: --precision bf16-state's sharded parameters (gradients reduced in fp32, kept in bf16)."""
    from torch.distributed.fsdp import FSDPModule

    from sftgo.trainer import fsdp

    model = _tiny_llama(tie=tie, seed=4).to(dtype).train()
    assert fsdp.tied(model) is tie
    plain = TokenLossModel(copy.deepcopy(model), ce_chunk=8, lookup_into_grad=True)
    net = TokenLossModel(model, ce_chunk=8, lookup_into_grad=True)
    fsdp.shard(net, model, bf16=dtype == torch.bfloat16)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    units = {name for name, m in net.named_modules() if isinstance(m, FSDPModule)}
    layers = {f"model.model.layers.{i}" for i in range(model.config.num_hidden_layers)}
    if tie:  # one weight: both stay in the root unit, with the in-place lookup gradient
        assert units == {"", *layers} and net.lookup_into_grad
    else:
        assert units == {"", "model.model.embed_tokens", "model.lm_head", *layers} and not net.lookup_into_grad
        assert isinstance(embed, FSDPModule) and isinstance(head, FSDPModule) and embed is not head
    batch = _batch(model.config.vocab_size, seed=2)
    for _ in range(2):  # twice: the head's unit is gathered again after the first backward resharded it
        loss, grads = _loss_and_grads(net, batch)
        want_loss, want = _loss_and_grads(plain, batch)
        torch.testing.assert_close(loss, want_loss)
        assert set(grads) == set(want)
        for name, g in want.items():
            assert grads[name].dtype == dtype
            torch.testing.assert_close(grads[name], g, msg=name)
