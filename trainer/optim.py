"""The optimizer and the learning-rate schedule of a training run.

Input: the model (its trainable parameters) and a TrainConfig (lr, betas, weight decay, warm-up, the cosine
schedule's floor).
Output: a fused AdamW with weight decay on matrices only, and the schedule's factor per step (LRLambda, what
torch's LambdaLR calls and saves in checkpoints).
Cost: AdamW keeps two moments per trainable parameter, in its dtype (fp32; bf16 under --precision bf16-state).
"""

from __future__ import annotations

import math

import torch

from sftgo.trainer.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


class LRLambda:
    """A picklable-free callable (LambdaLR saves callables' __dict__, not functions)."""

    def __init__(self, warmup, total, min_ratio):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step):
        return lr_factor(step, self.warmup, self.total, self.min_ratio)


def make_optimizer(model, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW exists on CPU and CUDA (torch >= 2.4) and is what HF Trainer uses by default.  It also
    # takes FSDP2's sharded (DTensor) parameters, and unlike foreach it makes no parameter-sized
    # temporaries (foreach's sqrt of the second moments is one more copy of this rank's shard)
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused, foreach=None if fused else True)
