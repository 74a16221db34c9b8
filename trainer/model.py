"""The model side of training: load, optionally LoRA / gradient checkpointing, and a module
that returns per-token losses of the supervised positions only.

Input: a model name or checkpoint directory (see sftgo.core.models), training options.
Output: `TokenLossModel`, an nn.Module (what DDP wraps) whose forward(input_ids,
position_ids, targets, **segments) returns the CE of each supervised target, flattened row-major
(segments: a padding-free micro-batch's boundaries, trainer.attention.segment_kwargs).
Cost: the decoder forward/backward as usual; the lm_head and softmax run only on supervised
positions, in chunks (trainer.chunked_ce.token_cross_entropy), instead of on every position
with the whole [B, T, V] fp32 logits tensor as a plain `model(labels=...)` call does.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from sftgo.core.models import load_causal_lm, model_dir
from sftgo.trainer.batching import IGNORE
from sftgo.trainer.chunked_ce import fused_cross_entropy, token_cross_entropy
from sftgo.trainer.config import ConfigError


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_plain_head(model: nn.Module, name: str) -> None:
    """The chunked loss implements logits = lm_head(h); refuse models that post-process logits."""
    cfg = causal_lm(model).config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(cfg, attr, None) or getattr(getattr(cfg, "text_config", None), attr, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(
                f"Model {name!r} scales or caps its logits ({attr}={value}), which sftgo-train does not support."
            )


def saved_form(name: str | None, trust_remote_code: bool = False) -> tuple[torch.dtype | None, bool | None]:
    """(dtype, use_cache) as the model's own config.json states them: the final model is saved
    so (training itself runs in fp32 with the cache off).  None where the config says nothing."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir(name), trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return (dtype if isinstance(dtype, torch.dtype) else None), getattr(config, "use_cache", None)


def load_for_training(
    name: str | None,
    *,
    lora_r: int = 0,
    lora_alpha: float = 16.0,
    adapter_dir: str | None = None,
    grad_checkpointing: bool = False,
    ac_every: int = 1,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A causal LM in train mode, its weights in `dtype` (fp32; autocast handles bf16 compute; bf16 for
    --precision bf16-state, where peft still makes LoRA adapters fp32); LoRA-wrapped if asked.
    `ac_every`: with grad_checkpointing, only every Nth decoder layer recomputes (see checkpoint_every)."""
    model = load_causal_lm(name, dtype=dtype, trust_remote_code=trust_remote_code)
    check_plain_head(model, str(name))
    model.config.use_cache = False
    if grad_checkpointing:
        kwargs = {"use_reentrant": False}  # non-reentrant: works with DDP and with inputs that need no grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if ac_every > 1:  # 1: every layer, as transformers set it
            checkpoint_every(model, ac_every)
    if lora_r > 0:
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("--lora-r needs the peft package: pip install peft.")
        import peft

        if adapter_dir is not None:  # resuming: the adapter weights come from the checkpoint
            model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        else:
            lora = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
            model = peft.get_peft_model(model, lora)
    return model.train()


def checkpoint_every(model: nn.Module, every: int) -> list[int]:
    """Keep activation checkpointing on decoder layers 0, every, 2*every, ... only (transformers' per-layer
    switch); the others keep their activations.  Returns the indices of the checkpointed layers."""
    from sftgo.trainer.fsdp import decoder_layers

    layers = decoder_layers(model)
    if every > 1 and not all(isinstance(getattr(m, "gradient_checkpointing", None), bool) for m in layers):
        raise ConfigError(
            f"--ac-every needs decoder layers with transformers' per-layer checkpointing switch; "
            f"{type(causal_lm(model)).__name__}'s have none: use --ac-every 1."
        )
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i % every == 0
    return [i for i, m in enumerate(layers) if getattr(m, "gradient_checkpointing", False)]


class _LookupIntoGrad(torch.autograd.Function):
    """weight[ids] (nn.Embedding's forward), whose weight gradient is added into weight.grad in place.

    A tied embedding (SmolLM2, Llama-3.2 1B/3B, Qwen2.5 small) has two autograd consumers, the lookup and
    the LM head.  autograd holds the head's dense [V, H] gradient in a buffer until the lookup's dense
    [V, H] gradient arrives at the very end of the backward, and sums them: two or three full copies at
    once.  Here the weight is not an autograd input: `anchor`, a scalar that requires grad, makes this
    backward run, and it adds the rows of the ids it saw into weight.grad, so the head's gradient is
    accumulated as soon as it exists and the lookup adds only its touched rows.  The arithmetic is the one
    of embedding_dense_backward and the accumulation after it (per distinct id, the rows summed in order of
    occurrence, then added).  Only for a process whose gradients nothing else watches as they accumulate:
    one process, or FSDP2 (which reduces after the backward); not DDP, whose reducer would send the head's
    part alone."""

    @staticmethod
    def forward(ctx, anchor, ids, box):
        weight, padding_idx, _ = box
        ctx.box = box
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight.detach(), padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight, padding_idx, distinct_ids = ctx.box
        flat, g = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if distinct_ids is not None:  # (distinct, inverse) found on the host: no unique, no mask, no sync
            distinct, inverse = distinct_ids
            rows = g.new_zeros(distinct.numel(), g.shape[1]).index_add_(0, inverse, g)
            if padding_idx is not None:  # its row gets no lookup gradient: add zeros there
                rows = torch.where((distinct != padding_idx)[:, None], rows, 0.0)
            with torch.no_grad():
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                weight.grad.index_add_(0, distinct, rows.to(weight.grad.dtype))
            return None, None, None
        if padding_idx is not None:  # nn.Embedding gives its padding row no gradient
            keep = flat != padding_idx
            flat, g = flat[keep], g[keep]
        distinct, inverse = torch.unique(flat, return_inverse=True)
        rows = g.new_zeros(distinct.numel(), g.shape[1]).index_add_(0, inverse, g)
        with torch.no_grad():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, distinct, rows.to(weight.grad.dtype))
        return None, None, None


def plain_lookup(embed: nn.Module) -> bool:
    """A plain nn.Embedding (no max_norm, frequency scaling or sparse gradient) of a trained weight."""
    return (
        type(embed) is nn.Embedding
        and embed.max_norm is None
        and not embed.scale_grad_by_freq
        and not embed.sparse
        and embed.weight.requires_grad
    )


def add_token_ce_method(head: nn.Module) -> None:
    """Give the LM head a `sftgo_token_ce(hidden, targets, chunk, token_grad)` method (head_cross_entropy), which
    FSDP2's register_fsdp_forward_method can wrap like a forward: the chunked loss reads the head's weight
    without calling its forward."""
    import types

    head.sftgo_token_ce = types.MethodType(head_cross_entropy, head)


def head_cross_entropy(head: nn.Module, rows, targets, chunk, token_grad=None):
    """The chunked CE of `rows` through `head`: the fused head (its gradient computed in the forward) when the
    objective gave per-token weights, else the two-pass head (trainer.chunked_ce)."""
    if token_grad is not None:
        return fused_cross_entropy(rows, head, targets, token_grad, chunk)
    return token_cross_entropy(rows, head, targets, chunk)


class TokenLossModel(nn.Module):
    """forward(input_ids, position_ids, targets, index=None) -> CE [N] of the N supervised targets;
    forward(..., token_grad=f) -> (sum_i w_i * CE_i, detached CE [N]) through the fused head
    (trainer.chunked_ce.fused_cross_entropy: the head's gradient computed during the forward).
    ce_chunk: rows per head chunk, None: set by memory (chunked_ce.chunk_rows).
    fused_ce: trainer.step passes token_grad for objectives that have one; False: every objective on the
    two-pass head.

    lookup_into_grad: the input embedding's gradient is added into weight.grad in place
    (_LookupIntoGrad: no full-size gradient copies for a tied embedding); only where no DDP
    reducer watches the gradients (one process, FSDP2)."""

    def __init__(
        self, model: nn.Module, ce_chunk: int | None = 1024, lookup_into_grad: bool = False, fused_ce: bool = True
    ):
        super().__init__()
        self.model = model
        self.ce_chunk = ce_chunk
        self.lookup_into_grad = lookup_into_grad
        self.fused_ce = fused_ce

    def forward(self, input_ids, position_ids, targets, index=None, distinct_ids=None, token_grad=None, **attention):
        """targets: [B, T] (IGNORE where not supervised), or with `index` (int [N], the row-major positions of
        the supervised targets, found on the host) the [N] targets themselves: no boolean mask, no device sync.
        distinct_ids: (the sorted distinct input ids, each position's row in them), found on the host, for the
        in-place embedding gradient (no torch.unique in its backward).  token_grad: the objective's per-token
        weights (the fused head, trainer.chunked_ce); attention: the flat row's segments
        (trainer.attention.segment_kwargs) for the padding-free layout."""
        lm = causal_lm(self.model)
        embed = lm.get_input_embeddings()
        if self.lookup_into_grad and torch.is_grad_enabled() and plain_lookup(embed):
            anchor = torch.zeros((), device=input_ids.device, requires_grad=True)
            embeds = _LookupIntoGrad.apply(anchor, input_ids, (embed.weight, embed.padding_idx, distinct_ids))
            inputs = {"inputs_embeds": embeds}
        else:
            inputs = {"input_ids": input_ids}
        hidden = lm.get_decoder()(**inputs, position_ids=position_ids, use_cache=False, **attention).last_hidden_state
        head = lm.get_output_embeddings()
        if index is not None:
            rows, tgt = hidden.flatten(0, 1).index_select(0, index), targets
        else:
            keep = targets != IGNORE
            rows, tgt = hidden[keep], targets[keep]
        if hasattr(head, "sftgo_token_ce"):  # an FSDP unit of its own (trainer.fsdp.shard): gathered around it
            return head.sftgo_token_ce(rows, tgt, self.ce_chunk, token_grad)
        return head_cross_entropy(head, rows, tgt, self.ce_chunk, token_grad)
