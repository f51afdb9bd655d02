"""Triton forward and backward of gated linear attention, with per-key gates (gla) or one gate
per head (simple_gla): the kernels behind both families' `chunk_triton.py`.

Legend: N sequences, H heads, K key width, V value width, C chunk size, M chunks in all;
BK, BV the powers of two >= K, V that the blocks are padded to.

One program per (sequence, head) holds the K x V state in registers and walks the sequence's
chunks. For a chunk with entering state S, in-chunk cumulative log-gates b (C x K, or C), and
the last row's b_C (the padding has g = 0, so the last row is the chunk's true end):

forward (the steps of kernels/gla/README.md):
  1. A = scores q_r . k_s exp(b_r - b_s) for s <= r, masked above the diagonal
  2. o = scale ((q exp b) S + A v)
  3. S' = exp(b_C) S + (k exp(b_C - b))^T v
  and S is stored per chunk for the backward (M x K x V fp32).

backward, chunks in reverse, with dS' the gradient of the state leaving the chunk:
  4. dA = scale do v^T (lower triangle)
  5. dq = scale exp(b) (do S^T) + [dA * pairwise decay] k
     dk = [dA * pairwise decay]^T q + exp(b_C - b) (v dS'^T)
     dv = scale A^T do + (k exp(b_C - b)) dS'
  6. db = q dq - k dk, plus sum_v S' dS' on the last row (b_C sits in both state terms);
     dg = reverse cumulative sum of db within the chunk
  7. dS = exp(b_C) dS' + scale (q exp b)^T do, which the previous chunk receives.
Every exponent is a difference b_r - b_s with s <= r, or b_C - b_r: never positive.
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
def _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, t, row_ok, hh, H, K, V, kk, vv,
                BC: tl.constexpr, PER_KEY: tl.constexpr):  # fmt: skip
    """Rows t of one head as fp32 blocks (zeros beyond the sequence) and cumulative gates."""
    qk_mask = row_ok[:, None] & (kk[None, :] < K)
    qk_off = (t[:, None] * H + hh) * K + kk[None, :]
    q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
    v_mask = row_ok[:, None] & (vv[None, :] < V)
    v = tl.load(v_ptr + (t[:, None] * H + hh) * V + vv[None, :], mask=v_mask, other=0.0)
    if PER_KEY:
        g = tl.load(g_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + t * H + hh, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    return q, k, v.to(tl.float32), b


@triton.jit
def _chunk_decays(b, rows, BC: tl.constexpr, PER_KEY: tl.constexpr):
    """(exp b, exp(b_C - b), exp b_C, pairwise exp(b_r - b_s) for s <= r, else 0).
    Per-key: [C, BK], [C, BK], [BK], [C, C, BK]; per head: [C], [C], scalar, [C, C]."""
    lower = rows[:, None] >= rows[None, :]
    if PER_KEY:
        b_last = tl.sum(tl.where(rows[:, None] == BC - 1, b, 0.0), 0)  # [BK]
        pair = b[:, None, :] - b[None, :, :]
        pair = tl.exp(tl.where(lower[:, :, None], pair, float("-inf")))
        return tl.exp(b), tl.exp(b_last[None, :] - b), tl.exp(b_last), pair
    else:
        b_last = tl.sum(tl.where(rows == BC - 1, b, 0.0), 0)
        pair = tl.exp(tl.where(lower, b[:, None] - b[None, :], float("-inf")))
        return tl.exp(b), tl.exp(b_last - b), tl.exp(b_last), pair


@triton.jit
def _scores(q, k, pair, PER_KEY: tl.constexpr, PREC: tl.constexpr):
    """A_rs = sum_k q_rk k_sk pair_rs(k): C x C, zero above the diagonal."""
    if PER_KEY:
        return tl.sum(q[:, None, :] * k[None, :, :] * pair, 2)
    else:
        return tl.dot(q, tl.trans(k), input_precision=PREC) * pair


@triton.jit
def _la_fwd(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr, hs_ptr, bounds_ptr, offs_ptr,
            scale, H, K, V,
            BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_KEY: tl.constexpr,
            HAS_H0: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
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
        q, k, v, b = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, t, row_ok, hh, H, K, V, kk, vv,
                                 BC, PER_KEY)  # fmt: skip
        exp_b, exp_to_end, exp_last, pair = _chunk_decays(b, rows, BC, PER_KEY)
        # 1-2. outputs through the entering state plus within the chunk
        A = _scores(q, k, pair, PER_KEY, PREC)
        if PER_KEY:
            o = tl.dot(q * exp_b, S, input_precision=PREC)
            k_to_end = k * exp_to_end
            S = S * exp_last[:, None]
        else:
            o = tl.dot(q, S, input_precision=PREC) * exp_b[:, None]
            k_to_end = k * exp_to_end[:, None]
            S = S * exp_last
        o = scale * (o + tl.dot(A, v, input_precision=PREC))
        o_mask = row_ok[:, None] & (vv[None, :] < V)
        o_off = (t[:, None] * H + hh) * V + vv[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=o_mask)
        # 3. the state leaving the chunk
        S += tl.dot(tl.trans(k_to_end), v, input_precision=PREC)
    tl.store(ht_ptr + n * H * K * V + state_off, S, mask=state_mask)


@triton.jit
def _la_bwd(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dht_ptr, hs_ptr, bounds_ptr, offs_ptr,
            dq_ptr, dk_ptr, dv_ptr, dg_ptr, dh0_ptr,
            scale, H, K, V,
            BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_KEY: tl.constexpr,
            PREC: tl.constexpr):  # fmt: skip
    n, hh, bos, eos, first_chunk, kk, vv, state_off, state_mask = sequence_program(
        bounds_ptr, offs_ptr, H, K, V, BK, BV
    )
    rows = tl.arange(0, BC)
    dS = tl.load(dht_ptr + n * H * K * V + state_off, mask=state_mask, other=0.0)
    n_chunks = tl.cdiv(eos - bos, BC)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        S = tl.load(hs_ptr + (first_chunk + c) * H * K * V + state_off, mask=state_mask, other=0.0)
        t = bos + c * BC + rows
        row_ok = t < eos
        q, k, v, b = _load_chunk(q_ptr, k_ptr, v_ptr, g_ptr, t, row_ok, hh, H, K, V, kk, vv,
                                 BC, PER_KEY)  # fmt: skip
        v_mask = row_ok[:, None] & (vv[None, :] < V)
        v_off = (t[:, None] * H + hh) * V + vv[None, :]
        do = tl.load(do_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        exp_b, exp_to_end, exp_last, pair = _chunk_decays(b, rows, BC, PER_KEY)
        A = _scores(q, k, pair, PER_KEY, PREC)
        # 4. gradient of the scores, lower triangle only
        lower = rows[:, None] >= rows[None, :]
        dA = tl.where(lower, scale * tl.dot(do, tl.trans(v), input_precision=PREC), 0.0)
        # 5. q, k, v; S' (the state leaving) is recomputed, S was stored by the forward
        if PER_KEY:
            k_to_end = k * exp_to_end
            S_out = S * exp_last[:, None] + tl.dot(tl.trans(k_to_end), v, input_precision=PREC)
            dq = scale * tl.dot(do, tl.trans(S), input_precision=PREC) * exp_b
            dq += tl.sum(dA[:, :, None] * pair * k[None, :, :], 1)
            dk = tl.sum(dA[:, :, None] * pair * q[:, None, :], 0)
            dk += tl.dot(v, tl.trans(dS), input_precision=PREC) * exp_to_end
        else:
            k_to_end = k * exp_to_end[:, None]
            S_out = S * exp_last + tl.dot(tl.trans(k_to_end), v, input_precision=PREC)
            dq = scale * tl.dot(do, tl.trans(S), input_precision=PREC) * exp_b[:, None]
            dq += tl.dot(dA * pair, k, input_precision=PREC)
            dk = tl.dot(tl.trans(dA * pair), q, input_precision=PREC)
            dk += tl.dot(v, tl.trans(dS), input_precision=PREC) * exp_to_end[:, None]
        dv = scale * tl.dot(tl.trans(A), do, input_precision=PREC)
        dv += tl.dot(k_to_end, dS, input_precision=PREC)
        # 6. gates: db then the in-chunk reverse cumulative sum
        last = tl.sum(S_out * dS, 1)  # [BK]
        if PER_KEY:
            db = q * dq - k * dk + tl.where(rows[:, None] == BC - 1, last[None, :], 0.0)
        else:
            db = tl.sum(q * dq - k * dk, 1) + tl.where(rows == BC - 1, tl.sum(last, 0), 0.0)
        dg = tl.cumsum(db, 0, reverse=True)
        qk_mask = row_ok[:, None] & (kk[None, :] < K)
        qk_off = (t[:, None] * H + hh) * K + kk[None, :]
        tl.store(dq_ptr + qk_off, dq.to(dq_ptr.dtype.element_ty), mask=qk_mask)
        tl.store(dk_ptr + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=qk_mask)
        tl.store(dv_ptr + v_off, dv.to(dv_ptr.dtype.element_ty), mask=v_mask)
        if PER_KEY:
            tl.store(dg_ptr + qk_off, dg, mask=qk_mask)
        else:
            tl.store(dg_ptr + t * H + hh, dg, mask=row_ok)
        # 7. the gradient of the state entering this chunk
        if PER_KEY:
            dS = dS * exp_last[:, None]
            dS += scale * tl.dot(tl.trans(q * exp_b), do, input_precision=PREC)
        else:
            dS = dS * exp_last
            dS += scale * tl.dot(tl.trans(q * exp_b[:, None]), do, input_precision=PREC)
    tl.store(dh0_ptr + n * H * K * V + state_off, dS, mask=state_mask)


class LinearAttentionTriton(torch.autograd.Function):
    """(q, k, v, g, h0) -> (o, ht) for flat `[1, TT, H, *]` inputs; g per key or per head."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        per_key = g.dim() == 4
        bounds, offsets, ht, hs, h0_in = state_buffers(q, B, T, cu_seqlens, chunk_size,
                                                       (H, K, V), h0)  # fmt: skip
        N = bounds.numel() - 1
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        o = torch.empty_like(v)
        meta = dict(launch_meta(chunk_size, K, V, q.dtype), PER_KEY=per_key)
        _la_fwd[(N, H)](q, k, v, g, o, h0_in, ht, hs, bounds, offsets, scale, H, K, V,
                        HAS_H0=h0 is not None, **meta)  # fmt: skip
        ctx.save_for_backward(q, k, v, g, hs, bounds, offsets)
        ctx.scale, ctx.meta, ctx.h0 = scale, meta, (None if h0 is None else (h0.dtype, N))
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, hs, bounds, offsets = ctx.saved_tensors
        _, _, H, K = q.shape
        V = v.shape[-1]
        N = bounds.numel() - 1
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg = torch.empty_like(g, dtype=torch.float32)
        dh0, dht = state_grads(q, N, (H, K, V), dht)
        _la_bwd[(N, H)](q, k, v, g, do.contiguous(), dht, hs, bounds, offsets,
                        dq, dk, dv, dg, dh0, ctx.scale, H, K, V, **ctx.meta)  # fmt: skip
        dh0 = None if ctx.h0 is None else dh0.to(ctx.h0[0])
        return dq, dk, dv, dg.to(g.dtype), dh0, None, None, None


def launch_meta(chunk_size: int, K: int, V: int, dtype: torch.dtype) -> dict:
    """The fixed launch configuration (no autotuning: the interpreter has no GPU to time)."""
    return {
        "BC": chunk_size,
        "BK": max(16, triton.next_power_of_2(K)),
        "BV": max(16, triton.next_power_of_2(V)),
        "PREC": dot_precision(dtype),
    }


def linear_attention_triton(
    q, k, v, g, *, per_key, scale, initial_state, output_final_state, cu_seqlens, chunk_size
):
    """Check the inputs as the PyTorch path does (plus what Triton needs) and run the kernels;
    returns `(o in v's dtype, final state fp32 or None)`."""
    gates = {"g": (g, per_key)}
    _, _, _, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size)
    check_triton(chunk_size, {"q": q, "k": k, "v": v})
    scale = K**-0.5 if scale is None else scale
    o, final = LinearAttentionTriton.apply(q, k, v, g, initial_state, scale, cu_seqlens, chunk_size)
    return o, (final if output_final_state else None)
