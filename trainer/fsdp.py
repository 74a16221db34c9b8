"""FSDP2 for models that do not fit one device (`sftgo-train --fsdp`, under torchrun).

Input: the TokenLossModel around a causal LM (fp32 weights on this rank's device), the process
group torchrun set up, and whether to train in bf16 (GPUs that support it).
Output: the same module, sharded in place with `torch.distributed.fsdp.fully_shard`: the input
embedding, one FSDP unit per decoder layer and the lm_head, then the TokenLossModel as the root (which
keeps the final norm; `trainer.model.TokenLossModel` calls the decoder and the head itself, not the
CausalLM's forward).  A tied embedding and head are one weight: both then stay in the root unit, gathered
for the whole forward.  Parameters, gradients and optimizer state are sharded across ranks.  On GPUs with bf16,
parameters are cast to bf16 for compute and gradients are reduced in fp32 (MixedPrecisionPolicy).
Checkpoints: `save`/`load` write and read the sharded model and optimizer state with
torch.distributed.checkpoint (every rank writes its own shard files; resuming needs the same number
of ranks, as DDP resume does); `full_state_dict` gathers the consolidated weights on rank 0 for the
final `save_pretrained` directory.
Cost: per unit (embedding, layer, head), one all-gather of its parameters in forward and in backward and one
reduce-scatter of its gradients; memory per rank is about (weights + grads + Adam state) / world
plus one layer's full parameters and the activations.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sftgo.core.errors import ConfigError

SHARDED = "sharded"  # the DCP folder inside a checkpoint directory


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a Hugging Face causal LM (Llama, Qwen, Mistral, GPT-2, ...)."""
    from sftgo.trainer.model import causal_lm

    decoder = causal_lm(model).get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    raise ConfigError(f"Cannot find the decoder layers of {type(causal_lm(model)).__name__} to shard with --fsdp.")


def tied(model: nn.Module) -> bool:
    """Whether the input embedding and the LM head share one weight (SmolLM2, Llama-3.2 1B/3B)."""
    from sftgo.trainer.model import causal_lm

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    return head is not None and lm.get_input_embeddings().weight is head.weight


def shard(net: nn.Module, model: nn.Module, bf16: bool) -> nn.Module:
    """fully_shard the input embedding, each decoder layer and the LM head, then `net` (the root); returns
    `net`, now an FSDPModule.  A tied embedding and head share one weight, so both stay in the root unit
    (and keep TokenLossModel's in-place lookup gradient); untied, the embedding and the head are units of
    their own (the lookup then runs as the embedding's forward, the head's chunked loss as its
    `sftgo_token_ce` method, registered with FSDP so that its weight is gathered around it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from sftgo.trainer.model import add_token_ce_method, causal_lm

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    lm = causal_lm(model)
    split = not tied(model) and lm.get_output_embeddings() is not None
    if split:
        fully_shard(lm.get_input_embeddings(), mp_policy=mp)
        net.lookup_into_grad = False  # the embedding's forward must run: FSDP gathers its weight there
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    if split:  # the backward starts with the head: keep its gathered weight from the forward (torchtitan's choice)
        head = lm.get_output_embeddings()
        add_token_ce_method(head)
        fully_shard(head, mp_policy=mp, reshard_after_forward=False)
        register_fsdp_forward_method(head, "sftgo_token_ce")
    fully_shard(net, mp_policy=mp)
    return net


def _state(net: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(net, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save(path: Path, net: nn.Module, optimizer) -> None:
    """Every rank: write its shards of the model and optimizer state into path/sharded (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(net, optimizer), checkpoint_id=str(Path(path) / SHARDED))


def load(path: Path, net: nn.Module, optimizer) -> None:
    """Every rank: read its shards back into the sharded model and optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(net, optimizer)
    folder = Path(path) / SHARDED
    if not folder.is_dir():
        raise ConfigError(f"{path} has no {SHARDED}/ folder: it was not written by an --fsdp run.")
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module) -> dict:
    """The consolidated weights of `model` (a module inside the FSDP root), on rank 0's CPU; {} on
    other ranks.  Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def grad_norm_tensor(norm) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor for sharded gradients: its global value, a tensor on the device."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
