"""Padding-free ("varlen") attention: the samples of a micro-batch as one flat row, each attending only to itself.

Input: a transformers decoder whose attention goes through transformers' AttentionInterface (Llama, Qwen2, Mistral,
SmolLM2 and most recent models), switched by `use_varlen(model)` to the implementation registered here; then each
forward carries the segments of its flat row [1, total] as transformers' FlashAttentionKwargs (`segment_kwargs`:
cu_seq_lens_q/k, int32 [S+1] cumulative sample lengths, and max_length_q/k, the longest sample as a Python int),
which transformers passes through the decoder layers to the attention function.
Output: per layer, the causal attention of each sample over its own tokens only ([1, total, heads, head_dim]),
with the model's scaling, grouped-query heads and sliding window: what the model's own attention gives each
sample run alone.
Cost: on a GPU in bf16/fp16, one kernel call per layer, O(sum of squared sample lengths): torch's varlen_attn
(FlashAttention kernels inside torch) or flash_attn_varlen_func (the flash-attn package) where torch has none; no
mask is built and no padding is computed.  Elsewhere (a CPU, or fp32) a fallback runs sdpa on each sample in
turn (correct, not fast: one small attention call per sample and layer).

The implementation's name is deliberately not registered in AttentionMaskInterface: for a name it does not hold,
transformers builds no mask at all (None) and skips its packed-sequence detection from the position ids (a
device-to-host sync per forward), and the segments come from the kwargs instead.  A forward through it without
the segments, or with a padding mask, is refused rather than attending across samples.  The model's own
implementation is restored around saving (`original_attention`) and by `use_original`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
import torch.nn.functional as F

from sftgo.core.errors import ConfigError, TrainingError

NAME = "sftgo_varlen"


def segment_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The FlashAttentionKwargs transformers passes from the decoder's forward to each attention call."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # an older torch
        return None
    return varlen_attn


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def kernel(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel runs the attention of tensors on `device` in `dtype`: varlen_attn, flash_attn or segments."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _torch_varlen() is not None:
            return "varlen_attn"
        if _has_flash_attn():
            return "flash_attn"
    return "segments"


def padding_free(wanted: bool | None, device: torch.device, bf16: bool) -> bool:
    """--padding-free as given, or (unset) on where a fused varlen kernel runs: a GPU in bf16."""
    if wanted is not None:
        return wanted
    return kernel(device, torch.bfloat16 if bf16 else torch.float32) != "segments"


def note(device: torch.device, bf16: bool) -> str:
    """The start-of-run note on the padding-free layout and the kernel that runs it."""
    name = kernel(device, torch.bfloat16 if bf16 else torch.float32)
    if name == "segments":
        return (
            f"Note: padding-free micro-batches on a {device.type} in {'bf16' if bf16 else 'fp32'}: no fused varlen "
            "kernel runs here, so attention runs sdpa on each sample in turn (correct, slower than padding)."
        )
    return f"Note: padding-free micro-batches (one flat row each), attention by {name}."


def _flash_kernel(name, q, k, v, cu, max_len, scale, window):
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D] with a FlashAttention varlen kernel (GQA native)."""
    if name == "varlen_attn":
        return _torch_varlen()(
            q,
            k,
            v,
            cu,
            cu,
            max_len,
            max_len,
            scale=scale,
            window_size=(window - 1 if window else -1, 0),
            enable_gqa=q.shape[1] != k.shape[1],
        )
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=True,
        window_size=(window - 1 if window else -1, 0),
    )


def _segments(q, k, v, cu, scale, window):
    """The same with sdpa, one sample at a time (q [T, Hq, D] -> [T, Hq, D]); the cu_seqlens are read on the host."""
    bounds = cu.tolist()
    if k.shape[1] != q.shape[1]:  # grouped-query heads: query head h reads key/value head h // group
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if window and b - a > window:  # causal and at most `window` tokens back, the token itself included
            i = torch.arange(b - a, device=q.device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """transformers' attention-function signature: query [1, Hq, T, D], key/value [1, Hkv, T, D] ->
    ([1, T, Hq, D], None)."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise TrainingError(
            "The padding-free attention got a forward without its samples' boundaries (cu_seqlens); "
            "only sftgo-train's padding-free micro-batches can run through it."
        )
    if attention_mask is not None or query.shape[0] != 1:  # keys share the queries' segments (self-attention)
        raise TrainingError("The padding-free attention takes one flat row of whole samples, without a padding mask.")
    if dropout or softcap or kwargs.get("s_aux") is not None:
        raise ConfigError(
            "The padding-free attention supports no attention dropout, logit soft-capping or attention sinks; "
            "pass --no-padding-free."
        )
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    name = kernel(q.device, q.dtype)
    if name == "segments":
        out = _segments(q, k, v, cu_seq_lens_q, scaling, sliding_window)
    else:
        out = _flash_kernel(name, q, k, v, cu_seq_lens_q, max_length_q, scaling, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Add the implementation to transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def check_supported(model, name: str) -> None:
    """Refuse, in one sentence, a model the padding-free attention cannot run exactly."""
    config = model.config
    if not model._can_set_attn_implementation():
        raise ConfigError(
            f"Model {name!r} does not route its attention through transformers' AttentionInterface, so it cannot "
            "train padding-free; pass --no-padding-free."
        )
    for attr in ("attention_dropout", "attn_logit_softcapping"):
        value = getattr(config, attr, None)
        if value not in (None, 0, 0.0):
            raise ConfigError(
                f"Model {name!r} has {attr}={value}, which the padding-free attention does not support; "
                "pass --no-padding-free."
            )


def use_varlen(model, name: str = "model") -> str:
    """Switch the causal LM `model` (not a peft wrapper) to the padding-free attention; returns its own
    implementation's name (for `use_original`)."""
    check_supported(model, name)
    register()
    original = model.config._attn_implementation
    if original != NAME:
        model.__dict__["_sftgo_original_attention"] = original
        model.set_attn_implementation(NAME)
    return model.__dict__["_sftgo_original_attention"]


def use_original(model) -> None:
    """Back to the model's own attention implementation (a no-op for a model never switched)."""
    original = model.__dict__.pop("_sftgo_original_attention", None)
    if original is not None:
        model.set_attn_implementation(original)


@contextlib.contextmanager
def original_attention(model):
    """The model's own attention implementation inside the block (saving: its config never names ours)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.__dict__.get("_sftgo_original_attention")
    if original is None:
        yield
        return
    use_original(base)
    try:
        yield
    finally:
        use_varlen(base)
