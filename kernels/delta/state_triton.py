"""The delta rule's pass of states from chunk to chunk on Triton: the only serial loop, one
program per (V tile, sequence x head) holding the state's whole K (padded to a power of two,
at most 256) for its V columns. Legend as in `kernels/common/linear_attention_triton.py`; W and
U from `wy_triton.py`.

  _delta_states       forward: hs[c] = S; U' = U - W S (stored, the new values);
                      S <- exp(b_C) S + (k exp(b_C - b))^T U'
  _delta_state_grads  backward, chunks in reverse, with dU_local = scale A^T do (the scores'
                      share of dU', from `_la_dv`): dhs[c] = dS';
                      dU' = dU_local + (k exp(b_C - b)) dS' (stored apart: a kernel never
                      rewrites what it reads, so the autotuner may run it again);
                      dS <- exp(b_C) dS' + scale (q exp b)^T do - W^T dU'
The states between passes are in the inputs' dtype, the first and last in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rnnscale.kernels.common.chunk_state_triton import load_rows


@triton.jit
def tile_at(ptr, row, hh, H, K, V, kt, v0, BK: tl.constexpr, BV: tl.constexpr):
    """(pointers, mask) of rows kt*BK.. and columns v0.. of the K x V state of head hh in
    `[*, H, K, V]` row `row`."""
    kk = kt * BK + tl.arange(0, BK)
    vv = v0 + tl.arange(0, BV)
    base = ptr + (row.to(tl.int64) * H + hh) * K * V
    return base + kk[:, None] * V + vv[None, :], (kk[:, None] < K) & (vv[None, :] < V)


@triton.jit
def get(ptr, row, hh, H, K, V, kt, v0, BK: tl.constexpr, BV: tl.constexpr):
    p, mask = tile_at(ptr, row, hh, H, K, V, kt, v0, BK, BV)
    return tl.load(p, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def put(ptr, row, hh, H, K, V, kt, v0, X, BK: tl.constexpr, BV: tl.constexpr):
    p, mask = tile_at(ptr, row, hh, H, K, V, kt, v0, BK, BV)
    tl.store(p, X.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def rows_of(ptr, t0, eos, hh, H, K, kt, BK: tl.constexpr, BC: tl.constexpr, MT: tl.constexpr):
    """Rows t0.. (BC of them, zeros from eos on), key columns kt*BK.., of one head of a
    `[*, H, K]` tensor, as `tl.dot` takes them (no elementwise work on a K tile: decays go
    on the rows of the V-wide operand)."""
    t = t0 + tl.arange(0, BC)
    return load_rows(ptr, t, t < eos, hh, H, K, kt * BK + tl.arange(0, BK)).to(MT)


@triton.jit
def chunk_rows(b_ptr, bos, eos, c, hh, H, BC: tl.constexpr):
    """(rows t of chunk c, their mask, b, exp(b_C - b), exp(b_C))."""
    t0 = bos + c * BC
    t = t0 + tl.arange(0, BC)
    ok = t < eos
    b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
    b_last = tl.load(b_ptr + (tl.minimum(t0 + BC, eos) - 1) * H + hh)
    return t, ok, b, tl.exp(b_last - b), tl.exp(b_last)


@triton.jit
def _delta_states(k_ptr, w_ptr, u_ptr, b_ptr, s0_ptr, s_end_ptr, hs_ptr, vn_ptr, bounds_ptr,
                  offs_ptr, H, K, V, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  KT: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
                  MT: tl.constexpr):  # fmt: skip
    v0 = tl.program_id(0) * BV
    vv = v0 + tl.arange(0, BV)
    n = tl.program_id(2) // H
    hh = tl.program_id(2) % H
    DT = k_ptr.dtype.element_ty
    S0 = tl.zeros([BK, BV], dtype=tl.float32)
    S1, S2, S3 = S0, S0, S0  # the state's K tiles; KT of them are used
    if HAS_S0:
        S0 = get(s0_ptr, n, hh, H, K, V, 0, v0, BK, BV)
        if KT > 1:
            S1 = get(s0_ptr, n, hh, H, K, V, 1, v0, BK, BV)
        if KT > 2:
            S2 = get(s0_ptr, n, hh, H, K, V, 2, v0, BK, BV)
        if KT > 3:
            S3 = get(s0_ptr, n, hh, H, K, V, 3, v0, BK, BV)
    bos = tl.load(bounds_ptr + n)
    eos = tl.load(bounds_ptr + n + 1)
    first = tl.load(offs_ptr + n)
    for c in range(0, tl.cdiv(eos - bos, BC)):
        m = first + c
        t, ok, b, to_end, decay = chunk_rows(b_ptr, bos, eos, c, hh, H, BC)
        t0 = bos + c * BC
        put(hs_ptr, m, hh, H, K, V, 0, v0, S0, BK, BV)
        u = load_rows(u_ptr, t, ok, hh, H, V, vv).to(tl.float32)
        u -= tl.dot(rows_of(w_ptr, t0, eos, hh, H, K, 0, BK, BC, MT), S0.to(DT).to(MT),
                    input_precision=PREC)  # fmt: skip
        if KT > 1:
            put(hs_ptr, m, hh, H, K, V, 1, v0, S1, BK, BV)
            u -= tl.dot(rows_of(w_ptr, t0, eos, hh, H, K, 1, BK, BC, MT),
                        S1.to(DT).to(MT), input_precision=PREC)  # fmt: skip
        if KT > 2:
            put(hs_ptr, m, hh, H, K, V, 2, v0, S2, BK, BV)
            u -= tl.dot(rows_of(w_ptr, t0, eos, hh, H, K, 2, BK, BC, MT),
                        S2.to(DT).to(MT), input_precision=PREC)  # fmt: skip
        if KT > 3:
            put(hs_ptr, m, hh, H, K, V, 3, v0, S3, BK, BV)
            u -= tl.dot(rows_of(w_ptr, t0, eos, hh, H, K, 3, BK, BC, MT),
                        S3.to(DT).to(MT), input_precision=PREC)  # fmt: skip
        u_new = u.to(DT)
        off = (t[:, None] * H + hh).to(tl.int64) * V + vv[None, :]
        tl.store(vn_ptr + off, u_new, mask=ok[:, None] & (vv[None, :] < V))
        u_end = (u_new.to(tl.float32) * to_end[:, None]).to(DT).to(MT)  # (k exp(b_C - b))^T U'
        k = rows_of(k_ptr, t0, eos, hh, H, K, 0, BK, BC, MT)
        S0 = S0 * decay + tl.dot(tl.trans(k), u_end, input_precision=PREC)
        if KT > 1:
            k = rows_of(k_ptr, t0, eos, hh, H, K, 1, BK, BC, MT)
            S1 = S1 * decay + tl.dot(tl.trans(k), u_end, input_precision=PREC)
        if KT > 2:
            k = rows_of(k_ptr, t0, eos, hh, H, K, 2, BK, BC, MT)
            S2 = S2 * decay + tl.dot(tl.trans(k), u_end, input_precision=PREC)
        if KT > 3:
            k = rows_of(k_ptr, t0, eos, hh, H, K, 3, BK, BC, MT)
            S3 = S3 * decay + tl.dot(tl.trans(k), u_end, input_precision=PREC)
    put(s_end_ptr, n, hh, H, K, V, 0, v0, S0, BK, BV)
    if KT > 1:
        put(s_end_ptr, n, hh, H, K, V, 1, v0, S1, BK, BV)
    if KT > 2:
        put(s_end_ptr, n, hh, H, K, V, 2, v0, S2, BK, BV)
    if KT > 3:
        put(s_end_ptr, n, hh, H, K, V, 3, v0, S3, BK, BV)


@triton.jit
def back_tile(dS, q_ptr, w_ptr, t0, eos, hh, H, K, kt, decay, do_b, du, BK: tl.constexpr,
              BC: tl.constexpr, MT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One K tile of dS <- exp(b_C) dS' + q^T (scale exp(b) do) - W^T dU'."""
    q = rows_of(q_ptr, t0, eos, hh, H, K, kt, BK, BC, MT)
    w = rows_of(w_ptr, t0, eos, hh, H, K, kt, BK, BC, MT)
    dS = dS * decay + tl.dot(tl.trans(q), do_b, input_precision=PREC)
    return dS - tl.dot(tl.trans(w), du, input_precision=PREC)


@triton.jit
def _delta_state_grads(q_ptr, k_ptr, w_ptr, b_ptr, do_ptr, dul_ptr, du_ptr, s0_ptr, s_end_ptr,
                       dhs_ptr,
                       bounds_ptr, offs_ptr, scale, H, K, V,
                       BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KT: tl.constexpr,
                       PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    v0 = tl.program_id(0) * BV
    vv = v0 + tl.arange(0, BV)
    n = tl.program_id(2) // H
    hh = tl.program_id(2) % H
    DT = k_ptr.dtype.element_ty
    dS0 = get(s0_ptr, n, hh, H, K, V, 0, v0, BK, BV)
    dS1, dS2, dS3 = dS0, dS0, dS0
    if KT > 1:
        dS1 = get(s0_ptr, n, hh, H, K, V, 1, v0, BK, BV)
    if KT > 2:
        dS2 = get(s0_ptr, n, hh, H, K, V, 2, v0, BK, BV)
    if KT > 3:
        dS3 = get(s0_ptr, n, hh, H, K, V, 3, v0, BK, BV)
    bos = tl.load(bounds_ptr + n)
    eos = tl.load(bounds_ptr + n + 1)
    first = tl.load(offs_ptr + n)
    n_chunks = tl.cdiv(eos - bos, BC)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        m = first + c
        t, ok, b, to_end, decay = chunk_rows(b_ptr, bos, eos, c, hh, H, BC)
        t0 = bos + c * BC
        off = (t[:, None] * H + hh).to(tl.int64) * V + vv[None, :]
        v_mask = ok[:, None] & (vv[None, :] < V)
        du = tl.load(dul_ptr + off, mask=v_mask, other=0.0)  # the scores' share, from _la_dv
        du_state = tl.zeros([BC, BV], dtype=tl.float32)  # (k exp(b_C - b)) dS', by rows
        put(dhs_ptr, m, hh, H, K, V, 0, v0, dS0, BK, BV)
        k = rows_of(k_ptr, t0, eos, hh, H, K, 0, BK, BC, MT)
        du_state += tl.dot(k, dS0.to(DT).to(MT), input_precision=PREC)
        if KT > 1:
            put(dhs_ptr, m, hh, H, K, V, 1, v0, dS1, BK, BV)
            k = rows_of(k_ptr, t0, eos, hh, H, K, 1, BK, BC, MT)
            du_state += tl.dot(k, dS1.to(DT).to(MT), input_precision=PREC)
        if KT > 2:
            put(dhs_ptr, m, hh, H, K, V, 2, v0, dS2, BK, BV)
            k = rows_of(k_ptr, t0, eos, hh, H, K, 2, BK, BC, MT)
            du_state += tl.dot(k, dS2.to(DT).to(MT), input_precision=PREC)
        if KT > 3:
            put(dhs_ptr, m, hh, H, K, V, 3, v0, dS3, BK, BV)
            k = rows_of(k_ptr, t0, eos, hh, H, K, 3, BK, BC, MT)
            du_state += tl.dot(k, dS3.to(DT).to(MT), input_precision=PREC)
        du += du_state * to_end[:, None]
        tl.store(du_ptr + off, du, mask=v_mask)
        do = load_rows(do_ptr, t, ok, hh, H, V, vv).to(tl.float32) * (scale * tl.exp(b))[:, None]
        do_b = do.to(DT).to(MT)
        du = du.to(DT).to(MT)
        dS0 = back_tile(dS0, q_ptr, w_ptr, t0, eos, hh, H, K, 0, decay, do_b, du, BK, BC, MT, PREC)
        if KT > 1:
            dS1 = back_tile(
                dS1, q_ptr, w_ptr, t0, eos, hh, H, K, 1, decay, do_b, du, BK, BC, MT, PREC
            )
        if KT > 2:
            dS2 = back_tile(
                dS2, q_ptr, w_ptr, t0, eos, hh, H, K, 2, decay, do_b, du, BK, BC, MT, PREC
            )
        if KT > 3:
            dS3 = back_tile(
                dS3, q_ptr, w_ptr, t0, eos, hh, H, K, 3, decay, do_b, du, BK, BC, MT, PREC
            )
    put(s_end_ptr, n, hh, H, K, V, 0, v0, dS0, BK, BV)
    if KT > 1:
        put(s_end_ptr, n, hh, H, K, V, 1, v0, dS1, BK, BV)
    if KT > 2:
        put(s_end_ptr, n, hh, H, K, V, 2, v0, dS2, BK, BV)
    if KT > 3:
        put(s_end_ptr, n, hh, H, K, V, 3, v0, dS3, BK, BV)
