"""Training objectives as plug-ins: the protocol every objective implements, and the registry.

Input: an objective name (as given to `--objective` or `SFTGOTrainer(objective=...)`).
Output: the objective object, which `sftgo-train`, `SFTGOTrainer`, the pre-flight checks, the evaluation
and the metrics all ask; nothing else tests an objective's name.  The built-ins (sftgo, sft, rho1, dft,
weighted) live in trainer/builtin.py.  Others come from an installed package's entry point in the group
`sftgo.objectives` (then `sftgo-train --objective NAME` works, on every torchrun rank), or register with
`register(obj)` in the process that trains.
Cost: none; importing this module imports no torch, so a bad setting is refused before torch loads.

The protocol, per objective:
  name: str                    --objective NAME
  summary: str                 one line for --help
  settings: tuple[str, ...]    the TrainConfig fields it reads of those only some objectives read
                               (lam, lam_schedule, lam_end, reduce, temperature, dro_step,
                               group_weight); a changed one it does not read is a note, not silence
  groups: str                  "optional": trains on every supervised token, a group column only
                               adds per-group metrics; "required": needs --groups; "important":
                               trains on the important group (K - 1), so the data must have one
  train_loss(x: LossInput) -> LossParts
                               one micro-batch's loss, already divided by the whole step's counts
                               (x.counts) so that summing micro-batches gives the step's loss
  eval_loss(ce, worst, group_loss, lam) -> float
                               the held-out loss from the eval set's CE, worst term and per-group loss
  trained_tokens(counts) -> float
                               the tokens one step trained on (a run that trained on none fails)
  token_grad(x: LossInput) -> TokenGrad | None   (optional)
                               the objective's dL / dCE per token for the fused head (trainer.chunked_ce):
                               x.token_loss is None (called before the forward); return a function of
                               (a chunk's detached CE [n], its rows among the N targets) -> [n] weights,
                               only where that is exact: the weights known before the forward or each a
                               function of the token's own CE.  Absent or None: the two-pass head, which
                               computes every CE first and backpropagates through train_loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sftgo.core.plugins import Registry
from sftgo.trainer import builtin

GROUP_USES = ("optional", "required", "important")

# the TrainConfig fields that only some objectives read (the others every objective reads)
OBJECTIVE_FIELDS = ("lam", "lam_schedule", "lam_end", "reduce", "temperature", "dro_step", "group_weight")


@dataclass
class LossInput:
    """What an objective's train_loss gets for one micro-batch (all tensors on the loss's device)."""

    token_loss: object
    """float32 [N]: the CE of each supervised target of the micro-batch (None when token_grad is asked)."""
    groups: object
    """int [N]: each target's group id (0..K-1)."""
    segments: object
    """int [N]: each target's sample id (unique within the micro-batch)."""
    counts: object
    """trainer.step.Counts of the whole step (all micro-batches, all ranks): loss_tokens, samples,
    group_tokens [K] -- the denominators."""
    lam: float
    """λ at this step (from --lam and its schedule)."""
    settings: object
    """trainer.step.Objective: num_groups (K), reduce, temperature, weight (--group-weight)."""
    group_weights: object = None
    """[K] online Group-DRO weights when --dro-step > 0, else None."""
    num_samples: int | None = None
    """When given (sftgo-train's step), `segments` are numbered 0..num_samples-1 in this micro-batch, found on
    the host: an objective that passes it on (trainer.objectives) never makes the host wait for the device."""


@runtime_checkable
class Objective(Protocol):
    name: str
    summary: str
    settings: tuple
    groups: str

    def train_loss(self, x: LossInput): ...

    def eval_loss(self, ce: float, worst: float, group_loss: list, lam: float) -> float: ...

    def trained_tokens(self, counts) -> float: ...


def _attributes(obj, where: str) -> None:
    from sftgo.core.plugins import PluginShapeError

    if getattr(obj, "groups", None) not in GROUP_USES:
        raise PluginShapeError(
            f"{where} has groups={getattr(obj, 'groups', None)!r}; use one of {', '.join(GROUP_USES)}."
        )
    unknown = [s for s in getattr(obj, "settings", ()) if s not in OBJECTIVE_FIELDS]
    if not isinstance(obj.settings, tuple) or unknown:
        raise PluginShapeError(
            f"{where} reads settings {obj.settings!r}; an objective's settings are a tuple of "
            f"{', '.join(OBJECTIVE_FIELDS)}."
        )


_BUILTIN = builtin.BUILTIN  # name -> "module:attribute" (trainer/builtin.py imports no torch)
REGISTRY = Registry(
    "objective",
    "sftgo.objectives",
    _BUILTIN,
    Objective,
    "name, summary, settings, groups, train_loss, eval_loss, trained_tokens",
    _attributes,
)
names, get, register, unregister = REGISTRY.names, REGISTRY.get, REGISTRY.register, REGISTRY.unregister


def readers(setting: str) -> list[str]:
    """The objectives that read `setting` (one of OBJECTIVE_FIELDS)."""
    return [name for name in names() if setting in get(name).settings]
