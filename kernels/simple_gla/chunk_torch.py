"""Chunkwise scalar-decay linear attention in plain PyTorch (docs/scans.md section 1).

Legend: B batch, T time, H heads, K key width, V value width, N sequences, C chunk size,
M chunks. For one chunk with entering state S, in-chunk cumulative log-gates b_r (one number
per head and row) and Gamma_rs = exp(b_r - b_s) for s <= r, else 0:
  1. intra-chunk scores A = (Q K^T) * Gamma
  2. chunk-local state dS = (exp(b_C - b) * K)^T V and chunk decay exp(b_C)
  3. states entering each chunk: S_next = exp(b_C) S + dS (the scan over chunks)
  4. O = scale * ((exp(b) * Q) S + A V)
Every exponent is a difference of cumulative gates inside one chunk (<= 0): nothing overflows.
Steps 2-4 and their gradients are `ChunkLinearAttention` (kernels/common/chunk_autograd.py):
the backward keeps only the unchunked inputs and the initial states, and recomputes the
chunks, the entering states, A and Gamma.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.chunk_autograd import (
    ChunkLinearAttention,
    StateLink,
    decay_matrix,
)
from rnnscale.kernels.common.chunks import chunk_layout, from_chunks, to_chunks


class ScalarDecayScores:
    """Step 1 and its gradients: `dq = [dA * Gamma] K`, `dk = [dA * Gamma]^T Q`. With q and k
    shared by a group's heads, `q k^T` is one product per group broadcast over its heads."""

    @staticmethod
    def scores(q, k, b, causal):
        return (q @ k.transpose(-1, -2)) * decay_matrix(b[..., 0], causal)  # (M, H, C, C)

    @staticmethod
    def grads(dA, q, k, b, causal):
        gamma = decay_matrix(b[..., 0], causal)
        dA = dA * gamma
        return (q @ k.transpose(-1, -2)) * gamma, dA @ k, dA.transpose(-1, -2) @ q


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    state_link: StateLink | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scalar-decay linear attention: `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`.

    Args:
        q, k: `[B, T, H, K]`, or `[B, T, G, K]` shared by groups of H / G consecutive heads
            (Mamba2's B and C): the scores `q k^T` are then formed once per group.
        v: `[B, T, H, V]`.
        g: `[B, T, H]` log-space decay per head (<= 0), accumulated in fp32.
        scale, initial_state `[N, H, K, V]`, output_final_state, cu_seqlens, chunk_size,
            state_link: as in `rnnscale.kernels.gla.chunk_torch.chunk_gla` (the link sees
            grouped heads' states as `[N, G, H / G, K, V]`).
    Returns:
        `(o [B, T, H, V] in the dtype of v, final_state [N, H, K, V] or None)`.
    """
    gates = {"g": (g, False)}
    B, T, H, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size,
                                        grouped=True)  # fmt: skip
    V, G = v.shape[-1], q.shape[2]
    scale = K**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)

    def prep(q, k, v, g):
        qc, kc, vc = (to_chunks(x, layout, acc).transpose(1, 2).contiguous() for x in (q, k, v))
        b = to_chunks(g, layout, acc).transpose(1, 2).cumsum(dim=-1)[..., None]  # (M, H, C, 1)
        if G == H:
            return qc, kc, vc, b
        # heads as (G, H / G): q and k broadcast over the second axis
        return qc[:, :, None], kc[:, :, None], vc.unflatten(1, (G, -1)), b.unflatten(1, (G, -1))

    S0 = q.new_zeros(layout.N, H, K, V, dtype=acc) if initial_state is None else initial_state
    S0 = S0.to(acc) if G == H else S0.to(acc).unflatten(1, (G, -1))
    o, final = ChunkLinearAttention.apply(
        prep, S0, layout, scale, ScalarDecayScores, state_link, q, k, v, g
    )  # (M, H, C, V), (N, H, K, V); (M, G, H / G, ...) when grouped
    o = from_chunks(o.flatten(1, -3).transpose(1, 2), layout)  # (B, T, H, V)
    return o.to(v.dtype), (final.flatten(1, -3) if output_final_state else None)
