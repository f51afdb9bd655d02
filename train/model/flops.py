"""Forward FLOPs per token of the operations the mixers are made of (a multiply-add is 2).

`LanguageModel.flops_per_token(seq_len)` sums these over its layers; a training step costs
3x the forward (the backward computes two products for each one of the forward), which is what
MFU divides by. Elementwise work (gates, norms, activations) is left out, as in the usual
6 N D accounting, except for the elementwise scan where it is the whole recurrence.
"""

from __future__ import annotations


def linear(d_in: int, d_out: int) -> int:
    """`x @ W` for one token: `[d_in] x [d_in, d_out]`."""
    return 2 * d_in * d_out


def conv(dim: int, width: int) -> int:
    """A causal depthwise convolution of `width` taps over `dim` channels."""
    return 2 * dim * width


def linear_attention_scan(heads: int, key: int, value: int, chunk: int) -> int:
    """The chunkwise scan of gla / simple_gla per token: intra-chunk scores `Q K^T` (C x C x K
    per chunk, so 2 C K per token) and `A V` (2 C V), the read of the entering state `q S`
    (2 K V) and the state update `K^T V` (2 K V)."""
    return heads * (2 * chunk * key + 2 * chunk * value + 4 * key * value)


def delta_rule_scan(heads: int, key: int, value: int, chunk: int) -> int:
    """The gated delta rule's chunkwise scan per token: the linear-attention terms, plus the WY
    form: `K K^T` (2 C K), the unit-triangular solve (C^3 / 3 multiply-adds per chunk, so
    2 C^2 / 3 FLOPs per token), `W = T K` (2 C K),
    `U = T V` (2 C V) and the correction `U - W S` (2 K V)."""
    solve = 2 * chunk * chunk // 3
    wy = 2 * chunk * key + solve + 2 * chunk * key + 2 * chunk * value + 2 * key * value
    return linear_attention_scan(heads, key, value, chunk) + heads * wy


def elementwise_scan(dim: int) -> int:
    """`h = a * h + b` over `dim` channels: a multiply and an add."""
    return 2 * dim


def softmax_attention(heads: int, head_dim: int, seq_len: int, window: int | None = None) -> int:
    """Causal `Q K^T` and `P V` averaged over the positions of a `seq_len` sequence: token t
    attends to min(t + 1, window) keys, 4 * head_dim FLOPs per key and head."""
    if window is None or window >= seq_len:
        mean_keys = (seq_len + 1) / 2
    else:  # the first `window` tokens ramp up, the rest see `window` keys
        ramp = window * (window + 1) / 2
        mean_keys = (ramp + (seq_len - window) * window) / seq_len
    return round(4 * heads * head_dim * mean_keys)
