"""One training step anyone can call: micro-batches -> per-token loss -> objective -> backward.

Input: `net`, a module whose forward(input_ids, position_ids, targets) returns the CE of each
supervised target ([N], row-major; trainer.model.TokenLossModel, or DDP around it), the
micro-batches of one optimizer step (trainer.batching.Batch), an `Objective` and λ.
Output: gradients accumulated in the parameters (no optimizer step: the caller clips and
steps), and a `StepStats` with the step's loss, CE, worst term, ties, per-group sums/counts
and the step's counts, summed over the micro-batches and, under torch.distributed, the ranks.
Cost: the model's forward and backward per micro-batch; O(tokens) bookkeeping on the device;
under torch.distributed two all-reduces of a few numbers per step.  Nothing in the step makes
the host wait for the device (the supervised positions and counts come from the host, see
trainer.supervised; the statistics are read in one transfer when the caller asks).

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
from sftgo.trainer.objectives import LossParts, group_id_error
from sftgo.trainer.registry import LossInput
from sftgo.trainer.supervised import Supervised, find


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
    """The counts of one step's micro-batches, over all ranks; the first three are the denominators.

    Found on the host (trainer.supervised).  In a step under torch.distributed the denominators are the
    all-reduced sums, 0-dim tensors on the device (never read back by the step itself); StepStats.counts
    holds them as numbers."""

    loss_tokens: float | torch.Tensor
    samples: float | torch.Tensor
    group_tokens: torch.Tensor  # [K], on the loss's device
    tokens: int  # real (non-pad) tokens
    truncated_samples: int
    truncated_loss_tokens: int
    skipped_samples: int

    @classmethod
    def of(cls, c, k: int, device) -> Counts:
        """From the k + 6 sums [loss tokens, samples, K group tokens, tokens, the three cut counts]: a list
        of numbers (the group tokens are copied to `device`) or a tensor on the device (kept there)."""
        if isinstance(c, torch.Tensor):
            return cls(c[0], c[1], c[2 : 2 + k], *c[2 + k :].unbind())
        rest = [int(v) for v in c[2 + k :]]
        return cls(
            float(c[0]),
            float(c[1]),
            torch.tensor(c[2 : 2 + k], dtype=torch.float64).to(device, non_blocking=True),
            *rest,
        )


class StepStats:
    """Sums over the step's micro-batches (and ranks) of what the objective reported.

    They stay on the device until first asked for: `read(*extra)` brings them, the step's counts and any
    `extra` scalars (the loop's gradient norm) to the host in one transfer; reading any field does it too.
    Fields: loss, ce, worst, ties, group_sum [K], group_count [K], grad_sum [K] (sum over each group's
    tokens of d loss / d token CE; float64 CPU tensors) and counts (host numbers)."""

    def __init__(self, acc: torch.Tensor, counts, k: int):
        self._acc, self._counts, self._k = acc, counts, k  # counts: a list of host numbers or a device tensor
        self._host: list | None = None

    def read(self, *extra: torch.Tensor) -> list[float]:
        """The step's sums on the host (one device-to-host copy with `extra`); returns `extra` as floats."""
        on_device = [self._acc] if self._host is None else []
        if self._host is None and isinstance(self._counts, torch.Tensor):
            on_device.append(self._counts.to(self._acc.device, torch.float64))
        on_device += [torch.as_tensor(e).detach().reshape(1).to(self._acc.device, torch.float64) for e in extra]
        values = torch.cat(on_device).cpu().tolist() if on_device else []
        if self._host is None:
            n, self._host = self._acc.numel(), values
            if isinstance(self._counts, torch.Tensor):
                self._counts = values[n : n + self._counts.numel()]
            self._host = values[:n]
        return values[len(values) - len(extra) :] if extra else []

    def _v(self) -> list:
        if self._host is None:
            self.read()
        return self._host

    loss = property(lambda self: self._v()[0])
    ce = property(lambda self: self._v()[1])
    worst = property(lambda self: self._v()[2])
    ties = property(lambda self: int(self._v()[3]))
    group_sum = property(lambda self: torch.tensor(self._v()[4 : 4 + self._k], dtype=torch.float64))
    group_count = property(lambda self: torch.tensor(self._v()[4 + self._k : 4 + 2 * self._k], dtype=torch.float64))
    grad_sum = property(lambda self: torch.tensor(self._v()[4 + 2 * self._k :], dtype=torch.float64))

    @property
    def counts(self) -> Counts:
        self._v()
        return Counts.of(self._counts, self._k, "cpu")

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
    these divide every micro-batch's loss.  The Hugging Face integration counts with this; sftgo-train's step
    counts the same from the host's Supervised (no device sync)."""
    sup = groups >= 0
    g = groups[sup]
    c = torch.zeros(k + 2, dtype=torch.float64)
    c[0] = g.numel()
    c[1] = torch.unique(segments[sup]).numel()
    c[2:] = torch.bincount(g.flatten().cpu(), minlength=k)[:k].double()
    return c


def supervised_of(mb) -> Supervised:
    """The micro-batch's supervised targets as index tensors (collate finds them on the host; a batch made
    otherwise pays the device syncs of finding them here)."""
    if mb.sup is not None:
        return mb.sup
    return find(mb.targets, mb.groups, mb.segments, mb.input_ids).to(mb.input_ids.device)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def step_counts(micro, k: int, device) -> Counts:
    """The counts of the micro-batches of one optimizer step, summed over ranks (from host numbers: no
    device sync; under torch.distributed one all-reduce, whose result stays on the device)."""
    c = [0.0] * (k + 6)
    for mb in micro:
        sup = supervised_of(mb)
        if len(sup.group_tokens) > k:
            raise group_id_error(len(sup.group_tokens) - 1, k)
        for i, v in enumerate(
            [sup.num_targets, sup.num_samples, *sup.group_tokens, *[0] * (k - len(sup.group_tokens))]
            + [mb.num_tokens, mb.truncated_samples, mb.truncated_loss_tokens, mb.skipped_samples]
        ):
            c[i] += v
    if distributed():
        return all_reduce(torch.tensor(c, dtype=torch.float64).to(device, non_blocking=True))
    return c


def objective_parts(
    obj: Objective,
    token_loss,
    groups,
    segments,
    lam: float,
    counts: Counts,
    group_weights: torch.Tensor | None = None,
    num_samples: int | None = None,
) -> LossParts:
    """LossParts of one micro-batch (flat [N] losses, groups and sample ids of its supervised
    targets), divided by the whole step's denominators; `group_weights`: online Group-DRO;
    `num_samples`: the sample ids are 0..num_samples-1, found on the host (no device sync).
    The objective named `obj.name` computes it (trainer/registry.py)."""
    return obj.impl.train_loss(LossInput(token_loss, groups, segments, counts, lam, obj, group_weights, num_samples))


def fused_token_grad(net, obj: Objective, sup, lam: float, counts: Counts, group_weights=None):
    """The objective's dL / dCE per token for the fused head (trainer.chunked_ce.fused_cross_entropy), or None:
    the two-pass head (an objective without an exact token_grad, a net that does not take one, no autograd)."""
    hook = getattr(obj.impl, "token_grad", None)
    if hook is None or not torch.is_grad_enabled() or not getattr(getattr(net, "module", net), "fused_ce", False):
        return None
    return hook(LossInput(None, sup.groups, sup.samples, counts, lam, obj, group_weights, sup.num_samples))


def micro_loss(net, mb, sup, obj: Objective, lam: float, counts: Counts, group_weights, autocast):
    """One micro-batch's forward: (token CE [N] fp32, LossParts, the scalar to backpropagate); `sup`: its
    supervised targets found on the host (trainer.supervised).

    Two-pass head: the scalar is LossParts.loss.  Fused head: the net returns sum_i w_i * CE_i, whose
    gradient it computed during the forward, and the detached CE; LossParts (and the metrics) come from the
    objective on that CE as a leaf, so they are the two-pass path's."""
    token_grad = fused_token_grad(net, obj, sup, lam, counts, group_weights)
    fused = {} if token_grad is None else {"token_grad": token_grad}
    with autocast():
        out = net(
            mb.input_ids,
            mb.position_ids,
            sup.targets,
            index=sup.index,
            distinct_ids=sup.distinct_ids,
            **fused,
            **mb.attention_kwargs(),
        )
    token_loss = (out if token_grad is None else out[1].detach().requires_grad_()).float()
    parts = objective_parts(obj, token_loss, sup.groups, sup.samples, lam, counts, group_weights, sup.num_samples)
    return token_loss, parts, parts.loss if token_grad is None else out[0]


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
    context-manager factory (e.g. bf16 autocast on GPUs).  The host never waits for the device
    here: the returned StepStats are read when the caller asks (one transfer)."""
    device = micro[0].input_ids.device
    k = obj.num_groups
    summed = step_counts(micro, k, device)
    counts = Counts.of(summed, k, device)
    if group_weights is not None:
        group_weights = group_weights.to(device, non_blocking=True)
    acc = torch.zeros(4 + 3 * k, dtype=torch.float64, device=device)  # loss, ce, worst, ties, group sums, counts,
    for i, mb in enumerate(micro):  # grad sums
        last = i == len(micro) - 1
        sup = supervised_of(mb)
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            net.set_requires_gradient_sync(last)
        with net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext():
            token_loss, parts, to_backward = micro_loss(net, mb, sup, obj, lam, counts, group_weights, autocast)
            acc[4 + 2 * k :] += token_weights(parts.loss, token_loss, sup.groups, k)
            (to_backward * grad_scale).backward()
        acc[:4] += torch.stack([device_scalar(v, device) for v in (parts.loss, parts.ce, parts.worst, parts.ties)])
        acc[4 : 4 + k] += parts.group_sum.double()
        acc[4 + k : 4 + 2 * k] += parts.group_count.double()
    return StepStats(all_reduce(acc), summed, k)


def device_scalar(v, device) -> torch.Tensor:
    """A 0-dim float64 tensor on `device` of a tensor or a Python number (filled there: no copy that waits)."""
    if isinstance(v, torch.Tensor):
        return v.detach().to(device, torch.float64, non_blocking=True).reshape(())
    return torch.full((), float(v), dtype=torch.float64, device=device)


def token_weights(loss: torch.Tensor, token_loss: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """[K] float64 sum over each group's tokens (group -1: none) of d loss / d token CE: the weight the
    objective puts on each token (O(tokens): autograd through the objective only, not the model); on the
    loss's device."""
    if not token_loss.requires_grad or token_loss.numel() == 0:
        return torch.zeros(k, dtype=torch.float64, device=token_loss.device)
    (grad,) = torch.autograd.grad(loss, token_loss, retain_graph=True)
    weights = grad.double() * (groups >= 0)
    return torch.zeros(k, dtype=torch.float64, device=grad.device).index_add_(0, groups.clamp(min=0).long(), weights)
