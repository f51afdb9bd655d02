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

`ChunkDeltaRule` saves only its unchunked inputs and the initial states S0 [N, H, K, V]. Its
backward chunks the inputs again, solves each chunk's triangle once more and uses it for W, U,
and, running steps 4 and 6 again (as fla's chunk kernels recompute h), the entering states S_in
and U' = U - W S_in, and for the gradients; the only sequential part is the reverse scan of the
state gradient dS (from the final state's gradient back to the initial state's), which also
yields dU' for every chunk:
  dU' = scale tril(Q K^T * Gamma)^T dO + (exp(b_C - b) * K) dS_next
  dS  = exp(b_C) dS_next + scale (exp(b) * Q)^T dO - W^T dU'
Then dW = -dU' S^T, dU = dU', and the WY step back through T (`_wy_grads`), a block of
chunks at a time (`chunk_blocks`), so the C x C transients stay small.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.chunk_autograd import (
    causal_mask,
    chunk_blocks,
    chunked_again,
    decay_matrix,
    unchunked_grads,
)
from rnnscale.kernels.common.chunks import chunk_layout, from_chunks, scan_chunks, to_chunks


def _gamma(b):
    """Gamma (`decay_matrix`) of (M, H, C) gates: (M, H, C, C)."""
    return decay_matrix(b, causal_mask(b.shape[-1], b.device))


def _wy(k, v, b, beta, gamma):
    """Steps 1-3, the WY representation of a chunk's C Householder-like updates:
    `(Ti = (I + L)^-1, W = Ti (beta exp(b) * K), U = Ti (beta * V))`, so that T = Ti diag(beta)."""
    C = k.shape[-2]
    L = (beta[..., None] * (k @ k.transpose(-1, -2)) * gamma).tril(-1)  # (M, H, C, C)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    Ti = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    return Ti, Ti @ (k * (beta * b.exp())[..., None]), Ti @ (v * beta[..., None])


def _wy_grads(dW, dU, k, v, b, beta, gamma, Ti):
    """`(dk, dv, dbeta, db)` through `W = Ti (beta exp(b) K)`, `U = Ti (beta V)`,
    `Ti = (I + L)^-1` (so `dL = -Ti^T dTi Ti^T` below the diagonal) and
    `L = tril(beta_r (k_r . k_s) Gamma_rs, -1)`."""
    Ke, Vb = k * (beta * b.exp())[..., None], v * beta[..., None]  # (M, H, C, K), (M, H, C, V)
    dKe, dVb = Ti.transpose(-1, -2) @ dW, Ti.transpose(-1, -2) @ dU
    dTi = dW @ Ke.transpose(-1, -2) + dU @ Vb.transpose(-1, -2)  # (M, H, C, C)
    dL = -(Ti.transpose(-1, -2) @ dTi @ Ti.transpose(-1, -2)).tril(-1)
    KK = (k @ k.transpose(-1, -2)) * gamma  # (M, H, C, C)
    P = dL * KK * beta[..., None]  # dL * L
    E = dL * gamma * beta[..., None]
    dk = (beta * b.exp())[..., None] * dKe + E @ k + E.transpose(-1, -2) @ k
    dbeta = (v * dVb).sum(-1) + (k * b.exp()[..., None] * dKe).sum(-1) + (dL * KK).sum(-1)
    db = (Ke * dKe).sum(-1) + P.sum(-1) - P.sum(-2)
    return dk, beta[..., None] * dVb, dbeta, db


def _chunk_decays(k, b):
    """`(exp(b_C) [M, H, 1, 1], exp(b_C - b) k [M, H, C, K])`: what the state keeps across a
    chunk, and the keys decayed to its end."""
    b_last = b[..., -1:]  # (M, H, 1)
    return b_last.exp()[..., None], k * (b_last - b).exp()[..., None]


def _scan_states(layout, S0, W, U, decay, k_decay):
    """Steps 4 and 6 over the chunks: `((S_in [M, H, K, V], U' [M, H, C, V]), final [N, H, K,
    V])`, the states entering the chunks and the delta-corrected values."""

    def step(S, U, W, decay, k_decay):
        u_new = U - W @ S  # (n, H, C, V)
        return decay * S + k_decay.transpose(-1, -2) @ u_new, (S, u_new)

    return scan_chunks(layout, S0, step, (U, W, decay, k_decay))


class ChunkDeltaRule(torch.autograd.Function):
    """`(o [M, H, C, V], final [N, H, K, V])` from unchunked inputs `raw` and `prep(*raw)`, which
    chunks them into `q, k [M, H, C, K]`, `v [M, H, C, V]`, cumulative gates `b [M, H, C]` and
    `beta [M, H, C]`; initial states `S0 [N, H, K, V]`. It saves `raw`, not the chunks
    (kernels/common/chunk_autograd.py, `chunked_again`)."""

    @staticmethod
    def forward(ctx, prep, S0, layout, scale, *raw):
        q, k, v, b, beta = prep(*raw)
        gamma = _gamma(b)  # (M, H, C, C)
        _, W, U = _wy(k, v, b, beta, gamma)  # 1-3: (M, H, C, K), (M, H, C, V)
        (S_in, u_new), final = _scan_states(layout, S0, W, U, *_chunk_decays(k, b))
        A = (q @ k.transpose(-1, -2)) * gamma  # (M, H, C, C), tril through gamma
        o = scale * ((q * b.exp()[..., None]) @ S_in + A @ u_new)  # 5
        ctx.save_for_backward(S0, *raw)
        ctx.prep, ctx.layout, ctx.scale = prep, layout, scale
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        S0, *raw = ctx.saved_tensors
        leaves, chunked = chunked_again(ctx.prep, raw, ctx.needs_input_grad[4:])
        q, k, v, b, beta = (x.detach() for x in chunked)
        do = ctx.scale * do  # (M, H, C, V)
        gamma = _gamma(b)
        Ti, W, U = _wy(k, v, b, beta, gamma)  # the one solve of the backward, kept for 9
        decay, k_decay = _chunk_decays(k, b)
        (S_in, u_new), _ = _scan_states(ctx.layout, S0, W, U, decay, k_decay)  # again: 4 + 6
        du_intra = ((q @ k.transpose(-1, -2)) * gamma).transpose(-1, -2) @ do  # (M, H, C, V)
        del gamma, U

        def step(dS, decay, x, W, k_decay, du_intra):
            du = du_intra + k_decay @ dS  # (n, H, C, V)
            return decay * dS + x - W.transpose(-1, -2) @ du, (dS, du)

        x = (q * b.exp()[..., None]).transpose(-1, -2) @ do  # (M, H, K, V)
        (dS_out, du), dS0 = scan_chunks(
            ctx.layout, dfinal, step, (decay, x, W, k_decay, du_intra), True
        )  # (M, H, K, V), (M, H, C, V), (N, H, K, V)
        del x, W, decay, k_decay, du_intra
        grads = tuple(torch.empty_like(t) for t in (q, k, v, b, beta))  # dq, dk, dv, db, dbeta
        _, H, C, K = q.shape
        for sl in chunk_blocks(q.shape[0], H * C * max(C, K, v.shape[-1])):
            rows = (do, q, k, v, b, beta, S_in, dS_out, du, u_new, Ti)
            for grad, part in zip(grads, _chunk_grads(*(t[sl] for t in rows))):
                grad[sl] = part
        return None, dS0, None, None, *unchunked_grads(leaves, chunked, grads)


def _chunk_grads(do, q, k, v, b, beta, S_in, dS_out, du, u_new, Ti):
    """`(dq, dk, dv, db, dbeta)` of some chunks from the scaled output gradient, the states
    entering them, the gradients of the states leaving them and of U' (du)."""
    gamma, b_last = _gamma(b), b[..., -1:]  # (m, H, C, C), (m, H, 1)
    q_decay, k_decay = b.exp()[..., None], (b_last - b).exp()[..., None]  # (m, H, C, 1)
    dA = (do @ u_new.transpose(-1, -2)) * gamma  # (m, H, C, C)
    dq_inter = (do @ S_in.transpose(-1, -2)) * q_decay
    dk_state = (u_new @ dS_out.transpose(-1, -2)) * k_decay  # (m, H, C, K)
    dk, dv, dbeta, db = _wy_grads(-du @ S_in.transpose(-1, -2), du, k, v, b, beta, gamma, Ti)
    P = dA * (q @ k.transpose(-1, -2))
    t = (k * dk_state).sum(-1)  # (m, H, C)
    db = db + (q * dq_inter).sum(-1) + P.sum(-1) - P.sum(-2) - t
    db[..., -1] += t.sum(-1) + (S_in * dS_out).sum((-1, -2)) * b_last[..., 0].exp()
    dq = dq_inter + dA @ k
    dk = dk + dA.transpose(-1, -2) @ q + dk_state
    return dq, dk, dv, db, dbeta


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

    def prep(q, k, v, g, beta):
        qc, kc, vc = (to_chunks(x, layout, acc).transpose(1, 2).contiguous() for x in (q, k, v))
        b = to_chunks(g, layout, acc).transpose(1, 2).cumsum(dim=-1)  # (M, H, C)
        return qc, kc, vc, b, to_chunks(beta, layout, acc).transpose(1, 2)  # beta 0 on padding

    S0 = q.new_zeros(layout.N, H, K, V, dtype=acc) if initial_state is None else initial_state
    o, final = ChunkDeltaRule.apply(prep, S0.to(acc), layout, scale, q, k, v, g, beta)
    o = from_chunks(o.transpose(1, 2), layout)  # (B, T, H, V)
    return o.to(v.dtype), (final if output_final_state else None)
