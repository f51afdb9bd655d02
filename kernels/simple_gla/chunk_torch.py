"""Chunkwise scalar-decay linear attention in plain PyTorch (docs/scans.md section 1).

Legend: B batch, T time, H heads, K key width, V value width, N sequences, C chunk size,
M chunks. For one chunk with entering state S, in-chunk cumulative log-gates b_r (one number
per head and row) and Gamma_rs = exp(b_r - b_s) for s <= r, else 0:
  1. intra-chunk scores A = (Q K^T) * Gamma
  2. chunk-local state dS = (exp(b_C - b) * K)^T V and chunk decay exp(b_C)
  3. states entering each chunk: S_next = exp(b_C) S + dS (the scan over chunks)
  4. O = scale * ((exp(b) * Q) S + A V)
Every exponent is a difference of cumulative gates inside one chunk (<= 0): nothing overflows.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.chunks import chunk_layout, from_chunks, scan_chunks, to_chunks


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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scalar-decay linear attention: `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, H, V]`.
        g: `[B, T, H]` log-space decay per head (<= 0), accumulated in fp32.
        scale, initial_state `[N, H, K, V]`, output_final_state, cu_seqlens, chunk_size: as in
            `rnnscale.kernels.gla.chunk_gla`.
    Returns:
        `(o [B, T, H, V] in the dtype of v, final_state [N, H, K, V] or None)`.
    """
    gates = {"g": (g, False)}
    B, T, H, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size)
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)
    qc, kc, vc = (to_chunks(x, layout, acc).transpose(1, 2).contiguous() for x in (q, k, v))
    b = to_chunks(g, layout, acc).transpose(1, 2).cumsum(dim=-1)  # (M, H, C)
    b_last = b[..., -1:]  # (M, H, 1)

    # 1. intra-chunk scores
    C = chunk_size
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gamma = torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")).exp()
    A = (qc @ kc.transpose(-1, -2)) * gamma  # (M, H, C, C)

    # 2. chunk-local states and decays
    dS = (kc * (b_last - b).exp()[..., None]).transpose(-1, -2) @ vc  # (M, H, K, V)
    chunk_decay = b_last.exp()[..., None]  # (M, H, 1, 1)

    # 3. scan over chunks
    S0 = q.new_zeros(layout.N, H, K, V, dtype=acc) if initial_state is None else initial_state
    S_in, final = scan_chunks(
        layout, S0.to(acc), lambda S, decay, dS: (decay * S + dS, S), (chunk_decay, dS)
    )  # (M, H, K, V)

    # 4. outputs
    o = scale * ((qc * b.exp()[..., None]) @ S_in + A @ vc)  # (M, H, C, V)
    o = from_chunks(o.transpose(1, 2), layout)  # (B, T, H, V)
    return o.to(v.dtype), (final if output_final_state else None)
