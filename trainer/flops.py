"""Training FLOPs of a decoder-only transformer and model FLOPs utilisation (MFU).

Input: a model's shape (a transformers config or the model itself) and the lengths of the samples a
step trains on; a measured tokens/s and a measured matmul rate for MFU.
Output: plain numbers (FLOPs per trained token, MFU as a fraction).
Cost: O(layers) for the parameter count, O(samples) for the attended length; no torch work.

The formula (matmul FLOPs only, forward + backward; a multiply-add counts as 2 FLOPs):

    FLOPs per trained token = 6 N + 12 L q T_eff

- N: parameters that take part in a matrix multiplication: every linear layer's weight, the LM head
  included (counted once more when the head is tied to the embedding: the lookup is free, the head is
  not); the embedding lookup, norms and biases are not matmul weights.  Forward 2 N per token, backward
  4 N (the gradient of the input and of the weight): 6 N.
- L layers, q = heads x head_dim (the query width; the hidden size for Llama and Qwen shapes).
  Attention per layer and token of a sample attending to t positions: Q K^T is 2 q t FLOPs and
  (softmax) V another 2 q t; backward twice that: 12 q t.
- T_eff: the attended length averaged over the trained tokens.  Causal attention over samples of lengths
  n_1..n_m (no attention across samples: padded rows or padding-free varlen) has token i of a sample
  attend to i positions, so

      T_eff = sum_j n_j (n_j + 1) / 2  /  sum_j n_j

  (one sample of length n: (n + 1) / 2).  A kernel that computes the full square and masks it (the eager
  path, or what torch.utils.flop_counter counts for any attention) does T = sum_j n_j^2 / sum_j n_j:
  `attended_length(lengths, causal=False)`.

MFU = tokens/s x FLOPs per token / the matmul rate of the device.  What the formula omits: padding (a
padded row's pad positions are computed but not trained tokens: MFU counts useful work), recomputation
under gradient checkpointing, the elementwise work (norms, activations, softmax, rotary embedding, the
loss) and the optimizer step, none of which is matmul work, and the rotary-frequency outer product
(a [head_dim / 2, 1] x [1, T] product per sequence, a few FLOPs per token).
"""

from __future__ import annotations

from collections.abc import Iterable


def shape(config) -> dict:
    """The numbers the formula needs from a transformers decoder config (Llama, Qwen2, Mistral shapes)."""
    d = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return {
        "layers": int(config.num_hidden_layers),
        "hidden": d,
        "q_width": heads * head_dim,
        "kv_width": kv * head_dim,
        "intermediate": int(config.intermediate_size),
        "vocab": int(config.vocab_size),
    }


def matmul_parameters(config) -> int:
    """N: the weights of every matmul of a Llama-style decoder (q, k, v, o, gate, up, down per layer, and
    the LM head, tied or not)."""
    s = shape(config)
    d, q, kv, ff = s["hidden"], s["q_width"], s["kv_width"], s["intermediate"]
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff
    return s["layers"] * per_layer + s["vocab"] * d


def linear_parameters(model) -> int:
    """N counted on a built model: the weights of its nn.Linear modules (a tied head is its own module)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attended_length(lengths: Iterable[int], causal: bool = True) -> float:
    """T_eff over samples of these lengths: causal (sum n(n+1)/2 / sum n) or the full square (sum n^2 / sum n)."""
    lengths = [int(n) for n in lengths]
    tokens = sum(lengths)
    if tokens <= 0:
        raise ValueError("attended_length needs at least one token.")
    pairs = sum(n * (n + 1) // 2 for n in lengths) if causal else sum(n * n for n in lengths)
    return pairs / tokens


def flops_per_token(config, lengths: Iterable[int], causal: bool = True) -> float:
    """6 N + 12 L q T_eff: training FLOPs (forward + backward, matmuls) per trained token."""
    s = shape(config)
    return 6 * matmul_parameters(config) + 12 * s["layers"] * s["q_width"] * attended_length(lengths, causal)


def mfu(tokens_per_s: float, flops_per_token_: float, matmul_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the useful matmul FLOPs per second over the device's measured matmul rate."""
    if matmul_flops_per_s <= 0:
        raise ValueError("mfu needs a positive matmul rate.")
    return tokens_per_s * flops_per_token_ / matmul_flops_per_s
