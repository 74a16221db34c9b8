"""A training objective: focal loss, each supervised token's CE times (1 - p)^2, p its probability."""

import torch

from sftgo.trainer.objectives import sftgo_loss


class Focal:
    name = "focal"  # sftgo-train --objective focal
    summary = "focal loss: each token's CE times (1 - p)^2"
    groups = "optional"  # trains every supervised token; with --groups it logs per-group loss
    settings = ()  # reads none of --lam, --reduce, --group-weight, ...

    def train_loss(self, x):  # x: sftgo.trainer.registry.LossInput of one micro-batch
        parts = sftgo_loss(
            x.token_loss,
            x.groups,
            0.0,
            num_groups=x.settings.num_groups,
            segments=x.segments,
            ce_denom=x.counts.loss_tokens,
        )  # CE and per-group diagnostics
        weight = (1 - torch.exp(-x.token_loss)) ** 2
        parts.loss = (weight * x.token_loss).sum() / max(float(x.counts.loss_tokens), 1.0)  # the whole step's tokens
        return parts

    def eval_loss(self, ce, worst, group_loss, lam):
        return ce  # held-out CE: comparable with every other objective

    def trained_tokens(self, counts):
        return counts.loss_tokens


OBJECTIVE = Focal()
