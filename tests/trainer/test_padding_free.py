"""Padding-free micro-batches: one flat row of whole samples, attended sample by sample (trainer.attention).

Oracles: each sample run alone through the model's own attention (sdpa), for tiny Llama, Qwen2 (grouped-query
heads, a sliding-window layer) and Granite (its own attention scaling) models built from transformers classes;
and the padded layout's loss in a real `sftgo-train` run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sftgo.core.errors import ConfigError, TrainingError
from sftgo.trainer import attention, resume
from sftgo.trainer.batching import IGNORE, Batches, collate
from sftgo.trainer.config import make_config
from sftgo.trainer.model import TokenLossModel

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=4)),
    "qwen2-gqa-window": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            **SMALL,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["full_attention", "sliding_attention"],
        )
    ),
    "granite-scaled": lambda: GraniteForCausalLM(
        GraniteConfig(**SMALL, num_key_value_heads=2, attention_multiplier=0.5)
    ),
}
LENGTHS = (7, 12, 3, 9)  # odd lengths; 12 and 9 are longer than the sliding window


def _model(kind: str):
    torch.manual_seed(0)
    model = MODELS[kind]().float().eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def _sample(rng, n, prompt=2):
    ids = rng.integers(5, 300, size=n)
    mask = np.r_[np.zeros(prompt, np.int8), np.ones(n - prompt, np.int8)]
    return {"id": "x", "input_ids": ids, "loss_mask": mask, "groups": np.where(mask == 1, 0, -1), "length": n}


def _samples(seed=0):
    rng = np.random.default_rng(seed)
    return [_sample(rng, n) for n in LENGTHS]


def _run(model, net, batches):
    """Per-token CE, hidden states (per batch) and parameter gradients of the summed CE over `batches`."""
    model.zero_grad(set_to_none=True)
    ce, hidden = [], []
    for b in batches:
        loss = net(b.input_ids, b.position_ids, b.targets, **b.attention_kwargs())
        loss.sum().backward()
        ce.append(loss.detach())
        with torch.no_grad():
            out = model.get_decoder()(input_ids=b.input_ids, position_ids=b.position_ids, **b.attention_kwargs())
            hidden.append(out.last_hidden_state[0])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(ce), torch.cat(hidden), grads


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_flat_row_equals_each_sample_alone(kind):
    """Hidden states, per-token losses and gradients of the flat row equal those of each sample run alone
    through the model's own attention; one segment spanning the row (attention across samples) does not."""
    model = _model(kind)
    net = TokenLossModel(model, ce_chunk=7)
    samples = _samples()
    alone = _run(model, net, [collate([[s]], pad_id=0, packed_rows=False) for s in samples])
    flat = collate([[s] for s in samples], pad_id=0, packed_rows=False, flat=True)
    original = attention.use_varlen(model)
    assert original == "sdpa" and model.config._attn_implementation == attention.NAME
    got = _run(model, net, [flat])
    assert got[0].shape == alone[0].shape
    torch.testing.assert_close(got[1], alone[1], rtol=1e-5, atol=1e-5)  # hidden states, token by token
    torch.testing.assert_close(got[0], alone[0], rtol=1e-5, atol=1e-5)  # per-token CE
    assert got[2].keys() == alone[2].keys()
    for name in alone[2]:
        torch.testing.assert_close(got[2][name], alone[2][name], rtol=1e-4, atol=1e-6)
    # the oracle can tell: the same row as one segment (every sample attends to those before it) differs
    across = collate([samples], pad_id=0, packed_rows=False, flat=True)
    across.cu_seqlens = torch.tensor([0, sum(LENGTHS)], dtype=torch.int32)
    across.max_seqlen = sum(LENGTHS)
    wrong = _run(model, net, [across])
    assert not torch.allclose(wrong[1], alone[1], atol=1e-3)
    attention.use_original(model)
    assert model.config._attn_implementation == "sdpa"


def test_samples_never_attend_across_boundaries():
    """Changing one sample's tokens changes its own outputs and no other sample's."""
    model = _model("qwen2-gqa-window")
    attention.use_varlen(model)
    samples = _samples(1)
    other = [dict(s) for s in samples]
    other[1]["input_ids"] = (samples[1]["input_ids"] + 17) % 300
    cu = np.cumsum((0,) + LENGTHS)
    with torch.no_grad():
        a, b = (
            model.get_decoder()(
                input_ids=x.input_ids, position_ids=x.position_ids, **x.attention_kwargs()
            ).last_hidden_state[0]
            for x in (collate([ss], 0, False, flat=True) for ss in (samples, other))
        )
    for i in range(len(LENGTHS)):
        same = torch.equal(a[cu[i] : cu[i + 1]], b[cu[i] : cu[i + 1]])
        assert same == (i != 1), i


def test_collate_flat_row_and_its_segments():
    """One row of all samples with no padding, positions restarting, int32 cu_seqlens on the host, and the
    same targets, groups and sample ids as the padded layout of the same micro-batch."""
    samples = _samples(2)
    rows = [[samples[0], samples[2]], [samples[1]], [samples[3]]]
    flat = collate(rows, pad_id=0, packed_rows=False, flat=True)
    padded = collate(rows, pad_id=0, packed_rows=True)
    order = [samples[i] for i in (0, 2, 1, 3)]
    total = sum(LENGTHS)
    assert flat.input_ids.shape == (1, total) and flat.num_tokens == total == padded.num_tokens
    assert flat.cu_seqlens.dtype == torch.int32 and flat.cu_seqlens.device.type == "cpu"
    assert flat.cu_seqlens.tolist() == [0, 7, 10, 22, 31] and flat.max_seqlen == 12
    assert flat.input_ids[0].tolist() == np.concatenate([s["input_ids"] for s in order]).tolist()
    assert flat.position_ids[0].tolist() == [p for s in order for p in range(s["length"])]
    keep = padded.targets != IGNORE
    for name in ("targets", "groups", "segments"):
        assert getattr(flat, name)[0][flat.targets[0] != IGNORE].tolist() == getattr(padded, name)[keep].tolist()
    ends = flat.cu_seqlens[1:] - 1  # the last token of a sample predicts nothing (never the next sample's first)
    assert (flat.targets[0, ends.long()] == IGNORE).all()
    assert flat.attention_kwargs()["max_length_q"] == 12 and padded.attention_kwargs() == {}
    assert flat.num_samples == 4


def test_batches_hold_the_same_samples_flat_or_padded(shared_shard_dir):
    """The padding-free layout changes the tensors, not the grouping: the same samples per micro-batch."""
    from sftgo.core.shards import read_manifest
    from sftgo.trainer.data import ShardStream

    manifest = read_manifest(shared_shard_dir)

    def batches(flat, pack):
        stream = ShardStream(shared_shard_dir, manifest, "group_tfidf", seed=3, shuffle=True)
        b = Batches(
            stream, batch_tokens=120, max_length=64, pack=pack, pool_batches=2, seed=3, pad_id=0, cycle=False, flat=flat
        )
        return list(b)

    for pack in (False, True):
        padded, flat = batches(False, pack), batches(True, pack)
        assert len(padded) == len(flat) > 3
        for p, f in zip(padded, flat):
            assert f.input_ids.shape == (1, p.num_tokens) and f.num_samples == p.num_samples
            assert (f.targets[f.targets != IGNORE] == p.targets[p.targets != IGNORE]).all()
            assert int(f.cu_seqlens[-1]) == p.num_tokens


def test_forward_without_segments_is_refused_and_no_mask_is_built(tmp_path, tokenizer):
    """Through the padding-free implementation a forward must carry its segments; transformers builds no mask
    for it; saving sees the model's own implementation."""
    from transformers.masking_utils import create_causal_mask

    from sftgo.trainer.checkpoint import save_pretrained

    model = _model("llama")
    attention.use_varlen(model)
    ids = torch.arange(5, 15)[None]
    with pytest.raises(TrainingError, match="boundaries"):
        model(input_ids=ids)
    embeds = model.get_input_embeddings()(ids)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])
    assert (
        create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=pos)
        is None
    )
    with attention.original_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == attention.NAME
    save_pretrained(model, tokenizer, tmp_path)
    assert model.config._attn_implementation == attention.NAME
    assert attention.NAME not in (tmp_path / "config.json").read_text()


def test_gpu_kernel_call_under_fake_tensors():
    """The GPU path's call into torch's varlen_attn (signature, grouped-query heads, window, output layout),
    checked with torch's own shape rules for it (FakeTensorMode: no GPU needed, nothing computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if attention._torch_varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    with FakeTensorMode(allow_non_fake_inputs=True):
        query = torch.empty(1, 4, 17, 8, dtype=torch.bfloat16, device="cuda")
        key = torch.empty(1, 2, 17, 8, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(4, dtype=torch.int32, device="cuda")
        assert attention.kernel(query.device, query.dtype) == "varlen_attn"
        out, weights = attention.varlen_attention_forward(
            None, query, key, key, None, scaling=0.3, sliding_window=5, **attention.segment_kwargs(cu, 9)
        )
        assert out.shape == (1, 17, 4, 8) and out.dtype == torch.bfloat16 and weights is None


def test_unsupported_attention_settings_are_refused():
    model = LlamaForCausalLM(LlamaConfig(**SMALL, attention_dropout=0.1))
    with pytest.raises(ConfigError, match="attention_dropout=0.1"):
        attention.use_varlen(model, "tiny")


def test_padding_free_is_a_setting_resume_checks(tmp_path):
    cfg = make_config(data=str(tmp_path), out=str(tmp_path / "run"), padding_free=True)
    saved = json.loads(make_config(data=str(tmp_path), out=str(tmp_path / "run")).to_json())
    with pytest.raises(ConfigError, match="--padding-free"):
        resume.check_settings(cfg, saved, 1)
    with pytest.raises(ConfigError, match="--padding-free must be true, false or unset"):
        make_config(data=str(tmp_path), out=str(tmp_path / "run"), padding_free="yes")
    assert attention.padding_free(None, torch.device("cpu"), False) is False
    assert attention.padding_free(True, torch.device("cpu"), False) is True


BIN = str(Path(sys.executable).parent / "sftgo-train")


@pytest.mark.slow
def test_cli_padding_free_run_gives_the_padded_runs_losses(tmp_path, shared_shard_dir, tiny_model_dir):
    """`sftgo-train --padding-free` (forced on a CPU: sdpa per sample) on a tiny Llama with the embedded
    tokenizer: each step's loss equals the padded layout's on the same micro-batches, and the saved model
    names its own attention."""
    env = dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"))
    common = [
        "--data",
        shared_shard_dir,
        "--model",
        tiny_model_dir,
        "--max-steps",
        "3",
        "--batch-tokens",
        "96",
        "--max-length",
        "48",
    ]
    common += ["--lr", "1e-4", "--no-progress", "--no-tensorboard", "--precision", "fp32"]
    losses = {}
    for layout in ("--padding-free", "--no-padding-free"):
        out = tmp_path / layout
        run = subprocess.run(
            [BIN, *map(str, common), "--out", str(out), layout], capture_output=True, text=True, timeout=300, env=env
        )
        assert run.returncode == 0, run.stderr
        assert ("sdpa on each sample in turn" in run.stderr + run.stdout) == (layout == "--padding-free")
        train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[layout] = [r["loss"] for r in train if r["split"] == "train"]
        assert json.loads((out / "config.json").read_text())["padding_free"] == (layout == "--padding-free")
        assert attention.NAME not in (out / "model" / "config.json").read_text()
    assert len(losses["--padding-free"]) == 3
    np.testing.assert_allclose(losses["--padding-free"], losses["--no-padding-free"], rtol=1e-4)
