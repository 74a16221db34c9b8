"""The model side of training: load, optionally LoRA / gradient checkpointing, and a module
that returns per-token losses of the supervised positions only.

Input: a model name or checkpoint directory (see sftgo.core.models), training options.
Output: `TokenLossModel`, an nn.Module (what DDP wraps) whose forward(input_ids,
position_ids, targets) returns the CE of each supervised target, flattened row-major.
Cost: the decoder forward/backward as usual; the lm_head and softmax run only on supervised
positions, in chunks (trainer.objectives.token_cross_entropy), instead of on every position
with the whole [B, T, V] fp32 logits tensor as a plain `model(labels=...)` call does.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from sftgo.core.models import load_causal_lm, model_dir
from sftgo.trainer.batching import IGNORE
from sftgo.trainer.config import ConfigError
from sftgo.trainer.objectives import token_cross_entropy


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_plain_head(model: nn.Module, name: str) -> None:
    """The chunked loss implements logits = lm_head(h); refuse models that post-process logits."""
    cfg = causal_lm(model).config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(cfg, attr, None) or getattr(getattr(cfg, "text_config", None), attr, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(f"Model {name!r} scales or caps its logits ({attr}={value}), which sftgo-train does not support.")


def saved_form(name: str | None, trust_remote_code: bool = False) -> tuple[torch.dtype | None, bool | None]:
    """(dtype, use_cache) as the model's own config.json states them: the final model is saved
    so (training itself runs in fp32 with the cache off).  None where the config says nothing."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir(name), trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return (dtype if isinstance(dtype, torch.dtype) else None), getattr(config, "use_cache", None)


def load_for_training(name: str | None, *, lora_r: int = 0, lora_alpha: float = 16.0, adapter_dir: str | None = None,
                      grad_checkpointing: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """An fp32 causal LM in train mode (autocast handles bf16 on GPUs); LoRA-wrapped if asked."""
    model = load_causal_lm(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    check_plain_head(model, str(name))
    model.config.use_cache = False
    if grad_checkpointing:
        kwargs = {"use_reentrant": False}  # non-reentrant: works with DDP and with inputs that need no grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
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


class TokenLossModel(nn.Module):
    """forward(input_ids, position_ids, targets) -> CE [N] of the N supervised targets."""

    def __init__(self, model: nn.Module, ce_chunk: int = 1024):
        super().__init__()
        self.model = model
        self.ce_chunk = ce_chunk

    def forward(self, input_ids, position_ids, targets):
        lm = causal_lm(self.model)
        hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        keep = targets != IGNORE
        return token_cross_entropy(hidden[keep], lm.get_output_embeddings(), targets[keep], self.ce_chunk)
