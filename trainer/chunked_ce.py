"""The language-model head and its cross-entropy, chunk by chunk: per-token CE without the full logits.

Input: hidden states [N, H] of the supervised positions, the lm_head (a Linear, bias or not), targets [N].
Output: float32 CE per token [N], differentiable in the hidden states, the head's weight and its bias.
Cost: the head's GEMM per chunk forward; backward recomputes the logits of every chunk but the last (one
extra head GEMM per chunk: the price of never holding more than one chunk of `chunk` x V fp32 logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_logsumexp(logits: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """torch.logsumexp over the last dim, `rows` rows at a time: its temporaries are rows x V, not the
    whole chunk's (the same per-row reduction, so the same values)."""
    if logits.shape[0] <= rows:
        return torch.logsumexp(logits, dim=-1)
    return torch.cat([torch.logsumexp(logits[j : j + rows], dim=-1) for j in range(0, logits.shape[0], rows)])


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-token CE of (hidden @ weight.T [+ bias]) against targets, chunk by chunk.

    Forward keeps the per-token log-sum-exp and the softmax of its last chunk only; backward
    reuses that chunk's softmax and recomputes the logits of the others, turning them into the
    softmax in place and adding into one V x H weight gradient.  So one chunk of `chunk` x V fp32
    logits exists at a time (instead of N x V; the log-sum-exp's temporaries are 128 x V), and a batch
    whose supervised tokens fit in one chunk pays no recomputation at all.  Peak memory: one chunk of
    logits plus one V x H fp32 weight gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.shape[0]
        losses = hidden.new_empty(n, dtype=torch.float32)
        lse_all = hidden.new_empty(n, dtype=torch.float32)
        w, b = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)  # explicit: autocast-proof
        ctx.last_probs = None
        for i in range(0, n, chunk):
            logits = F.linear(hidden[i : i + chunk], w, b).float()
            lse = _row_logsumexp(logits)
            tgt = logits.gather(1, targets[i : i + chunk, None]).squeeze(1)
            losses[i : i + chunk] = lse - tgt
            lse_all[i : i + chunk] = lse
            if i + chunk >= n and any(ctx.needs_input_grad[:3]):
                ctx.last_probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no extra copy
            del logits  # before the next chunk's: one chunk of logits at a time
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        chunk, n = ctx.chunk, hidden.shape[0]
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        w, b = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
        starts = list(range(0, n, chunk))
        for i in reversed(starts):  # the last chunk first: its softmax is ready, free it early
            h = hidden[i : i + chunk]
            if i == starts[-1] and ctx.last_probs is not None:
                g, ctx.last_probs = ctx.last_probs, None  # used once (a second backward recomputes)
            else:  # the softmax, in place in the recomputed logits: one chunk-sized buffer
                g = F.linear(h, w, b).float().sub_(lse_all[i : i + chunk, None]).exp_()
            rows = torch.arange(h.shape[0], device=h.device)
            g[rows, targets[i : i + chunk]] -= 1.0
            g *= grad_out[i : i + chunk, None].float()
            if grad_h is not None:
                grad_h[i : i + chunk] = g.to(hidden.dtype) @ w
            if ctx.needs_input_grad[1]:  # accumulated in place: no second V x H buffer per chunk
                grad_w = g.t() @ h.float() if grad_w is None else grad_w.addmm_(g.t(), h.float())
            if bias is not None and ctx.needs_input_grad[2]:
                part = g.sum(0)
                grad_b = part if grad_b is None else grad_b.add_(part)
            del g  # before the next chunk's
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def token_cross_entropy(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor, chunk: int = 1024):
    """Per-token CE [N] of the rows of `hidden` [N, H] projected by `lm_head`, against
    `targets` [N]; the full [N, V] logits never exist at once (see _ChunkedLinearCE)."""
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float()
    return _ChunkedLinearCE.apply(hidden, lm_head.weight, lm_head.bias, targets, max(1, int(chunk)))
