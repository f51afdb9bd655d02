"""DeltaProduct (Siems et al. 2025): n Householder steps per token through the delta rule.

Legend: B batch, T time, n steps per token, H heads, K key width, V value width.
Token t applies `S = exp(g_t) S`, then for j = 1..n `S = (I - beta_tj k_tj k_tj^T) S +
beta_tj k_tj v_tj^T`, and reads `o_t = scale q_t^T S`. That is the gated delta rule over a
sequence n times longer: sub-step (t, j) is a token of its own, the gate sits on j = 1 (0 on the
rest), and the output of sub-step (t, n) is o_t.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.backend import dispatch
from rnnscale.kernels.delta.chunk_torch import chunk_gated_delta_rule


def chunk_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q `[B, T, H, K]`, k `[B, T, n, H, K]`, v `[B, T, n, H, V]`, g `[B, T, H]`,
    beta `[B, T, n, H]`; cu_seqlens count tokens; chunk_size counts sub-steps; backend as in
    `chunk_gated_delta_rule`. Returns `(o [B, T, H, V], final_state)`."""
    if k.dim() != 5 or v.dim() != 5 or beta.dim() != 4:
        raise ValueError(
            "chunk_delta_product takes k [B, T, n, H, K], v [B, T, n, H, V] and beta "
            f"[B, T, n, H]; got {tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}"
        )
    B, T, n, H, K = k.shape
    q_n = q.new_zeros(B, T, n, H, K)
    q_n[:, :, -1] = q  # only the last sub-step's output is read
    g_n = g.new_zeros(B, T, n, H)
    g_n[:, :, 0] = g  # the token's decay, once
    flat = lambda x: x.reshape(B, T * n, *x.shape[3:])  # noqa: E731 (B, T*n, ...)
    o, final = dispatch(
        backend,
        q,
        chunk_gated_delta_rule,
        "rnnscale.kernels.delta.chunk_triton:chunk_gated_delta_rule_triton",
        flat(q_n),
        flat(k),
        flat(v),
        flat(g_n),
        flat(beta),
        scale=K**-0.5 if scale is None else scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens * n,
        chunk_size=chunk_size,
    )  # o: (B, T*n, H, V)
    return o.view(B, T, n, H, -1)[:, :, -1], final
