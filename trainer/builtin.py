"""The built-in training objectives, one class each (the protocol: trainer/registry.py); a new one is a class here
and its line in BUILTIN.

Input: a `LossInput` per micro-batch (train), the eval set's CE / worst term / per-group loss (eval),
a step's counts (trained tokens).
Output: `LossParts` (trainer/objectives.py), a held-out loss, a token count.
Cost: the losses are O(tokens) scatter-adds (trainer/objectives.py); importing this module imports
no torch (the losses are imported when first called).

    sftgo     (1 - λ) · CE + λ · worst-group loss (per sample, or over the batch; smooth max; Group-DRO)
    sft       token-mean CE over every supervised token
    rho1      token-mean CE over the important group only (Rho-1's selective language modelling)
    dft       each token's CE times its own detached probability (Dynamic Fine-Tuning)
    weighted  CE with a fixed weight on the important group (the control for SFT-GO's max)
"""

from __future__ import annotations


def _losses():
    from sftgo.trainer import objectives

    return objectives


def _common(x) -> dict:
    return {
        "num_groups": x.settings.num_groups,
        "segments": x.segments,
        "ce_denom": x.counts.loss_tokens,
        "num_samples": getattr(x, "num_samples", None),
    }


def held_out_ce(self, ce, worst, group_loss, lam) -> float:
    """eval_loss of the objectives whose held-out loss is the CE (comparable across them)."""
    return ce


def supervised_tokens(self, counts) -> float:
    """trained_tokens of the objectives that train every supervised token."""
    return counts.loss_tokens


class SftGo:
    name = "sftgo"
    summary = "SFT-GO: (1 - λ) · CE + λ · the worst group's loss"
    groups = "required"
    settings = ("lam", "lam_schedule", "lam_end", "reduce", "temperature", "dro_step")

    def train_loss(self, x):
        s, c = x.settings, x.counts
        return _losses().sftgo_loss(
            x.token_loss,
            x.groups,
            x.lam,
            s.reduce,
            **_common(x),
            worst_denom=c.samples,
            group_denom=c.group_tokens,
            temperature=s.temperature or None,
            group_weights=x.group_weights,
        )

    def token_grad(self, x):
        """Exact before the forward at λ = 0 (plain CE) and with Group-DRO weights (linear); the max is not."""
        c = x.counts
        if x.lam == 0:
            return _losses().ce_token_grad(x.groups, ce_denom=c.loss_tokens)
        if x.group_weights is not None:
            return _losses().dro_token_grad(
                x.groups, x.lam, x.group_weights, ce_denom=c.loss_tokens, group_denom=c.group_tokens
            )
        return None

    def eval_loss(self, ce, worst, group_loss, lam):
        return (1 - lam) * ce + lam * worst

    trained_tokens = supervised_tokens


class Sft:
    name = "sft"
    summary = "plain token-mean cross-entropy over the supervised tokens"
    groups = "optional"  # a group column only adds per-group metrics
    settings = ()

    def train_loss(self, x):
        return _losses().sftgo_loss(x.token_loss, x.groups, 0.0, **_common(x))

    def token_grad(self, x):
        return _losses().ce_token_grad(x.groups, ce_denom=x.counts.loss_tokens)

    eval_loss = held_out_ce
    trained_tokens = supervised_tokens


class Dft:
    name = "dft"
    summary = "Dynamic Fine-Tuning: each token's CE times its own detached probability"
    groups = "optional"
    settings = ()

    def train_loss(self, x):
        return _losses().dft_loss(x.token_loss, x.groups, **_common(x))

    def token_grad(self, x):
        return _losses().dft_token_grad(x.groups, ce_denom=x.counts.loss_tokens)

    eval_loss = held_out_ce
    trained_tokens = supervised_tokens


class Rho1:
    name = "rho1"
    summary = "Rho-1: token-mean CE over the important group only"
    groups = "important"
    settings = ()

    def train_loss(self, x):
        return _losses().rho1_loss(x.token_loss, x.groups, **_common(x), important_denom=x.counts.group_tokens[-1])

    def token_grad(self, x):
        return _losses().rho1_token_grad(
            x.groups, num_groups=x.settings.num_groups, important_denom=x.counts.group_tokens[-1]
        )

    def eval_loss(self, ce, worst, group_loss, lam):
        return group_loss[-1]

    def trained_tokens(self, counts):
        return float(counts.group_tokens[-1])


class Weighted:
    name = "weighted"
    summary = "CE with weight --group-weight on the important group and 1 on the others"
    groups = "important"
    settings = ("group_weight",)

    def train_loss(self, x):
        return _losses().weighted_loss(
            x.token_loss, x.groups, x.settings.weight, **_common(x), important_denom=x.counts.group_tokens[-1]
        )

    def token_grad(self, x):
        c = x.counts
        return _losses().weighted_token_grad(
            x.groups,
            x.settings.weight,
            num_groups=x.settings.num_groups,
            ce_denom=c.loss_tokens,
            important_denom=c.group_tokens[-1],
        )

    eval_loss = held_out_ce
    trained_tokens = supervised_tokens


SFTGO, SFT, RHO1, DFT, WEIGHTED = SftGo(), Sft(), Rho1(), Dft(), Weighted()
BUILTIN = {
    o.name: f"{__name__}:{attr}"
    for attr, o in dict(SFTGO=SFTGO, SFT=SFT, RHO1=RHO1, DFT=DFT, WEIGHTED=WEIGHTED).items()
}
