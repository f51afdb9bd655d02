"""Gated delta rule on Triton, chunk-parallel: the WY / UT form of chunk_torch.py.

Legend as in `kernels/common/linear_attention_triton.py`; Tinv = (I + L)^-1, W and U as in
`wy_triton.py`, U' the new values. Only the two state passes (`state_triton.py`) walk the
chunks; every other kernel runs one program per (tile or nothing, chunk, head).

forward
  1. b = in-chunk cumsum(g)                                   _chunk_cumsum
  2. L and Tinv, blocked 16 x 16                               _delta_solve
  3. W = Tinv (beta exp(b) K), U = Tinv (beta V)               _delta_wu
  4. hs, U' = U - W S, the final state                         _delta_states
  5. o = scale ((q exp b) S + ((q k^T) * Gamma) U')            _la_output (simple_gla's, v = U')
backward (4 runs again: no chunk states are kept between the passes)
  6. dU' = scale A^T do from the scores                        _la_dv (no state term)
  7. dS' of every chunk, dU' += (k exp(b_C - b)) dS', dh0      _delta_state_grads
  8. dq, dk (scores and state), dW = -dU' S^T, dg's share      _la_dqk (v = U')
  9. dk, dv, dbeta and dg's share through W, U and Tinv        _delta_wy_bwd
"""

from __future__ import annotations

import torch
import triton

from rnnscale.kernels.common.backend import (
    check_triton,
    dot_args,
    state_grads,
    tile,
    tune_configs,
    tuned,
)
from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.linear_attention_triton import (
    _cumsum,
    _la_dqk,
    _la_dv,
    _la_output,
    _layout,
    _state_buffers,
    la_dqk,
    la_dv,
    la_output,
)
from rnnscale.kernels.delta.state_triton import _delta_state_grads, _delta_states
from rnnscale.kernels.delta.wy_triton import (
    _delta_dL,
    _delta_dw,
    _delta_solve,
    _delta_wu,
    _delta_wy_bwd,
)

MAX_K, MAX_CHUNK = 256, 64  # the state passes hold all of K; Tinv is merged from 4 blocks
delta_states = tuned(_delta_states, ["K", "V"])
delta_state_grads = tuned(_delta_state_grads, ["K", "V"])
delta_solve = tuned(_delta_solve, ["K"])
delta_wu = tuned(_delta_wu, ["K", "V"])
delta_wy_bwd = tuned(_delta_wy_bwd, ["K", "V"])
delta_dL = tuned(_delta_dL, ["K", "V"])
delta_dw = tuned(_delta_dw, ["K", "V"])


def _state_tiles(K: int, V: int) -> tuple[int, int, int]:
    """(the K tile, the number of K tiles a state pass holds, its V tile). The V tile is 16:
    at 32 the state passes spill registers on sm_90 at K = 192 (0.3-0.9 KB), at 16 they fit
    up to K = 256, with more programs in parallel."""
    return tile(K), triton.cdiv(K, tile(K)), 16


def _wy(L, k, v, b, beta, C, prec):
    """Steps 2-3: (Tinv fp32 [T, H, C], W, U)."""
    H, K, V, M = L["H"], L["K"], L["V"], L["chunks"].shape[0]
    Ti = k.new_zeros(*k.shape[:3], C, dtype=torch.float32)
    delta_solve[(1, M, H)](k, b, beta, Ti, L["chunks"], H, K, BC=C, BK=L["BK"])
    w, u = torch.empty_like(k), torch.empty_like(v)
    delta_wu[(1, M, H)](k, v, b, beta, Ti, w, u, L["chunks"], H, K, V, BC=C, BK=L["BK"],
                        BV=L["BV"], **prec)  # fmt: skip
    return Ti, w, u


def _states(L, k, w, u, b, h0, C, prec):
    """Step 4: (final state, hs, U')."""
    ht, hs = _state_buffers(L, k)
    vn = torch.empty_like(u)
    BK, KT, BVS = _state_tiles(L["K"], L["V"])
    grid = (triton.cdiv(L["V"], BVS), 1, L["N"] * L["H"])
    delta_states[grid](k, w, u, b, ht if h0 is None else h0, ht, hs, vn, L["bounds"],
                       L["offsets"], L["H"], L["K"], L["V"], BC=C, BK=BK, BV=BVS, KT=KT,
                       HAS_S0=h0 is not None, **prec)  # fmt: skip
    return ht, hs, vn


class GatedDeltaRuleTriton(torch.autograd.Function):
    """(q, k, v, g, beta, h0) -> (o, ht) for `[B, T, H, *]` inputs."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, cu_seqlens, C):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        h0 = None if h0 is None else h0.contiguous()
        L, prec = _layout(q, v, cu_seqlens, C), dot_args(q.dtype)
        H, K, V, M = L["H"], L["K"], L["V"], L["chunks"].shape[0]
        b = _cumsum(L, g, C, False)
        Ti, w, u = _wy(L, k, v, b, beta, C, prec)
        ht, hs, vn = _states(L, k, w, u, b, h0, C, prec)
        o = torch.empty_like(v)
        la_output[(triton.cdiv(V, L["BV"]), M, H)](q, k, vn, b, b, hs, o, L["chunks"], scale, H,
                                                   K, V, BC=C, BK=L["BK"], BV=L["BV"],
                                                   PER_KEY=False, **prec)  # fmt: skip
        ctx.save_for_backward(q, k, v, b, beta, h0, Ti, w, u)
        ctx.L, ctx.scale, ctx.C, ctx.dtypes = L, scale, C, (g.dtype, beta.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, b, beta, h0, Ti, w, u = ctx.saved_tensors
        L, scale, C, prec, do = ctx.L, ctx.scale, ctx.C, dot_args(q.dtype), do.contiguous()
        H, K, V, M, chunks = L["H"], L["K"], L["V"], L["chunks"].shape[0], L["chunks"]
        BK, BV, NK = L["BK"], L["BV"], triton.cdiv(L["K"], L["BK"])
        _, hs, vn = _states(L, k, w, u, b, h0, C, prec)
        du = v.new_empty(v.shape, dtype=torch.float32)  # dU': the scores' share, then all
        la_dv[(triton.cdiv(V, BV), M, H)](q, k, b, b, do, hs, du, chunks, scale, H, K, V, BC=C,
                                          BK=BK, BV=BV, PER_KEY=False, STATE=False,
                                          **prec)  # fmt: skip
        dh0, dht = state_grads(q, L["N"], (H, K, V), dht)
        dhs = torch.empty_like(hs)
        _, KT, BVS = _state_tiles(K, V)
        du_local, du = du, torch.empty_like(du)
        delta_state_grads[(triton.cdiv(V, BVS), 1, L["N"] * H)](
            q, k, w, b, do, du_local, du, dht, dh0, dhs, L["bounds"], L["offsets"], scale, H, K,
            V, BC=C, BK=BK, BV=BVS, KT=KT, **prec)  # fmt: skip
        dq, dk = torch.empty_like(q), torch.empty_like(k, dtype=torch.float32)
        dg, dw = b.new_empty(NK, *b.shape), torch.empty_like(dk)
        la_dqk[(NK, M, H)](q, k, vn, b, do, hs, dhs, dw, dw, dq, dk, dg, chunks, scale,
                           b.shape[0] * b.shape[1], H, K, V, BC=C, BK=BK, BV=BV,
                           PER_KEY=False, **prec)  # fmt: skip
        delta_dw[(NK, M, H)](du, hs, dw, chunks, H, K, V, BC=C, BK=BK, BV=BV, **prec)
        dk_wy, dv, dKK = torch.empty_like(dk), torch.empty_like(v), torch.empty_like(Ti)
        dbeta_L, db_L = torch.empty_like(b), torch.empty_like(b)
        dbeta, dg_wy = torch.empty_like(b), torch.empty_like(b)
        wy = dict(BC=C, BK=BK, BV=BV, PREC=prec["PREC"])
        delta_dL[(1, M, H)](k, v, b, beta, Ti, dw, du, dKK, dbeta_L, db_L, chunks, H, K, V, **wy)
        delta_wy_bwd[(1, M, H)](k, v, b, beta, Ti, dw, du, dKK, dbeta_L, db_L, dk_wy, dv, dbeta,
                                dg_wy, chunks, H, K, V, **wy)  # fmt: skip
        dh0 = None if h0 is None else dh0.to(h0.dtype)
        dk, dg = (dk + dk_wy).to(k.dtype), (dg.sum(0) + dg_wy).to(ctx.dtypes[0])
        return dq, dk, dv, dg, dbeta.to(ctx.dtypes[1]), dh0, None, None, None


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
    results (the final state in fp32). Head sizes K <= 256, chunks of 16, 32 or 64."""
    gates = {"g": (g, False), "beta": (beta, False)}
    _, _, _, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size)
    check_triton(chunk_size, {"q": q, "k": k, "v": v})
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size must be 16, 32 or 64 for the delta rule's backend="
                         f"'triton', got {chunk_size}")  # fmt: skip
    if K > MAX_K:
        raise ValueError(f"q and k have head size {K}; the delta rule's backend='triton' takes "
                         f"at most {MAX_K} (use more heads, or backend='torch')")  # fmt: skip
    scale = K**-0.5 if scale is None else scale
    o, final = GatedDeltaRuleTriton.apply(
        q, k, v, g, beta, initial_state, scale, cu_seqlens, chunk_size
    )
    return o, (final if output_final_state else None)


def sm90_launches(shape):
    """Every launch of `chunk_gated_delta_rule_triton` at `shape` (family delta; B x T tokens
    as rows) with every configuration the autotuner may pick: the delta rule's own kernels, and
    the shared linear-attention kernels as the delta rule launches them (v = U', no state term
    in dv, dW from dq/dk's pass)."""
    import triton.language as tl

    from rnnscale.kernels.sm90 import B, Launch, T

    if shape.family != "delta":
        return []
    H, K, V, C, x = shape.H, shape.K, shape.V, shape.C, shape.dtype
    BK, BV = tile(K), tile(V)
    _, KT, BVS = _state_tiles(K, V)
    M, NK, NV = B * T // C, triton.cdiv(K, BK), triton.cdiv(V, BV)
    ins = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "w_ptr", "u_ptr", "hs_ptr", "dhs_ptr",
           "vn_ptr", "dq_ptr", "dv_ptr", "g_ptr", "beta_ptr")  # fmt: skip
    f32 = ("b_ptr", "A_ptr", "Ti_ptr", "dw_ptr", "du_ptr", "dk_ptr", "dbeta_ptr", "dg_ptr",
           "dqi_ptr", "dki_ptr", "s0_ptr", "s_end_ptr", "dKK_ptr", "db_ptr", "dbl_ptr",
           "dbL_ptr", "dul_ptr")  # fmt: skip
    sig = {**dict.fromkeys(ins, f"*{x}"), **dict.fromkeys(f32, "*fp32"),
           **dict.fromkeys(("bounds_ptr", "offs_ptr", "chunks_ptr"), "*i32"),
           **dict.fromkeys(("H", "K", "V", "TT"), "i32"), "scale": "fp32"}  # fmt: skip
    dots = {"PREC": "tf32", "MT": {"bf16": tl.bfloat16, "fp16": tl.float16}.get(x, tl.float32)}
    tiles = {"BC": C, "BK": BK, "BV": BV, **dots}
    state = {"BC": C, "BK": BK, "BV": BVS, "KT": KT, **dots}
    wy = {"BC": C, "BK": BK, "BV": BV, "PREC": "tf32"}
    plan = [(_delta_solve, {"BC": C, "BK": BK}, M * H), (_delta_wu, tiles, M * H),
            (_delta_dL, wy, M * H), (_delta_wy_bwd, wy, M * H), (_delta_dw, tiles, NK * M * H),
            (_delta_states, {**state, "HAS_S0": False}, triton.cdiv(V, BVS) * B * H),
            (_delta_states, {**state, "HAS_S0": True}, triton.cdiv(V, BVS) * B * H),
            (_delta_state_grads, state, triton.cdiv(V, BVS) * B * H),
            (_la_output, {**tiles, "PER_KEY": False}, NV * M * H),
            (_la_dv, {**tiles, "PER_KEY": False, "STATE": False}, NV * M * H),
            (_la_dqk, {**tiles, "PER_KEY": False}, NK * M * H)]  # fmt: skip
    ints = {"H": H, "K": K, "V": V, "TT": B * T}
    return [Launch(fn, sig, meta, num_warps=c.num_warps, num_stages=c.num_stages, programs=n,
                   ints=ints) for fn, meta, n in plan for c in tune_configs()]  # fmt: skip
