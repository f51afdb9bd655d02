"""Chunkwise gated delta rule in plain PyTorch: the WY / UT form (docs/scans.md section 3).

Legend: B batch, T time, H heads, K key width, V value width, N sequences, C chunk size,
M chunks. Per chunk, with in-chunk cumulative log-gates b, Gamma_rs = exp(b_r - b_s) for
s <= r (else 0), and S the entering state:
  1. L = tril(diag(beta) (K K^T * Gamma), -1)
  2. T = (I + L)^(-1) diag(beta)              a unit-lower-triangular solve, C x C
  3. W = T (exp(b) * K), U = T V
  4. U' = U - W S                              the new values after the delta correction
  5. O = scale * ((exp(b) * Q) S + tril(Q K^T * Gamma) U')
  6. S_next = exp(b_C) S + (exp(b_C - b) * K)^T U'
Steps 1-3 and the intra-chunk part of 5 need no state and run for all chunks at once; 4 and 6
run in the scan over chunks. Gates accumulate in fp32 or wider.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.chunks import chunk_layout, from_chunks, scan_chunks, to_chunks


def _wy(kc, vc, bc, b, gamma):
    """Steps 1-3, the WY representation of a chunk's C Householder-like updates:
    `T = (I + L)^-1 diag(beta)`, `W = T (exp(b) * K)`, `U = T V`."""
    C = kc.shape[-2]
    L = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * gamma).tril(-1)  # (M, H, C, C)
    eye = torch.eye(C, dtype=kc.dtype, device=kc.device)
    Tm = torch.linalg.solve_triangular(
        eye + L, torch.diag_embed(bc), upper=False, unitriangular=True
    )  # (M, H, C, C)
    return Tm @ (kc * b.exp()[..., None]), Tm @ vc


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule: `S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`.

    Args:
        q, k: `[B, T, H, K]` (keys usually L2-normalised by the caller). v: `[B, T, H, V]`.
        g: `[B, T, H]` log-space decay (<= 0; g = 0 is plain DeltaNet), accumulated in fp32.
        beta: `[B, T, H]` write strength; in (0, 2) gives transitions with negative eigenvalues.
        scale, initial_state `[N, H, K, V]`, output_final_state, cu_seqlens, chunk_size: as in
            `rnnscale.kernels.gla.chunk_gla`.
    Returns:
        `(o [B, T, H, V] in the dtype of v, final_state [N, H, K, V] or None)`.
    """
    gates = {"g": (g, False), "beta": (beta, False)}
    B, T, H, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size)
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)
    qc, kc, vc = (to_chunks(x, layout, acc).transpose(1, 2).contiguous() for x in (q, k, v))
    b = to_chunks(g, layout, acc).transpose(1, 2).cumsum(dim=-1)  # (M, H, C)
    bc = to_chunks(beta, layout, acc).transpose(1, 2)  # (M, H, C), 0 on padding
    b_last = b[..., -1:]  # (M, H, 1)
    C = chunk_size
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gamma = torch.where(lower, b[..., :, None] - b[..., None, :], float("-inf")).exp()  # (M,H,C,C)

    W, U = _wy(kc, vc, bc, b, gamma)  # 1-3: (M, H, C, K), (M, H, C, V)
    A = (qc @ kc.transpose(-1, -2)) * gamma  # (M, H, C, C), tril through gamma
    k_decay = kc * (b_last - b).exp()[..., None]  # (M, H, C, K)
    chunk_decay = b_last.exp()[..., None]  # (M, H, 1, 1)

    # 4 + 6. the scan over chunks carries S and records (S entering, U') per chunk
    def step(S, U, W, decay, k_decay):
        u_new = U - W @ S  # (n, H, C, V)
        S_next = decay * S + k_decay.transpose(-1, -2) @ u_new
        return S_next, (S, u_new)

    S0 = q.new_zeros(layout.N, H, K, V, dtype=acc) if initial_state is None else initial_state
    (S_in, u_new), final = scan_chunks(layout, S0.to(acc), step, (U, W, chunk_decay, k_decay))
    # S_in: (M, H, K, V), u_new: (M, H, C, V)

    # 5. outputs
    o = scale * ((qc * b.exp()[..., None]) @ S_in + A @ u_new)  # (M, H, C, V)
    o = from_chunks(o.transpose(1, 2), layout)  # (B, T, H, V)
    return o.to(v.dtype), (final if output_final_state else None)
