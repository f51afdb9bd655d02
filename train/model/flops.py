"""Forward model FLOPs per token of the operations the mixers are made of (a multiply-add is 2).

`LanguageModel.flops_per_token(seq_len)` sums these over its layers; a training step costs
3x the forward (the backward computes two products for each one of the forward), which is what
MFU divides by. Elementwise work (gates, decays, norms, activations) is left out, as in the
usual 6 N D accounting, except for the elementwise scan where it is the whole recurrence.

Model FLOPs, not kernel FLOPs: every token mixer is counted in its recurrent (step) form,
one token at a time, which is a property of the model and not of the algorithm that computes
it. For a matrix-state recurrence that is the write `k v^T` and the read `q^T S` (2 K V each per
head), whatever the chunk size C of the chunkwise kernels; for softmax attention it is a query
against each of its t + 1 cached keys (4 D per key and head), which is exactly the causal half
of the `T x T` scores that attention is usually counted with. The chunkwise kernels do more
arithmetic than this (intra-chunk scores, about (C + 1)(K + V) per token and head counted
causally, more with the masked upper triangle; the delta rule's WY form and its triangular
solve): that is hardware work, like activation recomputation, and MFU leaves it out, so it
compares chunk sizes with one another and recurrent mixers with attention.
"""

from __future__ import annotations


def linear(d_in: int, d_out: int) -> int:
    """`x @ W` for one token: `[d_in] x [d_in, d_out]`."""
    return 2 * d_in * d_out


def conv(dim: int, width: int) -> int:
    """A causal depthwise convolution of `width` taps over `dim` channels."""
    return 2 * dim * width


def linear_attention(heads: int, key: int, value: int) -> int:
    """`S_t = decay * S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t` per token (gla and simple_gla: the
    gla, hgrn2, retnet and mamba2 mixers): per head the write `k v^T` into the `[K, V]` state
    (a multiply and an add per entry, 2 K V) and the read `q^T S` (2 K V); the decay is
    elementwise."""
    return heads * 4 * key * value


def delta_rule(heads: int, key: int, value: int, steps: int = 1) -> int:
    """`S = a (I - beta k k^T) S + beta k v^T` applied `steps` times per token (> 1: DeltaProduct)
    and read once, `o = q^T S`: per head and step the read along the key `k^T S` (2 K V) and the
    rank-one write `k (beta (v - S^T k))^T` (2 K V), then the read by the query (2 K V)."""
    return heads * (4 * steps + 2) * key * value


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
