"""The delta rule's WY / UT representation on Triton, chunk-parallel (one program per (chunk,
head)), and its gradient. Legend as in `kernels/common/linear_attention_triton.py`; beta per
row, Gamma_rs = exp(b_r - b_s) for s < r (zero elsewhere and outside the sequence).

  _delta_solve    L = diag(beta) (K K^T * Gamma), strictly lower, formed as 16 x 16 blocks;
                  Tinv = (I + L)^-1: each diagonal block by forward substitution (16 rows),
                  then the blocks below it, Tinv_ij = -Tinv_ii sum_{j <= m < i} L_im Tinv_mj;
                  stored [T, H, C] fp32 (zeros above the diagonal). Chunks of at most 64.
  _delta_wu       W = Tinv (beta exp(b) K), U = Tinv (beta V), in the inputs' dtype.
  _delta_dw       dW = -dU' S^T, one K tile per program (U' = U - W S)
  _delta_dL       from dW and dU (the gradients of W and U): dTinv = dW Bk^T + dU Bv^T with
                  Bk = beta exp(b) K, Bv = beta V; dL = -Tinv^T dTinv Tinv^T below the
                  diagonal, and what L = beta (K K^T * Gamma) gives: dKK, dbeta, db
  _delta_wy_bwd   dBk = Tinv^T dW, dBv = Tinv^T dU: dk, dv, the rest of dbeta and db, and
                  the in-chunk reverse cumulative sum of db (each term "+ on its row, - on
                  its column" of the decay it came from).
"""

from __future__ import annotations

import triton
import triton.language as tl

from rnnscale.kernels.common.chunk_state_triton import load_rows


@triton.jit
def _rows16(b_ptr, beta_ptr, t1, t0, i, hh, H, BC: tl.constexpr):
    """Block i's rows: (token ids, mask, b [16], beta [16])."""
    j = i * 16 + tl.arange(0, 16)
    t = t0 + j
    ok = (j < BC) & (t < t1)
    b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
    beta = tl.load(beta_ptr + t * H + hh, mask=ok, other=0.0).to(tl.float32)
    return t, ok, b, beta


@triton.jit
def _block_L(kk_ij, bi, bj, beta_i, ok_i, DIAG: tl.constexpr):
    """L_ij = beta_i (k_i k_j^T) exp(b_i - b_j) on rows inside the sequence (strictly lower on
    the diagonal block)."""
    r = tl.arange(0, 16)
    if DIAG:
        keep = ok_i[:, None] & (r[:, None] > r[None, :])
    else:
        keep = ok_i[:, None] & (r[None, :] >= 0)
    return (
        beta_i[:, None] * kk_ij * tl.exp(tl.where(keep, bi[:, None] - bj[None, :], float("-inf")))
    )


@triton.jit
def _inverse16(L):
    """(I + L)^-1 for a strictly lower 16 x 16 L: row i = e_i - sum_{j<i} L_ij row_j."""
    r = tl.arange(0, 16)
    Ti = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, 16):
        l_row = tl.sum(tl.where(r[:, None] == i, L, 0.0), 0)
        update = tl.sum(l_row[:, None] * Ti, 0)
        Ti = tl.where(r[:, None] == i, Ti - update[None, :], Ti)
    return Ti


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _store16(Ti_ptr, X, t, ok, t0, j, hh, H, BC: tl.constexpr):
    off = (t[:, None] * H + hh).to(tl.int64) * BC + (j * 16 + tl.arange(0, 16))[None, :]
    tl.store(Ti_ptr + off, X, mask=ok[:, None] & (j * 16 + tl.arange(0, 16) < BC)[None, :])


@triton.jit
def _delta_solve(k_ptr, b_ptr, beta_ptr, Ti_ptr, chunks_ptr, H, K,
                 BC: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    m = tl.program_id(1)
    hh = tl.program_id(2)
    t0 = tl.load(chunks_ptr + 2 * m)
    t1 = tl.load(chunks_ptr + 2 * m + 1)
    z = tl.zeros([16, 16], dtype=tl.float32)
    kk10, kk20, kk21, kk30, kk31, kk32 = z, z, z, z, z, z
    kk00, kk11, kk22, kk33 = z, z, z, z
    t_0, ok0, b_0, beta0 = _rows16(b_ptr, beta_ptr, t1, t0, 0, hh, H, BC)
    t_1, ok1, b_1, beta1 = _rows16(b_ptr, beta_ptr, t1, t0, 1, hh, H, BC)
    t_2, ok2, b_2, beta2 = _rows16(b_ptr, beta_ptr, t1, t0, 2, hh, H, BC)
    t_3, ok3, b_3, beta3 = _rows16(b_ptr, beta_ptr, t1, t0, 3, hh, H, BC)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_0 = load_rows(k_ptr, t_0, ok0, hh, H, K, kk).to(tl.float32)
        k_1 = load_rows(k_ptr, t_1, ok1, hh, H, K, kk).to(tl.float32)
        k_2 = load_rows(k_ptr, t_2, ok2, hh, H, K, kk).to(tl.float32)
        k_3 = load_rows(k_ptr, t_3, ok3, hh, H, K, kk).to(tl.float32)
        kk00 += _mm(k_0, tl.trans(k_0))
        kk11 += _mm(k_1, tl.trans(k_1))
        kk22 += _mm(k_2, tl.trans(k_2))
        kk33 += _mm(k_3, tl.trans(k_3))
        kk10 += _mm(k_1, tl.trans(k_0))
        kk20 += _mm(k_2, tl.trans(k_0))
        kk21 += _mm(k_2, tl.trans(k_1))
        kk30 += _mm(k_3, tl.trans(k_0))
        kk31 += _mm(k_3, tl.trans(k_1))
        kk32 += _mm(k_3, tl.trans(k_2))
    # diagonal blocks, then the blocks below them (zeros where a block lies past the chunk)
    T00 = _inverse16(_block_L(kk00, b_0, b_0, beta0, ok0, True))
    T11 = _inverse16(_block_L(kk11, b_1, b_1, beta1, ok1, True))
    T22 = _inverse16(_block_L(kk22, b_2, b_2, beta2, ok2, True))
    T33 = _inverse16(_block_L(kk33, b_3, b_3, beta3, ok3, True))
    L10 = _block_L(kk10, b_1, b_0, beta1, ok1, False)
    L21 = _block_L(kk21, b_2, b_1, beta2, ok2, False)
    L32 = _block_L(kk32, b_3, b_2, beta3, ok3, False)
    L20 = _block_L(kk20, b_2, b_0, beta2, ok2, False)
    L31 = _block_L(kk31, b_3, b_1, beta3, ok3, False)
    L30 = _block_L(kk30, b_3, b_0, beta3, ok3, False)
    T10 = -_mm(T11, _mm(L10, T00))
    T21 = -_mm(T22, _mm(L21, T11))
    T32 = -_mm(T33, _mm(L32, T22))
    T20 = -_mm(T22, _mm(L20, T00) + _mm(L21, T10))
    T31 = -_mm(T33, _mm(L31, T11) + _mm(L32, T21))
    T30 = -_mm(T33, _mm(L30, T00) + _mm(L31, T10) + _mm(L32, T20))
    _store16(Ti_ptr, T00, t_0, ok0, t0, 0, hh, H, BC)
    _store16(Ti_ptr, T10, t_1, ok1, t0, 0, hh, H, BC)
    _store16(Ti_ptr, T11, t_1, ok1, t0, 1, hh, H, BC)
    _store16(Ti_ptr, T20, t_2, ok2, t0, 0, hh, H, BC)
    _store16(Ti_ptr, T21, t_2, ok2, t0, 1, hh, H, BC)
    _store16(Ti_ptr, T22, t_2, ok2, t0, 2, hh, H, BC)
    _store16(Ti_ptr, T30, t_3, ok3, t0, 0, hh, H, BC)
    _store16(Ti_ptr, T31, t_3, ok3, t0, 1, hh, H, BC)
    _store16(Ti_ptr, T32, t_3, ok3, t0, 2, hh, H, BC)
    _store16(Ti_ptr, T33, t_3, ok3, t0, 3, hh, H, BC)


@triton.jit
def _delta_wu(k_ptr, v_ptr, b_ptr, beta_ptr, Ti_ptr, w_ptr, u_ptr, chunks_ptr, H, K, V,
              BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
              MT: tl.constexpr):  # fmt: skip
    m = tl.program_id(1)
    hh = tl.program_id(2)
    rows = tl.arange(0, BC)
    t = tl.load(chunks_ptr + 2 * m) + rows
    ok = t < tl.load(chunks_ptr + 2 * m + 1)
    DT = k_ptr.dtype.element_ty
    Ti = load_rows(Ti_ptr, t, ok, hh, H, BC, rows).to(DT).to(MT)
    beta = tl.load(beta_ptr + t * H + hh, mask=ok, other=0.0).to(tl.float32)
    wk = beta * tl.exp(tl.load(b_ptr + t * H + hh, mask=ok, other=0.0))
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k = load_rows(k_ptr, t, ok, hh, H, K, kk).to(tl.float32) * wk[:, None]
        w = tl.dot(Ti, k.to(DT).to(MT), input_precision=PREC)
        off = (t[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
        tl.store(w_ptr + off, w.to(w_ptr.dtype.element_ty), mask=ok[:, None] & (kk[None, :] < K))
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        v = load_rows(v_ptr, t, ok, hh, H, V, vv).to(tl.float32) * beta[:, None]
        u = tl.dot(Ti, v.to(DT).to(MT), input_precision=PREC)
        off = (t[:, None] * H + hh).to(tl.int64) * V + vv[None, :]
        tl.store(u_ptr + off, u.to(u_ptr.dtype.element_ty), mask=ok[:, None] & (vv[None, :] < V))


@triton.jit
def chunk_of(chunks_ptr, BC: tl.constexpr):
    """(rows t of this program's chunk, their mask, lanes 0..BC-1, head)."""
    m = tl.program_id(1)
    rows = tl.arange(0, BC)
    t = tl.load(chunks_ptr + 2 * m) + rows
    return t, t < tl.load(chunks_ptr + 2 * m + 1), rows, tl.program_id(2)


@triton.jit
def _delta_dw(du_ptr, hs_ptr, dw_ptr, chunks_ptr, H, K, V,
              BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
              MT: tl.constexpr):  # fmt: skip
    """dW = -dU' S^T for one K tile of one chunk (U' = U - W S), fp32."""
    t, ok, rows, hh = chunk_of(chunks_ptr, BC)
    m = tl.program_id(1).to(tl.int64)
    kk = tl.program_id(0) * BK + tl.arange(0, BK)
    DT = hs_ptr.dtype.element_ty
    dw = tl.zeros([BC, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        du = load_rows(du_ptr, t, ok, hh, H, V, vv).to(DT).to(MT)
        off = m * H * K * V + (hh * K + kk[:, None]).to(tl.int64) * V + vv[None, :]
        S = tl.load(hs_ptr + off, mask=(kk[:, None] < K) & (vv[None, :] < V), other=0.0)
        dw += tl.dot(du, tl.trans(S.to(MT)), input_precision=PREC)
    off = (t[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
    tl.store(dw_ptr + off, -dw, mask=ok[:, None] & (kk[None, :] < K))


@triton.jit
def _delta_dL(k_ptr, v_ptr, b_ptr, beta_ptr, Ti_ptr, dw_ptr, du_ptr, dKK_ptr, dbeta_ptr, db_ptr,
              chunks_ptr, H, K, V, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              PREC: tl.constexpr):  # fmt: skip
    """dTinv = dW Bk^T + dU Bv^T, dL = -Tinv^T dTinv Tinv^T (strictly lower), and what L
    gives: dKK = dL beta Gamma [T, H, C], dbeta's and db's shares (the latter "+ on its row,
    - on its column")."""
    t, ok, rows, hh = chunk_of(chunks_ptr, BC)
    b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
    beta = tl.load(beta_ptr + t * H + hh, mask=ok, other=0.0).to(tl.float32)
    wk = beta * tl.exp(b)
    dTi = tl.zeros([BC, BC], dtype=tl.float32)
    KK = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k = load_rows(k_ptr, t, ok, hh, H, K, kk).to(tl.float32)
        dw = load_rows(dw_ptr, t, ok, hh, H, K, kk)
        dTi += tl.dot(dw, tl.trans(k * wk[:, None]), input_precision=PREC)
        KK += tl.dot(k, tl.trans(k), input_precision=PREC)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        v = load_rows(v_ptr, t, ok, hh, H, V, vv).to(tl.float32)
        du = load_rows(du_ptr, t, ok, hh, H, V, vv)
        dTi += tl.dot(du, tl.trans(v * beta[:, None]), input_precision=PREC)
    Ti = load_rows(Ti_ptr, t, ok, hh, H, BC, rows)
    dL = tl.dot(dTi, tl.trans(Ti), input_precision=PREC)
    strict = (rows[:, None] > rows[None, :]) & ok[:, None]
    dL = tl.where(strict, -tl.dot(tl.trans(Ti), dL, input_precision=PREC), 0.0)
    gamma = tl.exp(tl.where(strict, b[:, None] - b[None, :], float("-inf")))
    dL_L = dL * beta[:, None] * KK * gamma
    tl.store(dbeta_ptr + t * H + hh, tl.sum(dL * KK * gamma, 1), mask=ok)
    tl.store(db_ptr + t * H + hh, tl.sum(dL_L, 1) - tl.sum(dL_L, 0), mask=ok)
    off = (t[:, None] * H + hh).to(tl.int64) * BC + rows[None, :]
    tl.store(dKK_ptr + off, dL * beta[:, None] * gamma, mask=ok[:, None])


@triton.jit
def _delta_wy_bwd(k_ptr, v_ptr, b_ptr, beta_ptr, Ti_ptr, dw_ptr, du_ptr, dKK_ptr, dbl_ptr, dbL_ptr,
                  dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, chunks_ptr, H, K, V,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  PREC: tl.constexpr):  # fmt: skip
    """dBk = Tinv^T dW, dBv = Tinv^T dU: dk (with K K^T's share from dKK), dv, all of dbeta,
    and dg's share: the reverse cumulative sum of db (with _delta_dL's shares of dbeta and db,
    read from dbl and dbL: a kernel never rewrites what it reads, so the autotuner may run it
    again)."""
    t, ok, rows, hh = chunk_of(chunks_ptr, BC)
    b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
    beta = tl.load(beta_ptr + t * H + hh, mask=ok, other=0.0).to(tl.float32)
    wk = beta * tl.exp(b)
    Ti = load_rows(Ti_ptr, t, ok, hh, H, BC, rows)
    dbeta = tl.load(dbl_ptr + t * H + hh, mask=ok, other=0.0)
    db = tl.load(dbL_ptr + t * H + hh, mask=ok, other=0.0)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        v = load_rows(v_ptr, t, ok, hh, H, V, vv).to(tl.float32)
        dBv = tl.dot(tl.trans(Ti), load_rows(du_ptr, t, ok, hh, H, V, vv), input_precision=PREC)
        dbeta += tl.sum(v * dBv, 1)
        off = (t[:, None] * H + hh).to(tl.int64) * V + vv[None, :]
        dv = beta[:, None] * dBv
        tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=ok[:, None] & (vv < V))
    dKK = load_rows(dKK_ptr, t, ok, hh, H, BC, rows)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k = load_rows(k_ptr, t, ok, hh, H, K, kk).to(tl.float32)
        dBk = tl.dot(tl.trans(Ti), load_rows(dw_ptr, t, ok, hh, H, K, kk), input_precision=PREC)
        k_dBk = tl.sum(k * dBk, 1)
        dbeta += tl.exp(b) * k_dBk
        db += wk * k_dBk
        dk = wk[:, None] * dBk + tl.dot(dKK, k, input_precision=PREC)
        dk += tl.dot(tl.trans(dKK), k, input_precision=PREC)
        off = (t[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
        tl.store(dk_ptr + off, dk, mask=ok[:, None] & (kk[None, :] < K))
    tl.store(dbeta_ptr + t * H + hh, dbeta, mask=ok)
    tl.store(dg_ptr + t * H + hh, tl.cumsum(db, 0, reverse=True), mask=ok)
