"""The language-model head and its cross-entropy, chunk by chunk: per-token CE without the full logits.

Input: hidden states [N, H] of the supervised positions, the lm_head (a Linear, bias or not), targets [N];
for the fused path also the objective's weight on each token's CE (dL / dCE_i, see `fused_cross_entropy`).
Output: float32 CE per token [N]; `token_cross_entropy` makes it differentiable in the hidden states, the
head's weight and its bias; `fused_cross_entropy` returns the weighted sum of the CEs instead, whose gradient
it computed during the forward.
Cost: one head GEMM per chunk forward.  Two-pass path: the backward recomputes the logits of every chunk but
the last, then two GEMMs per chunk (grad_h, grad_W).  Fused path: grad_h and grad_W in the forward (three
GEMMs per chunk in all, none in the backward), holding grad_h [N, H] and grad_W [V, H] (fp32) from the forward
to the backward.

Which path: an objective whose weight on a token's CE is known before the forward (sft, rho1, weighted,
sftgo at λ = 0 or with Group-DRO weights) or depends on that token's own CE alone (dft) declares it with its
`token_grad` hook (trainer/registry.py) and trains on the fused path; the others (sftgo's max over the
groups of a sample or a batch needs every token's CE first) keep the two-pass path.

Dtypes: the GEMMs run in the compute dtype -- autocast's (bf16 on GPUs) when autocast is on and the hidden
states are fp32, else the hidden states' own dtype (bf16 weights: bf16; fp32 stays fp32) -- and accumulate in
fp32 inside the GEMM.  Each chunk's logits are turned to fp32 before the log-sum-exp and the softmax, and the
head's weight gradient is summed over the chunks in an fp32 buffer (each chunk's product in the compute dtype,
then added: torch's out_dtype GEMMs, which would skip that rounding, have no CPU kernel, and one path serves
both).  Memory per chunk: `chunk` x V fp32 logits (turned into the softmax in place), their compute-dtype
GEMM output, and one V x H compute-dtype product for the weight gradient; `chunk_rows` picks `chunk` from a
memory budget when none is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CUDA_LOGITS_BYTES = 1 << 30
"""The fp32 logits of one chunk may take this much device memory on CUDA (chunk_rows)."""
CPU_CHUNK = 1024
"""Rows per chunk elsewhere (CPU): small chunks keep the host's temporaries in cache-sized pieces."""

TokenGrad = Callable[[torch.Tensor, slice], torch.Tensor]
"""(a chunk's detached CE [n], its rows among the N targets) -> the objective's dL / dCE of those n tokens."""


def chunk_rows(vocab: int, device: torch.device | str, budget: int | None = None) -> int:
    """Rows per chunk set by memory: the most rows whose fp32 logits (rows x `vocab` x 4 bytes) fit in `budget`
    bytes; without a budget, CUDA_LOGITS_BYTES on a CUDA device and CPU_CHUNK rows elsewhere."""
    if budget is None:
        if torch.device(device).type != "cuda":
            return CPU_CHUNK
        budget = CUDA_LOGITS_BYTES
    return max(1, int(budget) // (4 * max(1, int(vocab))))


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head GEMMs' dtype: autocast's when it is on for the hidden states' device and they are fp32,
    else the hidden states' own."""
    device = hidden.device.type
    if hidden.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _row_logsumexp(logits: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """torch.logsumexp over the last dim, `rows` rows at a time: its temporaries are rows x V, not the
    whole chunk's (the same per-row reduction, so the same values)."""
    if logits.shape[0] <= rows:
        return torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.logsumexp(logits[j : j + rows], dim=-1) for j in range(0, logits.shape[0], rows)])


class _Head:
    """The head in the compute dtype and the gradient buffers of one call: the per-chunk arithmetic that both
    paths share (logits, CE, softmax gradient, the grad_h / grad_W / grad_b GEMMs)."""

    def __init__(self, hidden, weight, bias, needs=(False, False, False), dtype=None, grad_h_dtype=None):
        self.dtype = compute_dtype(hidden) if dtype is None else dtype
        self.acc_dtype = torch.promote_types(self.dtype, torch.float32)
        self.h = hidden.to(self.dtype)
        self.w = weight.to(self.dtype)
        self.b = None if bias is None else bias.to(self.dtype)
        self.device = hidden.device.type
        n = hidden.shape[0]
        self.grad_h = hidden.new_empty(hidden.shape, dtype=grad_h_dtype) if needs[0] else None
        self.grad_w = torch.zeros(weight.shape, dtype=self.acc_dtype, device=weight.device) if needs[1] else None
        self.grad_b = torch.zeros(bias.shape, dtype=self.acc_dtype, device=bias.device) if needs[2] else None
        self.n = n

    def no_autocast(self):
        """The GEMMs run in self.dtype whatever autocast says (the backward may run inside an autocast region)."""
        return torch.autocast(self.device, enabled=False)

    def logits(self, rows: slice) -> torch.Tensor:
        """fp32 logits [n, V] of the chunk `rows` (the GEMM in the compute dtype)."""
        return F.linear(self.h[rows], self.w, self.b).float()

    def add_grads(self, rows: slice, g: torch.Tensor) -> None:
        """Given dL/dlogits [n, V] (fp32) of the chunk `rows`: grad_h[rows] = g @ W, grad_W += g.T @ h,
        grad_b += sum of g; the GEMMs in the compute dtype, grad_W summed in its fp32 buffer."""
        gc = g.to(self.dtype)
        if self.grad_h is not None:
            self.grad_h[rows] = gc @ self.w
        if self.grad_w is not None:
            if self.dtype == self.acc_dtype:  # accumulated in place: no second V x H buffer per chunk
                self.grad_w.addmm_(gc.t(), self.h[rows])
            else:  # the chunk's product in the compute dtype, summed in fp32
                self.grad_w.add_(gc.t() @ self.h[rows])
        if self.grad_b is not None:
            self.grad_b.add_(g.sum(0))


def _softmax_grad(logits, lse, targets, weights):
    """(softmax - onehot(targets)) * weights[:, None], in place in the fp32 logits [n, V]."""
    g = logits.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    return g.mul_(weights[:, None].float())


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-token CE of (hidden @ weight.T [+ bias]) against targets, chunk by chunk (the two-pass path).

    Forward keeps the per-token log-sum-exp and the softmax of its last chunk only; backward
    reuses that chunk's softmax and recomputes the logits of the others, turning them into the
    softmax in place and adding into one V x H weight gradient.  So one chunk of `chunk` x V fp32
    logits exists at a time (instead of N x V; the log-sum-exp's temporaries are 128 x V), and a batch
    whose supervised tokens fit in one chunk pays no recomputation at all.  Saved for the backward: the
    hidden states in the compute dtype.  Peak memory: one chunk of logits plus one V x H fp32 weight gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        head = _Head(hidden, weight, bias)
        losses = hidden.new_empty(head.n, dtype=torch.float32)
        lse_all = hidden.new_empty(head.n, dtype=torch.float32)
        ctx.last_probs = None
        with head.no_autocast():
            for i in range(0, head.n, chunk):
                rows = slice(i, i + chunk)
                logits = head.logits(rows)
                lse = _row_logsumexp(logits)
                losses[rows] = lse - logits.gather(1, targets[rows, None]).squeeze(1)
                lse_all[rows] = lse
                if i + chunk >= head.n and any(ctx.needs_input_grad[:3]):
                    ctx.last_probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no extra copy
                del logits  # before the next chunk's: one chunk of logits at a time
        ctx.save_for_backward(head.h, weight, bias, targets, lse_all)
        ctx.chunk, ctx.hidden_dtype = chunk, hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse_all = ctx.saved_tensors
        chunk = ctx.chunk
        head = _Head(h, weight, bias, ctx.needs_input_grad[:3], dtype=h.dtype, grad_h_dtype=ctx.hidden_dtype)
        starts = list(range(0, head.n, chunk))
        with head.no_autocast():
            for i in reversed(starts):  # the last chunk first: its softmax is ready, free it early
                rows = slice(i, i + chunk)
                if i == starts[-1] and ctx.last_probs is not None:
                    g, ctx.last_probs = ctx.last_probs, None  # used once (a second backward recomputes)
                else:  # the softmax, in place in the recomputed logits: one chunk-sized buffer
                    g = head.logits(rows).sub_(lse_all[rows, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), targets[rows]] -= 1.0
                head.add_grads(rows, g.mul_(grad_out[rows, None].float()))
                del g  # before the next chunk's
        grad_w = None if head.grad_w is None else head.grad_w.to(weight.dtype)
        grad_b = None if head.grad_b is None else head.grad_b.to(bias.dtype)
        return head.grad_h, grad_w, grad_b, None, None


class _FusedLinearCE(torch.autograd.Function):
    """sum_i w_i * CE_i and the detached CE [N], with the gradient computed during the forward (the fused path).

    Per chunk: the logits, the CE, the weights w = token_grad(CE of the chunk, rows), then
    g = (softmax - onehot) * w and grad_h = g @ W, grad_W += g.T @ h, grad_b += sum g; no logits are kept and
    none are recomputed.  The backward scales the stored gradients by the incoming scalar (in place: once)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_grad, chunk):
        head = _Head(hidden, weight, bias, ctx.needs_input_grad[:3])
        losses = hidden.new_empty(head.n, dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        with head.no_autocast():
            for i in range(0, head.n, chunk):
                rows = slice(i, i + chunk)
                logits = head.logits(rows)
                lse = _row_logsumexp(logits)
                ce = lse - logits.gather(1, targets[rows, None]).squeeze(1)
                losses[rows] = ce
                weights = token_grad(ce, rows).detach().float()
                total += (weights * ce).sum()
                if any(ctx.needs_input_grad[:3]):
                    head.add_grads(rows, _softmax_grad(logits, lse, targets[rows], weights))
                del logits
        ctx.grads = (head.grad_h, head.grad_w, head.grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(losses)
        return total, losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_losses):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # once: the buffers are scaled in place and handed over
        scale = grad_total.float()
        grad_h = None if grad_h is None else grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(scale).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else grad_b.mul_(scale).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None


def _rows(hidden: torch.Tensor, lm_head: torch.nn.Linear, chunk: int | None) -> int:
    return chunk_rows(lm_head.weight.shape[0], hidden.device) if chunk is None else max(1, int(chunk))


def token_cross_entropy(
    hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor, chunk: int | None = CPU_CHUNK
):
    """Per-token CE [N] of the rows of `hidden` [N, H] projected by `lm_head`, against
    `targets` [N]; the full [N, V] logits never exist at once (see _ChunkedLinearCE).
    chunk: rows per chunk; None: set by memory (chunk_rows)."""
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float()
    return _ChunkedLinearCE.apply(hidden, lm_head.weight, lm_head.bias, targets, _rows(hidden, lm_head, chunk))


def fused_cross_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    targets: torch.Tensor,
    token_grad: TokenGrad,
    chunk: int | None = CPU_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i * CE_i, the detached CE [N]) of the rows of `hidden` [N, H] projected by `lm_head` against
    `targets` [N], with w_i = token_grad(CE of i's chunk, the chunk's rows): the objective's dL / dCE_i, which
    must not depend on any other token's CE.  Backpropagating the scalar gives the gradient of the objective;
    it was computed during the forward (see _FusedLinearCE).  chunk: as token_cross_entropy's."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, hidden.new_empty(0, dtype=torch.float32)
    rows = _rows(hidden, lm_head, chunk)
    return _FusedLinearCE.apply(hidden, lm_head.weight, lm_head.bias, targets, token_grad, rows)
