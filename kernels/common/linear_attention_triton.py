"""Triton forward and backward of gated linear attention, chunk-parallel, with per-key gates
(gla) or one gate per head (simple_gla): the kernels behind both families' `chunk_triton.py`.

Legend as in `chunk_state_triton.py`; A the chunk's C x C scores, dA their gradient, S the state
entering the chunk (`hs[c]`), dS' the gradient of the state leaving it (`dhs[c]`). Only the
state pass walks the chunks; every other kernel runs one program per (tile, chunk, head):
thousands at batch 8 x 4096 tokens.

forward
  1. b = in-chunk cumsum(g)                                  _chunk_cumsum
  2. hs = the state entering every chunk, and the final one    _state_pass
  3. gla: A_rs = sum_k q_rk k_sk exp(b_rk - b_sk), s <= r      _gla_scores (16-row sub-chunks)
  4. o = scale ((q exp b) S + A v); simple_gla forms A here    _la_output
backward (hs recomputed by 2: nothing of size M x K x V is kept between the passes)
  5. dhs = the gradient of the state leaving every chunk, dh0  _state_pass, reversed
  6. dv = scale A^T do + (k exp(b_C - b)) dS'                  _la_dv
  7. gla: dA = scale do v^T (lower), then the in-chunk parts of dq and dk
                                                               _gla_dA, _gla_dqk_intra
  8. dq = scale exp(b) (do S^T) + [dA * decay] k
     dk = [dA * decay]^T q + exp(b_C - b) (v dS'^T)
     db = q dq - k dk, plus exp(b_C) sum_v S dS' + sum_s k_s (dk from the state) on the last
     row; dg = the in-chunk reverse cumulative sum of db         _la_dqk
Every exponent is a difference b_r - b_s with s <= r, or b_C - b_r: never positive.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnscale.kernels.common.backend import (
    check_triton,
    chunk_table,
    dot_args,
    sequence_offsets,
    state_grads,
    tile,
    tune_configs,
    tuned,
)
from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.chunk_state_triton import (
    _chunk_cumsum,
    _state_pass,
    load_gates,
    load_rows,
)
from rnnscale.kernels.gla.subchunk_triton import _gla_dA, _gla_dqk_intra, _gla_scores


@triton.jit
def chunk_program(chunks_ptr, BC: tl.constexpr):
    """(chunk m as int64, rows t, rows in the sequence, the last real row, lanes 0..BC-1)."""
    m = tl.program_id(1)
    t0 = tl.load(chunks_ptr + 2 * m)
    t1 = tl.load(chunks_ptr + 2 * m + 1)
    rows = tl.arange(0, BC)
    t = t0 + rows
    return m.to(tl.int64), t, t < t1, t1 - 1, rows


@triton.jit
def decay_matrix(b, ok, rows):
    """exp(b_r - b_s) for s <= r within the sequence, else 0 (one gate per head)."""
    lower = (rows[:, None] >= rows[None, :]) & ok[:, None]
    return tl.exp(tl.where(lower, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def load_tile(hs_ptr, m, hh, H, K, V, kk, vv):
    """The [BK, BV] tile of chunk m's state, head hh."""
    off = m * H * K * V + (hh * K + kk[:, None]).to(tl.int64) * V + vv[None, :]
    return tl.load(hs_ptr + off, mask=(kk[:, None] < K) & (vv[None, :] < V), other=0.0)


@triton.jit
def _la_output(q_ptr, k_ptr, v_ptr, b_ptr, A_ptr, hs_ptr, o_ptr, chunks_ptr, scale, H, K, V,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_KEY: tl.constexpr,
               PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    m, t, ok, last, rows = chunk_program(chunks_ptr, BC)
    hh = tl.program_id(2)
    vv = tl.program_id(0) * BV + tl.arange(0, BV)
    DT = q_ptr.dtype.element_ty
    o = tl.zeros([BC, BV], dtype=tl.float32)
    A = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        q = load_rows(q_ptr, t, ok, hh, H, K, kk)
        S = load_tile(hs_ptr, m, hh, H, K, V, kk, vv).to(DT).to(MT)
        if PER_KEY:
            b, b_last = load_gates(b_ptr, t, ok, last, hh, H, K, kk, PER_KEY)
            o += tl.dot((q.to(tl.float32) * tl.exp(b)).to(DT).to(MT), S, input_precision=PREC)
        else:
            o += tl.dot(q.to(MT), S, input_precision=PREC)
            k = load_rows(k_ptr, t, ok, hh, H, K, kk)
            A += tl.dot(q.to(MT), tl.trans(k.to(MT)), input_precision=PREC)
    if PER_KEY:
        A = load_rows(A_ptr, t, ok, hh, H, BC, rows)
    else:
        b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
        o = o * tl.exp(b)[:, None]
        A = A * decay_matrix(b, ok, rows)
    v = load_rows(v_ptr, t, ok, hh, H, V, vv).to(DT).to(MT)
    o = scale * (o + tl.dot(A.to(DT).to(MT), v, input_precision=PREC))
    off = (t[:, None] * H + hh).to(tl.int64) * V + vv[None, :]
    tl.store(o_ptr + off, o.to(o_ptr.dtype.element_ty), mask=ok[:, None] & (vv[None, :] < V))


@triton.jit
def _la_dv(q_ptr, k_ptr, b_ptr, A_ptr, do_ptr, dhs_ptr, dv_ptr, chunks_ptr, scale, H, K, V,
           BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_KEY: tl.constexpr,
           STATE: tl.constexpr,
           PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    m, t, ok, last, rows = chunk_program(chunks_ptr, BC)
    hh = tl.program_id(2)
    vv = tl.program_id(0) * BV + tl.arange(0, BV)
    DT = q_ptr.dtype.element_ty
    dv = tl.zeros([BC, BV], dtype=tl.float32)
    At = tl.zeros([BC, BC], dtype=tl.float32)  # At[s, r] = A[r, s]
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k = load_rows(k_ptr, t, ok, hh, H, K, kk)
        b, b_last = load_gates(b_ptr, t, ok, last, hh, H, K, kk, PER_KEY)
        if PER_KEY:
            to_end = tl.exp(b_last[None, :] - b)
        else:
            to_end = tl.exp(b_last - b)[:, None]
            q = load_rows(q_ptr, t, ok, hh, H, K, kk)
            At += tl.dot(k.to(MT), tl.trans(q.to(MT)), input_precision=PREC)
        if STATE:  # the delta rule adds this in its state pass
            dS = load_tile(dhs_ptr, m, hh, H, K, V, kk, vv).to(DT).to(MT)
            dv += tl.dot((k.to(tl.float32) * to_end).to(DT).to(MT), dS, input_precision=PREC)
    if PER_KEY:
        At = tl.trans(load_rows(A_ptr, t, ok, hh, H, BC, rows))
    else:
        b = tl.load(b_ptr + t * H + hh, mask=ok, other=0.0)
        At = At * tl.trans(decay_matrix(b, ok, rows))
    do = load_rows(do_ptr, t, ok, hh, H, V, vv).to(DT).to(MT)
    dv += scale * tl.dot(At.to(DT).to(MT), do, input_precision=PREC)
    off = (t[:, None] * H + hh).to(tl.int64) * V + vv[None, :]
    tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=ok[:, None] & (vv[None, :] < V))


@triton.jit
def _la_dqk(q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, hs_ptr, dhs_ptr, dqi_ptr, dki_ptr,
            dq_ptr, dk_ptr, dg_ptr, chunks_ptr, scale, TT, H, K, V,
            BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PER_KEY: tl.constexpr,
            PREC: tl.constexpr, MT: tl.constexpr):  # fmt: skip
    m, t, ok, last, rows = chunk_program(chunks_ptr, BC)
    hh = tl.program_id(2)
    kk = tl.program_id(0) * BK + tl.arange(0, BK)
    DT = q_ptr.dtype.element_ty
    dq = tl.zeros([BC, BK], dtype=tl.float32)
    dk = tl.zeros([BC, BK], dtype=tl.float32)
    dA = tl.zeros([BC, BC], dtype=tl.float32)
    s_ds = tl.zeros([BK], dtype=tl.float32)  # sum_v S dS'
    for v0 in range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        do = load_rows(do_ptr, t, ok, hh, H, V, vv).to(DT).to(MT)
        v = load_rows(v_ptr, t, ok, hh, H, V, vv).to(DT).to(MT)
        S = load_tile(hs_ptr, m, hh, H, K, V, kk, vv)
        dS = load_tile(dhs_ptr, m, hh, H, K, V, kk, vv)
        dq += tl.dot(do, tl.trans(S.to(DT).to(MT)), input_precision=PREC)
        dk += tl.dot(v, tl.trans(dS.to(DT).to(MT)), input_precision=PREC)
        s_ds += tl.sum(S.to(tl.float32) * dS.to(tl.float32), 1)
        if not PER_KEY:
            dA += tl.dot(do, tl.trans(v), input_precision=PREC)
    q = load_rows(q_ptr, t, ok, hh, H, K, kk).to(tl.float32)
    k = load_rows(k_ptr, t, ok, hh, H, K, kk).to(tl.float32)
    b, b_last = load_gates(b_ptr, t, ok, last, hh, H, K, kk, PER_KEY)
    if PER_KEY:
        dq = scale * dq * tl.exp(b) + load_rows(dqi_ptr, t, ok, hh, H, K, kk)
        dk_state = dk * tl.exp(b_last[None, :] - b)
        dk = dk_state + load_rows(dki_ptr, t, ok, hh, H, K, kk)
        at_end = s_ds * tl.exp(b_last) + tl.sum(k * dk_state, 0)
        db = q * dq - k * dk + tl.where(rows[:, None] == BC - 1, at_end[None, :], 0.0)
        off = (t[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
        tl.store(dg_ptr + off, tl.cumsum(db, 0, reverse=True), mask=ok[:, None] & (kk < K))
    else:
        dq = scale * dq * tl.exp(b)[:, None]
        dk_state = dk * tl.exp(b_last - b)[:, None]
        dA = (scale * dA * decay_matrix(b, ok, rows)).to(DT).to(MT)
        dq += tl.dot(dA, k.to(DT).to(MT), input_precision=PREC)
        dk = dk_state + tl.dot(tl.trans(dA), q.to(DT).to(MT), input_precision=PREC)
        at_end = tl.sum(s_ds, 0) * tl.exp(b_last) + tl.sum(tl.sum(k * dk_state, 1), 0)
        db = tl.sum(q * dq - k * dk, 1) + tl.where(rows == BC - 1, at_end, 0.0)
        part = tl.program_id(0).to(tl.int64) * TT * H  # one partial dg per key tile, summed after
        tl.store(dg_ptr + part + t * H + hh, tl.cumsum(db, 0, reverse=True), mask=ok)
    off = (t[:, None] * H + hh).to(tl.int64) * K + kk[None, :]
    mask = ok[:, None] & (kk[None, :] < K)
    tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=mask)


TUNE_KEY = ["K", "V"]
state_pass = tuned(_state_pass, TUNE_KEY)
la_output = tuned(_la_output, TUNE_KEY)
la_dv = tuned(_la_dv, TUNE_KEY)
la_dqk = tuned(_la_dqk, TUNE_KEY)
gla_scores = tuned(_gla_scores, ["K"])
gla_dA = tuned(_gla_dA, ["V"])
gla_dqk_intra = tuned(_gla_dqk_intra, ["K"])


def _layout(q, v, cu_seqlens, C) -> dict:
    """Offsets, chunk table, sizes and tiles of one call."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bounds, offsets, _ = sequence_offsets(B, T, cu_seqlens, C, q.device)
    return dict(bounds=bounds, offsets=offsets, chunks=chunk_table(bounds, offsets, C), N=
                bounds.numel() - 1, H=H, K=K, V=V, BK=tile(K), BV=tile(V))  # fmt: skip


def _state_buffers(L: dict, q):
    """(the last state fp32 [N, H, K, V], one state per chunk [M, H, K, V] in q's dtype)."""
    shape = (L["H"], L["K"], L["V"])
    last = q.new_empty(L["N"], *shape, dtype=torch.float32)
    return last, q.new_empty(L["chunks"].shape[0], *shape)


def _states(L, x, y, b, s0, s_end, hs, scale, C, per_key, reverse, prec):
    """One state pass (forward, or reversed for the gradients); s0 None: start from zeros."""
    grid = (triton.cdiv(L["K"], L["BK"]), triton.cdiv(L["V"], L["BV"]), L["N"] * L["H"])
    state_pass[grid](x, y, b, s_end if s0 is None else s0, s_end, hs, L["bounds"], L["offsets"],
                     scale, L["H"], L["K"], L["V"], BC=C, BK=L["BK"], BV=L["BV"],
                     PER_KEY=per_key, REVERSE=reverse, HAS_S0=s0 is not None,
                     **prec)  # fmt: skip


def _cumsum(L, g, C, per_key):
    b = torch.empty_like(g, dtype=torch.float32)
    M = L["chunks"].shape[0]
    grid = (M, L["H"], triton.cdiv(L["K"], L["BK"]) if per_key else 1)
    _chunk_cumsum[grid](g, b, L["chunks"], L["H"], L["K"], BC=C, BK=L["BK"], PER_KEY=per_key)
    return b


class LinearAttentionTriton(torch.autograd.Function):
    """(q, k, v, g, h0) -> (o, ht) for `[B, T, H, *]` inputs; g per key or per head."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, C):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        h0 = None if h0 is None else h0.contiguous()
        L = _layout(q, v, cu_seqlens, C)
        ht, hs = _state_buffers(L, q)
        per_key, prec = g.dim() == 4, dot_args(q.dtype)
        H, K, V, M = L["H"], L["K"], L["V"], L["chunks"].shape[0]
        b = _cumsum(L, g, C, per_key)
        _states(L, k, v, b, h0, ht, hs, 1.0, C, per_key, 0, prec)
        A = b.new_empty(1)
        if per_key:
            A = q.new_empty(*q.shape[:3], C, dtype=torch.float32)
            gla_scores[(C // 16, M, H)](q, k, b, A, L["chunks"], H, K, BC=C, BS=16, BK=L["BK"],
                                        **prec)  # fmt: skip
        o = torch.empty_like(v)
        la_output[(triton.cdiv(V, L["BV"]), M, H)](q, k, v, b, A, hs, o, L["chunks"], scale, H,
                                                   K, V, BC=C, BK=L["BK"], BV=L["BV"],
                                                   PER_KEY=per_key, **prec)  # fmt: skip
        ctx.save_for_backward(q, k, v, b, h0, A)
        ctx.L, ctx.scale, ctx.C, ctx.g_dtype = L, scale, C, g.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, b, h0, A = ctx.saved_tensors
        L, scale, C = ctx.L, ctx.scale, ctx.C
        per_key, prec, do = b.dim() == 4, dot_args(q.dtype), do.contiguous()
        H, K, V, M = L["H"], L["K"], L["V"], L["chunks"].shape[0]
        ht, hs = _state_buffers(L, q)
        _states(L, k, v, b, h0, ht, hs, 1.0, C, per_key, 0, prec)  # hs again, not kept
        dh0, dht = state_grads(q, L["N"], (H, K, V), dht)
        dhs = torch.empty_like(hs)
        _states(L, q, do, b, dht, dh0, dhs, scale, C, per_key, 1, prec)
        dv = torch.empty_like(v)
        la_dv[(triton.cdiv(V, L["BV"]), M, H)](q, k, b, A, do, dhs, dv, L["chunks"], scale, H, K,
                                               V, BC=C, BK=L["BK"], BV=L["BV"], PER_KEY=per_key,
                                               STATE=True, **prec)  # fmt: skip
        NK = triton.cdiv(K, L["BK"])
        dqi = dki = A
        if per_key:
            dA = torch.empty_like(A)
            gla_dA[(1, M, H)](do, v, dA, L["chunks"], scale, H, V, BC=C, BV=L["BV"], **prec)
            dqi, dki = torch.empty_like(b), torch.empty_like(b)
            gla_dqk_intra[(NK * (C // 16), M, H)](q, k, b, dA, dqi, dki, L["chunks"], H, K, BC=C,
                                                  BS=16, BK=L["BK"], **prec)  # fmt: skip
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dg = b.new_empty(b.shape if per_key else (NK, *b.shape))
        la_dqk[(NK, M, H)](q, k, v, b, do, hs, dhs, dqi, dki, dq, dk, dg, L["chunks"],
                           scale, b.shape[0] * b.shape[1], H, K, V, BC=C, BK=L["BK"],
                           BV=L["BV"], PER_KEY=per_key, **prec)  # fmt: skip
        dg = dg if per_key else dg.sum(0)
        dh0 = None if h0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, dg.to(ctx.g_dtype), dh0, None, None, None


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


def sm90_launches(shape):
    """Every launch of `linear_attention_triton` at `shape` (a `rnnscale.kernels.sm90.HeadShape`
    of family gla or simple_gla; B x T tokens as rows), each with every configuration the
    autotuner may pick (`tune_configs`): the state pass both ways, with and without a starting
    state, the output, the gradients and, for gla, the sub-chunk kernels."""
    from rnnscale.kernels.sm90 import B, Launch, T

    if shape.family not in ("gla", "simple_gla"):
        return []
    per_key, H, K, V, C, x = shape.family == "gla", shape.H, shape.K, shape.V, shape.C, shape.dtype
    BK, BV, M, NK = tile(K), tile(V), B * T // C, triton.cdiv(K, tile(K))
    NV = triton.cdiv(V, BV)
    f32, ints = "*fp32", {"H": "i32", "K": "i32", "V": "i32", "TT": "i32", "scale": "fp32"}
    ptrs = {
        p: f"*{x}"
        for p in (
            "q_ptr",
            "k_ptr",
            "v_ptr",
            "o_ptr",
            "do_ptr",
            "x_ptr",
            "y_ptr",
            "hs_ptr",
            "dhs_ptr",
            "dq_ptr",
            "dk_ptr",
            "dv_ptr",
            "g_ptr",
        )
    }
    ptrs.update(dict.fromkeys(("b_ptr", "A_ptr", "dA_ptr", "dqi_ptr", "dki_ptr", "dg_ptr",
                               "s0_ptr", "s_end_ptr"), f32))  # fmt: skip
    ptrs.update(dict.fromkeys(("bounds_ptr", "offs_ptr", "chunks_ptr"), "*i32"))
    sig = {**ptrs, **ints}
    dots = {"PREC": "tf32", "MT": {"bf16": tl.bfloat16, "fp16": tl.float16}.get(x, tl.float32)}
    tiles = {"BC": C, "BK": BK, "BV": BV, "PER_KEY": per_key, **dots}
    plan = [(_state_pass, {**tiles, "REVERSE": r, "HAS_S0": s}, NK * NV * B * H)
            for r in (0, 1) for s in (False, True)]  # fmt: skip
    plan += [(_la_output, tiles, NV * M * H), (_la_dv, {**tiles, "STATE": True}, NV * M * H),
             (_la_dqk, tiles, NK * M * H)]  # fmt: skip
    if per_key:
        sub = {"BC": C, "BS": 16, "BK": BK, **dots}
        plan += [(_gla_scores, sub, C // 16 * M * H), (_gla_dqk_intra, sub, NK * C // 16 * M * H),
                 (_gla_dA, {"BC": C, "BV": BV, **dots}, M * H)]  # fmt: skip
    ints = {"H": H, "K": K, "V": V, "TT": B * T}
    out = [Launch(fn, sig, meta, num_warps=c.num_warps, num_stages=c.num_stages, programs=n,
                  ints=ints) for fn, meta, n in plan for c in tune_configs()]  # fmt: skip
    cumsum = {"BC": C, "BK": BK, "PER_KEY": per_key}
    n = M * H * (NK if per_key else 1)
    return out + [Launch(_chunk_cumsum, sig, cumsum, programs=n, ints=ints)]
