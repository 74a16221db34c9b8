"""One training step anyone can call: micro-batches -> per-token loss -> objective -> backward.

Input: `net`, a module whose forward(input_ids, position_ids, targets) returns the CE of each
supervised target ([N], row-major; trainer.model.TokenLossModel, or DDP around it), the
micro-batches of one optimizer step (trainer.batching.Batch), an `Objective` and λ.
Output: gradients accumulated in the parameters (no optimizer step: the caller clips and
steps), and a `StepStats` with the step's loss, CE, worst term, ties, per-group sums/counts
and the step's counts, summed over the micro-batches and, under torch.distributed, the ranks.
Cost: the model's forward and backward per micro-batch; O(tokens) bookkeeping; under
torch.distributed two all-reduces of a few numbers per step.

Denominators: every micro-batch's loss is divided by the counts of the whole accumulated
(global) batch -- supervised tokens, supervised samples and tokens per group, summed over
the micro-batches of this step and over ranks -- so summing the micro-batch gradients gives
the gradient of the whole batch's loss (trainer.objectives explains the one exception).
The loop, bench/bench_train.py and a Hugging Face Trainer integration all call these.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sftgo.trainer import registry
from sftgo.trainer.batching import IGNORE
from sftgo.trainer.objectives import LossParts
from sftgo.trainer.registry import LossInput


@dataclass(frozen=True)
class Objective:
    """The run's objective and its settings; λ is passed per step, as it may follow a schedule."""

    name: str = "sftgo"
    """A registered objective (trainer/registry.py): sftgo, sft, rho1, dft, weighted or a plug-in."""
    num_groups: int = 2
    """K, at least 2 (a single group just leaves group 1 empty)."""
    reduce: str = "sample"
    """sample or batch: how the worst-group term reduces (sftgo)."""
    temperature: float = 0.0
    """> 0: smooth max at this temperature instead of the max (sftgo)."""
    weight: float = 1.0
    """The fixed weight on the important group (weighted)."""

    @property
    def impl(self):
        """The objective itself (its losses, what it reads and trains)."""
        return registry.get(self.name)


@dataclass
class Counts:
    """The counts of one step's micro-batches, over all ranks; the first three are the denominators."""

    loss_tokens: float
    samples: float
    group_tokens: torch.Tensor  # [K], on the loss's device
    tokens: int  # real (non-pad) tokens
    truncated_samples: int
    truncated_loss_tokens: int
    skipped_samples: int


@dataclass
class StepStats:
    """Sums over the step's micro-batches (and ranks) of what the objective reported."""

    loss: float
    ce: float
    worst: float
    ties: int
    group_sum: torch.Tensor  # [K] float64, CPU
    group_count: torch.Tensor  # [K] float64, CPU
    counts: Counts
    grad_sum: torch.Tensor  # [K] float64, CPU: sum over each group's tokens of d loss / d token CE

    @property
    def group_loss(self) -> torch.Tensor:
        """[K] mean loss per group over the step (NaN where a group had no token)."""
        return self.group_sum / self.group_count

    @property
    def group_weight(self) -> torch.Tensor:
        """[K] the objective's mean weight on a token of each group, relative to plain SFT (whose weight
        on every token is 1 / supervised tokens): how much more SFT-GO pushes on the important group."""
        return self.grad_sum / self.group_count * self.counts.loss_tokens


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) over ranks in place when torch.distributed is initialised; else t."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def denominators(groups: torch.Tensor, segments: torch.Tensor, k: int) -> torch.Tensor:
    """[supervised targets, supervised samples, targets per group (K)] of one micro-batch (group -1 =
    not supervised; segments: the sample of each target).  Summed over micro-batches (and ranks),
    these divide every micro-batch's loss: sftgo-train and the Hugging Face integration share them."""
    sup = groups >= 0
    g = groups[sup]
    c = torch.zeros(k + 2, dtype=torch.float64)
    c[0] = g.numel()
    c[1] = torch.unique(segments[sup]).numel()
    c[2:] = torch.bincount(g.flatten().cpu(), minlength=k)[:k].double()
    return c


def step_counts(micro, k: int, device) -> Counts:
    """The counts of the micro-batches of one optimizer step, summed over ranks."""
    c = torch.zeros(k + 6, dtype=torch.float64)
    for mb in micro:
        c[: 2 + k] += denominators(mb.groups, mb.segments, k)
        c[2 + k :] += torch.tensor(
            [mb.num_tokens, mb.truncated_samples, mb.truncated_loss_tokens, mb.skipped_samples], dtype=torch.float64
        )
    c = all_reduce(c.to(device)).cpu()
    rest = [int(v) for v in c[2 + k :].tolist()]
    return Counts(c[0].item(), c[1].item(), c[2 : 2 + k].to(device), *rest)


def objective_parts(
    obj: Objective, token_loss, groups, segments, lam: float, counts: Counts, group_weights: torch.Tensor | None = None
) -> LossParts:
    """LossParts of one micro-batch (flat [N] losses, groups and sample ids of its supervised
    targets), divided by the whole step's denominators; `group_weights`: online Group-DRO.
    The objective named `obj.name` computes it (trainer/registry.py)."""
    return obj.impl.train_loss(LossInput(token_loss, groups, segments, counts, lam, obj, group_weights))


def fused_token_grad(net, obj: Objective, groups, segments, lam: float, counts: Counts, group_weights=None):
    """The objective's dL / dCE per token for the fused head (trainer.chunked_ce.fused_cross_entropy), or None:
    the two-pass head (an objective without an exact token_grad, a net that does not take one, no autograd)."""
    hook = getattr(obj.impl, "token_grad", None)
    if hook is None or not torch.is_grad_enabled() or not getattr(getattr(net, "module", net), "fused_ce", False):
        return None
    return hook(LossInput(None, groups, segments, counts, lam, obj, group_weights))


def micro_loss(net, mb, obj: Objective, lam: float, counts: Counts, group_weights, autocast):
    """One micro-batch's forward: (token CE [N] fp32, groups [N], LossParts, the scalar to backpropagate).

    Two-pass head: the scalar is LossParts.loss.  Fused head: the net returns sum_i w_i * CE_i, whose
    gradient it computed during the forward, and the detached CE; LossParts (and the metrics) come from the
    objective on that CE as a leaf, so they are the two-pass path's."""
    keep = mb.targets != IGNORE
    groups, segments = mb.groups[keep], mb.segments[keep]
    token_grad = fused_token_grad(net, obj, groups, segments, lam, counts, group_weights)
    with autocast():
        if token_grad is None:
            out = net(mb.input_ids, mb.position_ids, mb.targets, **mb.attention_kwargs())
        else:
            out = net(mb.input_ids, mb.position_ids, mb.targets, token_grad=token_grad, **mb.attention_kwargs())
    token_loss = (out if token_grad is None else out[1].detach().requires_grad_()).float()
    parts = objective_parts(obj, token_loss, groups, segments, lam, counts, group_weights)
    return token_loss, groups, parts, parts.loss if token_grad is None else out[0]


def backward_step(
    net,
    micro,
    obj: Objective,
    lam: float,
    *,
    group_weights=None,
    autocast=contextlib.nullcontext,
    grad_scale: float = 1.0,
) -> StepStats:
    """Forward and backward every micro-batch of one optimizer step (already on the device).

    `net` may be a DistributedDataParallel: gradients are then all-reduced on the last
    micro-batch only, and since DDP averages them over ranks while our denominators are
    already global, pass grad_scale=world_size to undo its 1/world.  `autocast`: a
    context-manager factory (e.g. bf16 autocast on GPUs)."""
    device = micro[0].input_ids.device
    k = obj.num_groups
    counts = step_counts(micro, k, device)
    acc = torch.zeros(4 + 3 * k, dtype=torch.float64)  # loss, ce, worst, ties, group sums, counts, grad sums
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            net.set_requires_gradient_sync(last)
        with net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext():
            token_loss, groups, parts, to_backward = micro_loss(net, mb, obj, lam, counts, group_weights, autocast)
            acc[4 + 2 * k :] += token_weights(parts.loss, token_loss, groups, k)
            (to_backward * grad_scale).backward()
        acc[:4] += torch.tensor(
            [parts.loss.item(), float(parts.ce), float(parts.worst), parts.ties], dtype=torch.float64
        )
        acc[4 : 4 + k] += parts.group_sum.double().cpu()
        acc[4 + k : 4 + 2 * k] += parts.group_count.double().cpu()
    acc = all_reduce(acc.to(device)).cpu()
    return StepStats(
        acc[0].item(),
        acc[1].item(),
        acc[2].item(),
        int(acc[3].item()),
        acc[4 : 4 + k],
        acc[4 + k : 4 + 2 * k],
        counts,
        acc[4 + 2 * k :],
    )


def token_weights(loss: torch.Tensor, token_loss: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """[K] sum over each group's tokens of d loss / d token CE: the weight the objective puts on each
    token (O(tokens): autograd through the objective only, not the model)."""
    if not token_loss.requires_grad or token_loss.numel() == 0:
        return torch.zeros(k, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, token_loss, retain_graph=True)
    sup = groups >= 0
    return torch.zeros(k, dtype=torch.float64).index_add_(0, groups[sup].long().cpu(), grad[sup].double().cpu())
