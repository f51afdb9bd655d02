"""GLA's in-chunk scores and their gradients in 16-row sub-chunks, so that per-key decays never
form a [C, C, K] tensor (the chunk-parallel kernels around them are in
`kernels/common/linear_attention_triton.py`; legend there).

Row block i of a chunk holds rows r0 .. r0 + 15 (r0 = 16 i). For a row r of block i and a
column s of an earlier block, exp(b_r - b_s) = exp(b_r - b_r0) exp(b_r0 - b_s), both factors
<= 1, so the off-diagonal part is one `tl.dot` of (q exp(b - b_r0)) and (k exp(b_r0 - b))^T
over all earlier columns at once. The 16 x 16 diagonal block is summed column by column with
the exact pairwise decay. The gradients use the same split, with the block's last row as the
reference for the rows after it.

  _gla_scores      A [T, H, C] fp32 (row r: the scores of row r against its chunk's columns)
  _gla_dA          dA = scale do v^T, lower triangle, [T, H, C] fp32
  _gla_dqk_intra   dq_r = sum_{s <= r} dA_rs k_s exp(b_r - b_s),
                   dk_s = sum_{r >= s} dA_rs q_r exp(b_r - b_s), [T, H, K] fp32 each
"""

from __future__ import annotations

import triton
import triton.language as tl

from rnnscale.kernels.common.chunk_state_triton import load_rows


@triton.jit
def sub_block(chunks_ptr, i, BC: tl.constexpr, BS: tl.constexpr):
    """(chunk start, chunk end, rows of block i, their mask, the chunk's rows, their mask)."""
    m = tl.program_id(1)
    t0 = tl.load(chunks_ptr + 2 * m)
    t1 = tl.load(chunks_ptr + 2 * m + 1)
    ti = t0 + i * BS + tl.arange(0, BS)
    tc = t0 + tl.arange(0, BC)
    return t0, t1, ti, ti < t1, tc, tc < t1


@triton.jit
def load_row(ptr, r, ok, hh, H, W, ww):
    """Row r of one head of a `[*, H, W]` tensor, columns ww (zeros where not ok)."""
    return tl.load(ptr + (r * H + hh).to(tl.int64) * W + ww, mask=ok & (ww < W), other=0.0)


@triton.jit
def _gla_scores(q_ptr, k_ptr, b_ptr, A_ptr, chunks_ptr, H, K,
                BC: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    hh = tl.program_id(2)
    t0, t1, ti, oki, tc, okc = sub_block(chunks_ptr, i, BC, BS)
    r0 = t0 + i * BS
    DT = q_ptr.dtype.element_ty
    A = tl.zeros([BS, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        q = load_rows(q_ptr, ti, oki, hh, H, K, kk).to(tl.float32)
        bi = load_rows(b_ptr, ti, oki, hh, H, K, kk)
        b0 = load_row(b_ptr, r0, r0 < t1, hh, H, K, kk)
        k = load_rows(k_ptr, tc, okc, hh, H, K, kk).to(tl.float32)
        bc = load_rows(b_ptr, tc, okc, hh, H, K, kk)
        before = (tc < r0)[:, None]
        qh = q * tl.exp(tl.where(oki[:, None], bi - b0[None, :], 0.0))
        kh = k * tl.exp(tl.where(before, b0[None, :] - bc, float("-inf")))
        A += tl.dot(qh.to(DT).to(MT), tl.trans(kh.to(DT).to(MT)), input_precision=PREC)
        for j in range(0, BS):  # the diagonal block, one column at a time
            s = r0 + j
            ks = load_row(k_ptr, s, s < t1, hh, H, K, kk).to(tl.float32)
            bs = load_row(b_ptr, s, s < t1, hh, H, K, kk)
            mine = (ti >= s)[:, None] & oki[:, None]
            pair = tl.exp(tl.where(mine, bi - bs[None, :], float("-inf")))
            col = tl.sum(q * ks[None, :] * pair, 1)
            A += tl.where(tc[None, :] == s, col[:, None], 0.0)
    off = (ti[:, None] * H + hh).to(tl.int64) * BC + (tc - t0)[None, :]
    tl.store(A_ptr + off, A, mask=oki[:, None])


@triton.jit
def _gla_dA(do_ptr, v_ptr, dA_ptr, chunks_ptr, scale, H, V,
            BC: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    t0, t1, _, _, tc, okc = sub_block(chunks_ptr, 0, BC, 16)
    hh = tl.program_id(2)
    DT = do_ptr.dtype.element_ty
    dA = tl.zeros([BC, BC], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        do = load_rows(do_ptr, tc, okc, hh, H, V, vv).to(DT).to(MT)
        v = load_rows(v_ptr, tc, okc, hh, H, V, vv).to(DT).to(MT)
        dA += tl.dot(do, tl.trans(v), input_precision=PREC)
    lower = (tc[:, None] >= tc[None, :]) & okc[:, None]
    off = (tc[:, None] * H + hh).to(tl.int64) * BC + (tc - t0)[None, :]
    tl.store(dA_ptr + off, tl.where(lower, scale * dA, 0.0), mask=okc[:, None])


@triton.jit
def _gla_dqk_intra(q_ptr, k_ptr, b_ptr, dA_ptr, dq_ptr, dk_ptr, chunks_ptr, H, K,
                   BC: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                   PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    NC: tl.constexpr = BC // BS
    i = tl.program_id(0) % NC
    hh = tl.program_id(2)
    kk = (tl.program_id(0) // NC) * BK + tl.arange(0, BK)
    t0, t1, ti, oki, tc, okc = sub_block(chunks_ptr, i, BC, BS)
    r0 = t0 + i * BS
    r1 = tl.minimum(r0 + BS, t1) - 1  # the block's last real row
    DT = q_ptr.dtype.element_ty
    bi = load_rows(b_ptr, ti, oki, hh, H, K, kk)
    b0 = load_row(b_ptr, r0, r0 < t1, hh, H, K, kk)
    b1 = load_row(b_ptr, r1, r0 < t1, hh, H, K, kk)
    bc = load_rows(b_ptr, tc, okc, hh, H, K, kk)
    # dq: the columns of earlier blocks, through the block's first row
    dA_rows = load_rows(dA_ptr, ti, oki, hh, H, BC, tl.arange(0, BC)).to(DT).to(MT)
    kc = load_rows(k_ptr, tc, okc, hh, H, K, kk).to(tl.float32)
    kh = kc * tl.exp(tl.where((tc < r0)[:, None], b0[None, :] - bc, float("-inf")))
    dq = tl.dot(dA_rows, kh.to(DT).to(MT), input_precision=PREC)
    dq = dq * tl.exp(tl.where(oki[:, None], bi - b0[None, :], 0.0))
    # dk: the rows of later blocks, through the block's last row
    qc = load_rows(q_ptr, tc, okc, hh, H, K, kk).to(tl.float32)
    qh = qc * tl.exp(tl.where((tc > r1)[:, None] & okc[:, None], bc - b1[None, :], float("-inf")))
    dA_cols = load_rows(dA_ptr, tc, okc, hh, H, BC, i * BS + tl.arange(0, BS)).to(DT).to(MT)
    dk = tl.dot(tl.trans(dA_cols), qh.to(DT).to(MT), input_precision=PREC)
    dk = dk * tl.exp(tl.where(oki[:, None], b1[None, :] - bi, 0.0))
    for j in range(0, BS):  # the diagonal block: row/column s = r0 + j
        s = r0 + j
        own = s < t1
        ks = load_row(k_ptr, s, own, hh, H, K, kk).to(tl.float32)
        qs = load_row(q_ptr, s, own, hh, H, K, kk).to(tl.float32)
        bs = load_row(b_ptr, s, own, hh, H, K, kk)
        dA_col = tl.load(dA_ptr + (ti * H + hh).to(tl.int64) * BC + (s - t0), mask=oki, other=0.0)
        dA_row = tl.load(dA_ptr + (s * H + hh).to(tl.int64) * BC + (ti - t0), mask=own, other=0.0)
        below = (ti >= s)[:, None] & oki[:, None]  # rows r >= s: dq_r gets dA_rs k_s
        pair = tl.exp(tl.where(below, bi - bs[None, :], float("-inf")))
        dq += dA_col[:, None] * ks[None, :] * pair
        above = (ti <= s)[:, None] & oki[:, None] & own  # columns c <= s: dk_c gets dA_sc q_s
        pair = tl.exp(tl.where(above, bs[None, :] - bi, float("-inf")))
        dk += dA_row[:, None] * qs[None, :] * pair
    off = (ti[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
    mask = oki[:, None] & (kk[None, :] < K)
    tl.store(dq_ptr + off, dq, mask=mask)
    tl.store(dk_ptr + off, dk, mask=mask)
