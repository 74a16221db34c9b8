"""Training objectives: SFT-GO (worst-group) and the baselines SFT, Rho-1, DFT and weighted.

Input: per-token cross-entropy (from trainer.chunked_ce.token_cross_entropy, or any float tensor)
and a group id per token (-1 = not supervised), optionally a sample id per token (packing).
Output: a `LossParts` with the scalar to backpropagate and detached diagnostics.
Cost: O(tokens) scatter-adds, negligible next to the model.

Definitions (docs/method.md, "Objectives"):
    L_GO  = (1 - lam) * L_CE + lam * L_worst
    L_CE  = sum of supervised token losses / N_tok
    L_g(x)= mean loss of the tokens of sample x in group g
    L_worst (reduce="sample") = sum over samples with supervised tokens of max_g L_g(x) / N_smp
    L_worst (reduce="batch")  = max_g (sum of group-g token losses / N_g)

Gradient accumulation (and DDP): the denominators N_tok, N_smp and N_g can be passed in,
so the caller uses the counts of the whole accumulated (global) batch.  Summing the
`loss` of the micro-batches then gives exactly the loss of the whole batch for CE, for
`sample` worst (a mean over samples, each sample lives in one micro-batch) and for
Group-DRO; for `batch` worst the argmax group is chosen per micro-batch, which equals the
whole-batch value whenever the micro-batches agree on the worst group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sftgo.core.errors import ConfigError
from sftgo.trainer.config import SCHEDULES  # the names live with the config, which imports no torch


@dataclass
class LossParts:
    """What an objective returns.  Only `loss` carries gradient."""

    loss: torch.Tensor
    """Scalar to backpropagate (already divided by the accumulated-batch denominators)."""
    ce: torch.Tensor
    """Token-mean cross-entropy over supervised tokens (detached)."""
    worst: torch.Tensor
    """The worst-group term as defined by `reduce` (detached; 0 when nothing is supervised)."""
    group_loss: torch.Tensor
    """[K] batch-level mean loss per group of this call's tokens; NaN for an empty group."""
    group_sum: torch.Tensor
    """[K] sum of token losses per group (detached), for aggregating over micro-batches and ranks."""
    group_count: torch.Tensor
    """[K] number of tokens per group, same purpose."""
    ties: int | torch.Tensor = 0
    """Samples whose two largest group losses are exactly equal (the argmax is then arbitrary); a 0-dim
    tensor on the loss's device when computed (reading it is the caller's choice)."""


def _flatten(token_loss, groups, segments, num_samples=None):
    """Keep supervised tokens only; return flat loss, group and dense sample index.  `num_samples` given:
    the caller already did (every group >= 0, segments dense 0..num_samples-1): nothing to select."""
    if num_samples is not None:
        return token_loss, groups, segments
    if segments is None:  # one sample per row
        segments = torch.arange(groups.shape[0], device=groups.device)[:, None].expand_as(groups)
    keep = groups >= 0
    loss = token_loss[keep]
    grp = groups[keep].long()
    seg = segments[keep].long()
    # dense sample ids 0..S-1 (segments may be sparse or start anywhere)
    _, seg = torch.unique(seg, return_inverse=True)
    return loss, grp, seg


def _group_stats(loss, grp, num_groups):
    group_sum = torch.zeros(num_groups, dtype=loss.dtype, device=loss.device).index_add(0, grp, loss.detach())
    ones = torch.ones_like(loss)
    group_count = torch.zeros(num_groups, dtype=loss.dtype, device=loss.device).index_add(0, grp, ones)
    group_loss = group_sum / group_count  # NaN (0/0) for an empty group, on purpose: "no data" is not "zero loss"
    return group_sum, group_count, group_loss


def _smooth_max(values, valid, temperature):
    """temperature * log(mean over valid of exp(values / temperature)): between the mean
    (temperature -> inf) and the max (temperature -> 0) of the valid entries, along the last dim."""
    scaled = (values / temperature).masked_fill(~valid, float("-inf"))
    n = valid.sum(-1).clamp(min=1).to(values.dtype)
    return temperature * (torch.logsumexp(scaled, dim=-1) - torch.log(n))


def _worst_of_batch(loss, grp, num_groups, counts, valid, temperature, group_weights):
    """reduce="batch": the max (or smooth max, or Group-DRO weighted sum) of the batch-level group means."""
    g_sum = torch.zeros(num_groups, dtype=loss.dtype, device=loss.device).index_add(0, grp, loss)
    g_mean = g_sum / counts.to(loss.device).clamp(min=1)
    if group_weights is not None:
        return (group_weights.to(loss.device, loss.dtype) * g_mean).sum()
    if temperature:
        return _smooth_max(g_mean, valid, temperature)
    return g_mean.masked_fill(~valid, float("-inf")).max()


def _worst_per_sample(loss, grp, seg, num_groups, temperature, worst_denom, num_samples=None):
    """reduce="sample": per sample the max (or smooth max) over its non-empty groups' mean losses,
    summed and divided by the samples of the whole step; also the count of exact ties (a 0-dim tensor).
    `num_samples`: the samples of `seg` (known on the host; else read from the device)."""
    n_smp = int(seg.max()) + 1 if num_samples is None else num_samples
    flat = seg * num_groups + grp
    s_sum = torch.zeros(n_smp * num_groups, dtype=loss.dtype, device=loss.device).index_add(0, flat, loss)
    s_cnt = torch.zeros(n_smp * num_groups, dtype=loss.dtype, device=loss.device)
    s_cnt = s_cnt.index_add(0, flat, torch.ones_like(loss))
    s_sum, s_cnt = s_sum.view(n_smp, num_groups), s_cnt.view(n_smp, num_groups)
    valid = s_cnt > 0
    s_mean = s_sum / s_cnt.clamp(min=1)
    ties = 0
    if temperature:
        per_sample = _smooth_max(s_mean, valid, temperature)
    else:
        masked = s_mean.masked_fill(~valid, float("-inf"))
        per_sample = masked.max(dim=-1).values  # plain max: gradient flows through the argmax group
        if num_groups > 1:
            top2 = masked.detach().topk(2, dim=-1).values
            ties = ((top2[:, 0] == top2[:, 1]) & torch.isfinite(top2[:, 1])).sum()
    denom = loss.new_tensor(float(n_smp)) if worst_denom is None else torch.as_tensor(worst_denom, dtype=loss.dtype)
    return per_sample.sum() / denom.clamp(min=1), ties


def group_id_error(largest: int, num_groups: int) -> ConfigError:
    """The one sentence for a group id the declared K does not cover."""
    return ConfigError(
        f"The data has group id {largest} but {num_groups} groups were declared (ids 0..{num_groups - 1})."
    )


def sftgo_loss(
    token_loss: torch.Tensor,
    groups: torch.Tensor,
    lam: float,
    reduce: str = "sample",
    *,
    num_groups: int | None = None,
    segments: torch.Tensor | None = None,
    ce_denom: float | torch.Tensor | None = None,
    worst_denom: float | torch.Tensor | None = None,
    group_denom: torch.Tensor | None = None,
    temperature: float | None = None,
    group_weights: torch.Tensor | None = None,
    num_samples: int | None = None,
) -> LossParts:
    """L_GO = (1 - lam) * L_CE + lam * L_worst (docs/method.md).

    token_loss: float [B, T] (or [N]) per-token cross-entropy.
    groups: int [B, T] group id per token, -1 where not supervised.
    reduce: "sample" (per-sample max over its non-empty groups, mean over samples) or
        "batch" (max over groups of the batch-level group means).
    num_groups: K (default: 1 + the largest id present, at least 2).
    segments: int [B, T] sample id per token when rows hold several packed samples.
    ce_denom / worst_denom / group_denom: supervised tokens / supervised samples / [K]
        tokens per group of the whole accumulated batch (default: this call's counts).
    temperature: replace the max with a smooth max (log-mean-exp) at this temperature.
    group_weights: [K] online Group-DRO weights; the worst term becomes
        sum_g w_g * L_g(batch) (replaces the max; `reduce` is then ignored).
    num_samples: given by the training step, which found the supervised targets on the host: token_loss,
        groups and segments are [N] of supervised targets only, segments numbered 0..num_samples-1 and the
        group ids checked; nothing here then waits for the device (no mask, unique or .item()).
    """
    if reduce not in ("sample", "batch"):
        raise ConfigError(f"reduce must be 'sample' or 'batch', not {reduce!r}.")
    loss, grp, seg = _flatten(token_loss, groups, segments, num_samples)
    if num_groups is None:
        num_groups = max(2, int(grp.max()) + 1 if grp.numel() else 2)
    elif num_samples is None and grp.numel() and int(grp.max()) >= num_groups:
        raise group_id_error(int(grp.max()), num_groups)
    zero = loss.sum() * 0.0  # keeps the graph (and DDP) happy when nothing is supervised
    n_tok = loss.new_tensor(float(loss.numel())) if ce_denom is None else torch.as_tensor(ce_denom, dtype=loss.dtype)
    ce_sum = loss.sum()
    ce = ce_sum / n_tok.clamp(min=1)
    group_sum, group_count, group_loss = _group_stats(loss, grp, num_groups)

    ties = 0
    if loss.numel() == 0:
        worst = zero
    elif group_weights is not None or reduce == "batch":
        counts = group_count if group_denom is None else torch.as_tensor(group_denom, dtype=loss.dtype)
        worst = _worst_of_batch(loss, grp, num_groups, counts, group_count > 0, temperature, group_weights)
    else:
        worst, ties = _worst_per_sample(loss, grp, seg, num_groups, temperature, worst_denom, num_samples)

    if lam == 0:
        total = ce + zero  # exactly plain SFT, even when the worst term is undefined
    else:
        total = (1.0 - lam) * ce + lam * worst
    return LossParts(total, ce.detach(), worst.detach(), group_loss, group_sum, group_count, ties)


def sft_loss(token_loss, groups, *, ce_denom=None, num_groups=None, segments=None, num_samples=None) -> LossParts:
    """Plain SFT: token-mean cross-entropy over all supervised tokens (sftgo with lam = 0)."""
    return sftgo_loss(
        token_loss, groups, 0.0, num_groups=num_groups, segments=segments, ce_denom=ce_denom, num_samples=num_samples
    )


def rho1_loss(
    token_loss, groups, *, num_groups=None, important_denom=None, ce_denom=None, segments=None, num_samples=None
) -> LossParts:
    """Rho-1 selective LM: token-mean CE over the important group only (the top group, K-1).

    important_denom: important-token count of the whole accumulated batch (ce_denom only
    scales the logged `ce`).
    """
    parts = sftgo_loss(
        token_loss, groups, 0.0, num_groups=num_groups, segments=segments, ce_denom=ce_denom, num_samples=num_samples
    )
    k = parts.group_sum.numel()
    important = groups == (k - 1)
    n = token_loss.new_tensor(float(important.sum())) if important_denom is None else torch.as_tensor(important_denom)
    parts.loss = (token_loss * important).sum() / n.to(token_loss.dtype).clamp(min=1)
    return parts


def dft_loss(token_loss, groups, *, num_groups=None, ce_denom=None, segments=None, num_samples=None) -> LossParts:
    """Dynamic Fine-Tuning (arXiv 2508.05629; TRL's loss_type="dft", axolotl's use_dft): each
    supervised token's CE times its own probability exp(-CE), detached, over the supervised-token
    count of the whole accumulated batch (`ce_denom`)."""
    parts = sftgo_loss(
        token_loss, groups, 0.0, num_groups=num_groups, segments=segments, ce_denom=ce_denom, num_samples=num_samples
    )
    sup = token_loss if num_samples is not None else token_loss[groups >= 0]  # given: all supervised
    n = sup.new_tensor(float(sup.numel())) if ce_denom is None else torch.as_tensor(ce_denom, dtype=sup.dtype)
    parts.loss = (torch.exp(-sup).detach() * sup).sum() / n.clamp(min=1)
    return parts


def weighted_loss(
    token_loss,
    groups,
    weight: float,
    *,
    num_groups=None,
    ce_denom=None,
    important_denom=None,
    segments=None,
    num_samples=None,
) -> LossParts:
    """CE with a fixed weight on the important group (K-1) and 1 on the others, as a weighted token
    mean: sum(w_t * CE_t) / sum(w_t), the sums over the whole accumulated batch (`ce_denom`
    supervised tokens, `important_denom` of them important).  weight = 1 is plain SFT; the control
    that separates SFT-GO's worst-group max from plain re-weighting."""
    parts = sftgo_loss(
        token_loss, groups, 0.0, num_groups=num_groups, segments=segments, ce_denom=ce_denom, num_samples=num_samples
    )
    k = parts.group_sum.numel()
    keep = groups >= 0
    important = groups == (k - 1)
    n = (
        token_loss.new_tensor(float(keep.sum()))
        if ce_denom is None
        else torch.as_tensor(ce_denom, dtype=token_loss.dtype)
    )
    n_imp = (
        token_loss.new_tensor(float(important.sum()))
        if important_denom is None
        else torch.as_tensor(important_denom, dtype=token_loss.dtype)
    )
    w = torch.where(important, float(weight), 1.0).to(token_loss.dtype) * keep  # Python numbers: no copy to the device
    parts.loss = (token_loss * w).sum() / (n + (weight - 1.0) * n_imp).clamp(min=1e-12)
    return parts


def _count(value, device) -> torch.Tensor:
    """A step-wide count as a float32 tensor, at least 1 (as the losses divide by it)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).clamp(min=1)


def _known(weights: torch.Tensor):
    """The TokenGrad (trainer.chunked_ce) of weights known before the forward: the chunk's rows of them."""
    return lambda ce, rows: weights[rows]


def ce_token_grad(groups, *, ce_denom):
    """dL / dCE per token of the token-mean CE (sft, sftgo at λ = 0): 1 / N_tok on every supervised token."""
    return _known((groups >= 0).float() / _count(ce_denom, groups.device))


def dft_token_grad(groups, *, ce_denom):
    """dL / dCE per token of dft_loss: the token's own probability exp(-CE) / N_tok (a function of its CE)."""
    scale = (groups >= 0).float() / _count(ce_denom, groups.device)
    return lambda ce, rows: torch.exp(-ce.detach()) * scale[rows]


def rho1_token_grad(groups, *, num_groups, important_denom):
    """dL / dCE per token of rho1_loss: 1 / N_important on the important group's tokens, 0 elsewhere."""
    return _known((groups == num_groups - 1).float() / _count(important_denom, groups.device))


def weighted_token_grad(groups, weight: float, *, num_groups, ce_denom, important_denom):
    """dL / dCE per token of weighted_loss: w_t / (N_tok + (weight - 1) * N_important), w_t = weight on the
    important group and 1 on the other supervised tokens."""
    n = torch.as_tensor(ce_denom, dtype=torch.float32, device=groups.device)
    n_imp = torch.as_tensor(important_denom, dtype=torch.float32, device=groups.device)
    w = torch.where(groups == num_groups - 1, float(weight), 1.0) * (groups >= 0)
    return _known(w / (n + (weight - 1.0) * n_imp).clamp(min=1e-12))


def dro_token_grad(groups, lam: float, group_weights, *, ce_denom, group_denom):
    """dL / dCE per token of sftgo_loss with online Group-DRO weights w_g (linear in the CEs):
    (1 - λ) / N_tok + λ * w_g / N_g on a supervised token of group g."""
    keep = groups >= 0
    per_group = group_weights.to(groups.device, torch.float32) / _count(group_denom, groups.device)
    index = groups.clamp(0, per_group.numel() - 1).long()  # an undeclared group id is train_loss's error
    w = (1.0 - lam) / _count(ce_denom, groups.device) + lam * per_group[index]
    return _known(w * keep)


def lam_at(step: int, total_steps: int, lam: float, schedule: str = "constant", lam_end: float = 0.0) -> float:
    """λ at an optimizer step: constant, or decaying from `lam` to `lam_end` linearly or
    along a half cosine (the paper's Eq. 5 decays the worst-group weight over training)."""
    if schedule == "constant" or total_steps <= 1:
        return lam
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return lam + (lam_end - lam) * frac
    if schedule == "cosine":
        return lam_end + (lam - lam_end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ConfigError(f"Unknown λ schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")


class GroupDRO:
    """Online Group-DRO weights (Sagawa et al. 2020): after each optimizer step,
    w_g <- w_g * exp(step_size * L_g) then renormalise (exponentiated gradient ascent on
    the simplex).  Groups absent from the step keep their weight."""

    def __init__(self, num_groups: int, step_size: float):
        self.step_size = step_size
        self.weights = torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64)

    def update(self, group_loss: torch.Tensor) -> None:
        g = group_loss.detach().double().cpu()
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))  # an empty group (NaN) leaves its weight alone
        w = self.weights * torch.exp(self.step_size * g)
        self.weights = w / w.sum()

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "step_size": self.step_size}

    def load_state_dict(self, state: dict) -> None:
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.step_size = state["step_size"]
