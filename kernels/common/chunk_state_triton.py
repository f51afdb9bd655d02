"""The two kernels every chunk-parallel linear-attention path starts from: in-chunk cumulative
gates, and the pass of states from chunk to chunk (the only serial loop), run over 64 x 64
tiles of the state.

Legend: N sequences, H heads, K key width, V value width, C chunk size (BC), M chunks in all;
BK, BV the tiles of K and V (`backend.tile`); b the in-chunk cumulative log-gates (per key
[C, K] for gla, per head [C] for simple_gla), b_C the chunk's last row (its last real token).

`_chunk_cumsum`, one program per (chunk, head, key tile): b = cumsum(g) within the chunk, fp32.

`_state_pass`, one program per (key tile, value tile, sequence x head), walking the chunks:
  forward  (REVERSE = 0, x = k, y = v): hs[c] = S;  S <- exp(b_C) S + (x exp(b_C - b))^T y
  backward (REVERSE = 1, x = q, y = do, chunks in reverse):
                                         hs[c] = dS; dS <- exp(b_C) dS + scale (x exp(b))^T y
The forward stores the state entering every chunk, the backward the gradient of the state
leaving it; both in the inputs' dtype (fp32 for fp32 inputs), and the last one (the final state,
or the initial state's gradient) in fp32. Every exponent is <= 0. `tl.dot` takes the inputs'
dtype (bf16 tensor cores for bf16; exact fp32 products for fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chunk_cumsum(g_ptr, b_ptr, chunks_ptr, H, K,
                  BC: tl.constexpr, BK: tl.constexpr, PER_KEY: tl.constexpr):  # fmt: skip
    m = tl.program_id(0)
    hh = tl.program_id(1)
    t0 = tl.load(chunks_ptr + 2 * m)
    t = t0 + tl.arange(0, BC)
    ok = t < tl.load(chunks_ptr + 2 * m + 1)
    if PER_KEY:
        kk = tl.program_id(2) * BK + tl.arange(0, BK)
        off = (t[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
        mask = ok[:, None] & (kk[None, :] < K)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(b_ptr + off, tl.cumsum(g, 0), mask=mask)
    else:
        g = tl.load(g_ptr + t * H + hh, mask=ok, other=0.0).to(tl.float32)
        tl.store(b_ptr + t * H + hh, tl.cumsum(g, 0), mask=ok)


@triton.jit
def load_rows(ptr, t, ok, hh, H, W, ww):
    """Rows t of one head of a `[*, H, W]` tensor, columns ww; zeros outside."""
    off = (t[:, None] * H + hh).to(tl.int64) * W + ww[None, :]
    return tl.load(ptr + off, mask=ok[:, None] & (ww[None, :] < W), other=0.0)


@triton.jit
def load_gates(b_ptr, t, ok, last, hh, H, K, kk, PER_KEY: tl.constexpr):
    """(b of rows t, b_C of row `last`): [BC, BK] and [BK] per key, [BC] and a scalar per head."""
    if PER_KEY:
        b = load_rows(b_ptr, t, ok, hh, H, K, kk)
        b_last = tl.load(b_ptr + (last * H + hh).to(tl.int64) * K + kk, mask=kk < K, other=0.0)
    else:
        b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
        b_last = tl.load(b_ptr + last * H + hh)
    return b, b_last


@triton.jit
def _state_pass(x_ptr, y_ptr, b_ptr, s0_ptr, s_end_ptr, hs_ptr, bounds_ptr, offs_ptr, scale,
                H, K, V, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PER_KEY: tl.constexpr, REVERSE: tl.constexpr, HAS_S0: tl.constexpr,
                PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    kk = tl.program_id(0) * BK + tl.arange(0, BK)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    n = tl.program_id(2) // H
    hh = tl.program_id(2) % H
    bos = tl.load(bounds_ptr + n)
    eos = tl.load(bounds_ptr + n + 1)
    first = tl.load(offs_ptr + n)
    DT = x_ptr.dtype.element_ty
    tile_off = (hh * K + kk[:, None]).to(tl.int64) * V + vv[None, :]
    tile_mask = (kk[:, None] < K) & (vv[None, :] < V)
    if HAS_S0:
        S = tl.load(s0_ptr + n.to(tl.int64) * H * K * V + tile_off, mask=tile_mask, other=0.0)
        S = S.to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(eos - bos, BC)
    for i in range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - i
        else:
            c = i
        m = (first + c).to(tl.int64)
        tl.store(hs_ptr + m * H * K * V + tile_off, S.to(hs_ptr.dtype.element_ty), mask=tile_mask)
        t0 = bos + c * BC
        t = t0 + tl.arange(0, BC)
        ok = t < eos
        x = load_rows(x_ptr, t, ok, hh, H, K, kk).to(tl.float32)
        y = load_rows(y_ptr, t, ok, hh, H, V, vv).to(DT).to(MT)
        b, b_last = load_gates(b_ptr, t, ok, tl.minimum(t0 + BC, eos) - 1, hh, H, K, kk, PER_KEY)
        if PER_KEY:
            if REVERSE:
                x = x * (scale * tl.exp(b))
            else:
                x = x * tl.exp(b_last[None, :] - b)
            S = S * tl.exp(b_last)[:, None]
        else:
            if REVERSE:
                x = x * (scale * tl.exp(b))[:, None]
            else:
                x = x * tl.exp(b_last - b)[:, None]
            S = S * tl.exp(b_last)
        S += tl.dot(tl.trans(x.to(DT).to(MT)), y, input_precision=PREC)
    tl.store(s_end_ptr + n.to(tl.int64) * H * K * V + tile_off, S, mask=tile_mask)
