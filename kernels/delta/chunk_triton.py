"""Gated delta rule on Triton: the WY / UT form of chunk_torch.py, forward and backward.

Legend: N sequences, H heads, K key width, V value width, C chunk size, M chunks in all;
BK, BV the powers of two >= K, V that the blocks are padded to. One program per (sequence,
head) holds the K x V state in registers and walks the sequence's chunks; the forward stores
the state entering every chunk (M x K x V fp32) for the backward.

Forward, per chunk with entering state S, in-chunk cumulative log-gates b, Gamma_rs =
exp(b_r - b_s) for s <= r (README.md steps 1-6):
  1. L = beta_r (k_r . k_s) Gamma_rs for s < r
  2. Tinv = (I + L)^(-1), by forward substitution row by row (C steps of C x C work)
  3. W = Tinv (beta exp(b) k), U = Tinv (beta v)
  4. U' = U - W S
  5. o = scale ((q exp b) S + (q k^T * Gamma) U')
  6. S' = exp(b_C) S + (k exp(b_C - b))^T U'

Backward, chunks in reverse, recomputing 1-6 from the stored S, with dS' the gradient of the
state leaving the chunk:
  7. dU' = scale (q k^T * Gamma)^T do + (k exp(b_C - b)) dS'
  8. dq, dk from the scores (dP = scale do U'^T) and the entering state
  9. dW = -dU' S^T, then dTinv = dW Bk^T + dU' Bv^T with Bk = beta exp(b) k, Bv = beta v;
     dBk = Tinv^T dW and dBv = Tinv^T dU' give dk, dv, dbeta and part of db
 10. dL = -Tinv^T dTinv Tinv^T below the diagonal gives dbeta, dk and the rest of db
 11. dg = reverse cumulative sum of db within the chunk (b_C also carries sum S' dS')
 12. dS = exp(b_C) dS' + scale (q exp b)^T do - W^T dU', which the previous chunk receives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnscale.kernels.common.backend import (
    check_triton,
    dot_precision,
    state_buffers,
    state_grads,
)
from rnnscale.kernels.common.checks import check_linear_attention


@triton.jit
def sequence_program(bounds_ptr, offs_ptr, H, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """This program's (sequence n, head hh, first token, end token, first chunk, key and value
    lanes, offsets and mask of its K x V state block within one `[*, H, K, V]` row)."""
    n = tl.program_id(0)
    hh = tl.program_id(1)
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    state_off = (hh * K + kk[:, None]) * V + vv[None, :]
    state_mask = (kk[:, None] < K) & (vv[None, :] < V)
    bos = tl.load(bounds_ptr + n)
    eos = tl.load(bounds_ptr + n + 1)
    first_chunk = tl.load(offs_ptr + n)
    return n, hh, bos, eos, first_chunk, kk, vv, state_off, state_mask


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, row_ok, hh, H, K, V, kk, vv):
    """Rows t of one head as fp32 blocks, zeros beyond the sequence (beta = 0 there: padding
    writes nothing), and the in-chunk cumulative gates."""
    qk_mask = row_ok[:, None] & (kk[None, :] < K)
    qk_off = (t[:, None] * H + hh) * K + kk[None, :]
    q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
    v_mask = row_ok[:, None] & (vv[None, :] < V)
    v = tl.load(v_ptr + (t[:, None] * H + hh) * V + vv[None, :], mask=v_mask, other=0.0)
    g = tl.load(g_ptr + t * H + hh, mask=row_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + t * H + hh, mask=row_ok, other=0.0).to(tl.float32)
    return q, k, v.to(tl.float32), tl.cumsum(g, 0), beta


@triton.jit
def _wy(k, v, b, beta, rows, BC: tl.constexpr, PREC: tl.constexpr):
    """Steps 1-3: (Gamma, L, Tinv, W, U, exp b, exp(b_C - b), exp b_C, Bk, Bv)."""
    lower = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    gamma = tl.exp(tl.where(lower, b[:, None] - b[None, :], float("-inf")))
    b_last = tl.sum(tl.where(rows == BC - 1, b, 0.0), 0)
    exp_b = tl.exp(b)
    L = tl.where(strict, beta[:, None] * tl.dot(k, tl.trans(k), input_precision=PREC) * gamma, 0.0)
    # 2. Tinv = (I + L)^(-1): row i = e_i - sum_{j<i} L_ij Tinv_j, rows j < i already final
    Tinv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, BC):
        l_row = tl.sum(tl.where(rows[:, None] == i, L, 0.0), 0)  # [C]: L_i.
        update = tl.sum(l_row[:, None] * Tinv, 0)  # [C]: sum_j L_ij Tinv_j.
        Tinv = tl.where(rows[:, None] == i, Tinv - update[None, :], Tinv)
    Bk = (beta * exp_b)[:, None] * k
    Bv = beta[:, None] * v
    W = tl.dot(Tinv, Bk, input_precision=PREC)
    U = tl.dot(Tinv, Bv, input_precision=PREC)
    return gamma, L, Tinv, W, U, exp_b, tl.exp(b_last - b), tl.exp(b_last), Bk, Bv


@triton.jit
def _delta_fwd(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, h0_ptr, ht_ptr, hs_ptr,
               bounds_ptr, offs_ptr, scale, H, K, V,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
    n, hh, bos, eos, first_chunk, kk, vv, state_off, state_mask = sequence_program(
        bounds_ptr, offs_ptr, H, K, V, BK, BV
    )
    rows = tl.arange(0, BC)
    if HAS_H0:
        S = tl.load(h0_ptr + n * H * K * V + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(0, tl.cdiv(eos - bos, BC)):
        tl.store(hs_ptr + (first_chunk + c) * H * K * V + state_off, S, mask=state_mask)
        t = bos + c * BC + rows
        row_ok = t < eos
        q, k, v, b, beta = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, row_ok, hh,
                                       H, K, V, kk, vv)  # fmt: skip
        gamma, L, Tinv, W, U, exp_b, exp_to_end, exp_last, Bk, Bv = _wy(k, v, b, beta, rows,
                                                                        BC, PREC)  # fmt: skip
        u_new = U - tl.dot(W, S, input_precision=PREC)  # 4.
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * gamma
        o = tl.dot(q * exp_b[:, None], S, input_precision=PREC)
        o = scale * (o + tl.dot(scores, u_new, input_precision=PREC))  # 5.
        o_off = (t[:, None] * H + hh) * V + vv[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (vv < V))
        k_to_end = k * exp_to_end[:, None]
        S = exp_last * S + tl.dot(tl.trans(k_to_end), u_new, input_precision=PREC)  # 6.
    tl.store(ht_ptr + n * H * K * V + state_off, S, mask=state_mask)


@triton.jit
def _delta_bwd(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, do_ptr, dht_ptr, hs_ptr, bounds_ptr,
               offs_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, dh0_ptr, scale, H, K, V,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
    n, hh, bos, eos, first_chunk, kk, vv, state_off, state_mask = sequence_program(
        bounds_ptr, offs_ptr, H, K, V, BK, BV
    )
    rows = tl.arange(0, BC)
    strict = rows[:, None] > rows[None, :]
    lower = rows[:, None] >= rows[None, :]
    dS = tl.load(dht_ptr + n * H * K * V + state_off, mask=state_mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, BC)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        S = tl.load(hs_ptr + (first_chunk + c) * H * K * V + state_off, mask=state_mask, other=0.0)
        t = bos + c * BC + rows
        row_ok = t < eos
        q, k, v, b, beta = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, row_ok, hh,
                                       H, K, V, kk, vv)  # fmt: skip
        v_mask = row_ok[:, None] & (vv[None, :] < V)
        v_off = (t[:, None] * H + hh) * V + vv[None, :]
        do = tl.load(do_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        gamma, L, Tinv, W, U, exp_b, exp_to_end, exp_last, Bk, Bv = _wy(k, v, b, beta, rows,
                                                                        BC, PREC)  # fmt: skip
        u_new = U - tl.dot(W, S, input_precision=PREC)
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * gamma
        k_to_end = k * exp_to_end[:, None]
        S_out = exp_last * S + tl.dot(tl.trans(k_to_end), u_new, input_precision=PREC)
        # 7. the new values
        du = scale * tl.dot(tl.trans(scores), do, input_precision=PREC)
        du += tl.dot(k_to_end, dS, input_precision=PREC)
        # 8. scores and the entering state
        dP = tl.where(lower, scale * tl.dot(do, tl.trans(u_new), input_precision=PREC), 0.0)
        dq = scale * tl.dot(do, tl.trans(S), input_precision=PREC) * exp_b[:, None]
        dk_state = tl.dot(u_new, tl.trans(dS), input_precision=PREC) * exp_to_end[:, None]
        pair = dP * scores  # d(score) * score: +db on its row, -db on its column
        db = tl.sum(q * dq, 1) - tl.sum(k * dk_state, 1) + tl.sum(pair, 1) - tl.sum(pair, 0)
        dq += tl.dot(dP * gamma, k, input_precision=PREC)
        dk = tl.dot(tl.trans(dP * gamma), q, input_precision=PREC) + dk_state
        # 9. through W = Tinv Bk and U = Tinv Bv
        dW = -tl.dot(du, tl.trans(S), input_precision=PREC)
        dTinv = tl.dot(dW, tl.trans(Bk), input_precision=PREC)
        dTinv += tl.dot(du, tl.trans(Bv), input_precision=PREC)
        dBk = tl.dot(tl.trans(Tinv), dW, input_precision=PREC)
        dBv = tl.dot(tl.trans(Tinv), du, input_precision=PREC)
        k_dBk = tl.sum(k * dBk, 1)
        dk += (beta * exp_b)[:, None] * dBk
        dv = beta[:, None] * dBv
        dbeta = exp_b * k_dBk + tl.sum(v * dBv, 1)
        db += beta * exp_b * k_dBk
        # 10. through Tinv = (I + L)^(-1)
        dL = -tl.dot(tl.trans(Tinv), tl.dot(dTinv, tl.trans(Tinv), input_precision=PREC),
                     input_precision=PREC)  # fmt: skip
        dL = tl.where(strict, dL, 0.0)
        dL_L = dL * L
        kk_gamma = tl.dot(k, tl.trans(k), input_precision=PREC) * gamma
        dbeta += tl.sum(dL * kk_gamma, 1)
        dKK = dL * beta[:, None] * gamma
        dk += tl.dot(dKK, k, input_precision=PREC) + tl.dot(tl.trans(dKK), k, input_precision=PREC)
        db += tl.sum(dL_L, 1) - tl.sum(dL_L, 0)
        # 11. gates: b_C multiplies all of S'
        db += tl.where(rows == BC - 1, tl.sum(tl.sum(S_out * dS, 1), 0), 0.0)
        dg = tl.cumsum(db, 0, reverse=True)
        qk_mask = row_ok[:, None] & (kk[None, :] < K)
        qk_off = (t[:, None] * H + hh) * K + kk[None, :]
        tl.store(dq_ptr + qk_off, dq.to(dq_ptr.dtype.element_ty), mask=qk_mask)
        tl.store(dk_ptr + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=qk_mask)
        tl.store(dv_ptr + v_off, dv.to(dv_ptr.dtype.element_ty), mask=v_mask)
        tl.store(dg_ptr + t * H + hh, dg, mask=row_ok)
        tl.store(dbeta_ptr + t * H + hh, dbeta, mask=row_ok)
        # 12. the gradient of the state entering this chunk
        dS = exp_last * dS + scale * tl.dot(tl.trans(q * exp_b[:, None]), do, input_precision=PREC)
        dS -= tl.dot(tl.trans(W), du, input_precision=PREC)
    tl.store(dh0_ptr + n * H * K * V + state_off, dS, mask=state_mask)


class GatedDeltaRuleTriton(torch.autograd.Function):
    """(q, k, v, g, beta, h0) -> (o, ht) for `[B, T, H, *]` inputs."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        bounds, offsets, ht, hs, h0_in = state_buffers(q, B, T, cu_seqlens, chunk_size,
                                                       (H, K, V), h0)  # fmt: skip
        N = bounds.numel() - 1
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        o = torch.empty_like(v)
        meta = launch_meta(chunk_size, K, V, q.dtype)
        _delta_fwd[(N, H)](q, k, v, g, beta, o, h0_in, ht, hs, bounds, offsets, scale, H, K, V,
                           HAS_H0=h0 is not None, **meta)  # fmt: skip
        ctx.save_for_backward(q, k, v, g, beta, hs, bounds, offsets)
        ctx.scale, ctx.meta, ctx.h0_dtype = scale, meta, (None if h0 is None else h0.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, hs, bounds, offsets = ctx.saved_tensors
        _, _, H, K = q.shape
        V = v.shape[-1]
        N = bounds.numel() - 1
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg = torch.empty_like(g, dtype=torch.float32)
        dbeta = torch.empty_like(beta, dtype=torch.float32)
        dh0, dht = state_grads(q, N, (H, K, V), dht)
        _delta_bwd[(N, H)](q, k, v, g, beta, do.contiguous(), dht, hs, bounds,
                           offsets, dq, dk, dv, dg, dbeta, dh0, ctx.scale, H, K, V,
                           **ctx.meta)  # fmt: skip
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dg.to(g.dtype), dbeta.to(beta.dtype), dh0, None, None, None


def launch_meta(chunk_size: int, K: int, V: int, dtype: torch.dtype) -> dict:
    """The fixed launch configuration (no autotuning: the interpreter has no GPU to time)."""
    return {
        "BC": chunk_size,
        "BK": max(16, triton.next_power_of_2(K)),
        "BV": max(16, triton.next_power_of_2(V)),
        "PREC": dot_precision(dtype),
    }


def chunk_gated_delta_rule_triton(
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
    """`rnnscale.kernels.delta.chunk_gated_delta_rule` on Triton; the same arguments and
    results (the final state in fp32)."""
    gates = {"g": (g, False), "beta": (beta, False)}
    _, _, _, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size)
    check_triton(chunk_size, {"q": q, "k": k, "v": v})
    scale = K**-0.5 if scale is None else scale
    o, final = GatedDeltaRuleTriton.apply(
        q, k, v, g, beta, initial_state, scale, cu_seqlens, chunk_size
    )
    return o, (final if output_final_state else None)
