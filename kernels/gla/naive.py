"""The step-loop definition of gated linear attention: the reference every fast path meets.

Legend: B batch, T time, H heads, K key width, V value width, N sequences.
Works in any dtype (tests run it in float64).
"""

from __future__ import annotations

import torch


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_t = scale * q_t^T S_t with S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, one step at a time.

    Shapes and arguments as `rnnscale.kernels.gla.chunk_gla`; computes in the dtype of q.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    starts = _sequence_starts(B, T, cu_seqlens)
    finals = []
    out = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)  # (B, T, H, V)
    for n, (b, t0, t1) in enumerate(starts):
        S = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(q.dtype)
        for t in range(t0, t1):
            S = g[b, t].exp()[..., None] * S + k[b, t][..., None] * v[b, t][:, None, :]
            out[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None  # (N, H, K, V)
    return out, final


def _sequence_starts(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first t, end t) of every sequence: the rows, or the packed documents."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
