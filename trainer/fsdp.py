"""FSDP2 for models that do not fit one device (`sftgo-train --fsdp`, under torchrun).

Input: the TokenLossModel around a causal LM (fp32 weights on this rank's device), the process
group torchrun set up, and whether to train in bf16 (GPUs that support it).
Output: the same module, sharded in place with `torch.distributed.fsdp.fully_shard`: one FSDP unit
per decoder layer, then the TokenLossModel as the root (so the embeddings, final norm and the
lm_head that the chunked cross-entropy reads live in the root unit and are gathered for the whole
forward; `trainer.model.TokenLossModel` calls the decoder and the head itself, not the CausalLM's
forward).  Parameters, gradients and optimizer state are sharded across ranks.  On GPUs with bf16,
parameters are cast to bf16 for compute and gradients are reduced in fp32 (MixedPrecisionPolicy).
Checkpoints: `save`/`load` write and read the sharded model and optimizer state with
torch.distributed.checkpoint (every rank writes its own shard files; resuming needs the same number
of ranks, as DDP resume does); `full_state_dict` gathers the consolidated weights on rank 0 for the
final `save_pretrained` directory.
Cost: per layer, one all-gather of its parameters in forward and in backward and one
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


def shard(net: nn.Module, model: nn.Module, bf16: bool) -> nn.Module:
    """fully_shard each decoder layer, then `net` (the root); returns `net`, now an FSDPModule."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
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
