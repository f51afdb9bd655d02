"""Elementwise linear scan on Triton: forward and backward with `tl.associative_scan`.

Legend: N sequences, D channels, C chunk size, M chunks in all, BD channels per program.
One program per (sequence, block of BD channels) walks the sequence's chunks. The pairs
(a, b) compose as (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2), an associative operator, so
within a chunk one parallel scan gives every step from a zero state (README.md steps 1-3):
  1. (P_r, hloc_r) = scan of (a, b) over the chunk; padding is (1, 0), which keeps h
  3. h_r = hloc_r + P_r h_in
  2. the last row is the h entering the next chunk
and the forward stores h_in per chunk (M x D fp32) for the backward, which walks the chunks in
reverse with dz, the gradient reaching the state that leaves the chunk:
  4. dh_t = a_{t+1} dh_{t+1} + dy_t, a reverse scan of (a_{t+1}, dy_t) started from dz
     (a_{t+1} = 1 past the end, where dz is the final state's gradient)
  5. h_{t-1} by a forward scan of the pairs shifted one step (identity on the first row)
  6. db_t = dh_t, da_t = dh_t h_{t-1}; dz for the previous chunk is dh of the first row,
     and the initial state's gradient is a_1 dh_1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnnscale.kernels.common.backend import check_triton, state_buffers, state_grads
from rnnscale.kernels.common.checks import (
    check_chunk_size,
    check_sequences,
    check_shape,
    check_state,
)


@triton.jit
def _compose(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _load(ptr, t, ok, D, dd, fill):
    return tl.load(ptr + t[:, None] * D + dd[None, :], mask=ok[:, None] & (dd < D)[None, :],
                   other=fill).to(tl.float32)  # fmt: skip


@triton.jit
def _scan_fwd(a_ptr, b_ptr, y_ptr, h0_ptr, ht_ptr, hs_ptr, bounds_ptr, offs_ptr, D,
              BC: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr):  # fmt: skip
    n = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    bos = tl.load(bounds_ptr + n)
    eos = tl.load(bounds_ptr + n + 1)
    first_chunk = tl.load(offs_ptr + n)
    rows = tl.arange(0, BC)
    if HAS_H0:
        h_in = tl.load(h0_ptr + n * D + dd, mask=dd < D, other=0.0).to(tl.float32)
    else:
        h_in = tl.zeros([BD], dtype=tl.float32)
    for c in range(0, tl.cdiv(eos - bos, BC)):
        tl.store(hs_ptr + (first_chunk + c) * D + dd, h_in, mask=dd < D)
        t = bos + c * BC + rows
        ok = t < eos
        a = _load(a_ptr, t, ok, D, dd, 1.0)
        b = _load(b_ptr, t, ok, D, dd, 0.0)
        prod, h_loc = tl.associative_scan((a, b), 0, _compose)  # 1.
        h = h_loc + prod * h_in[None, :]  # 3.
        tl.store(y_ptr + t[:, None] * D + dd[None, :], h.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & (dd < D)[None, :])  # fmt: skip
        h_in = tl.sum(tl.where(rows[:, None] == BC - 1, h, 0.0), 0)  # 2.
    tl.store(ht_ptr + n * D + dd, h_in, mask=dd < D)


@triton.jit
def _scan_bwd(a_ptr, b_ptr, dy_ptr, dht_ptr, hs_ptr, bounds_ptr, offs_ptr, da_ptr, db_ptr,
              dh0_ptr, D, BC: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    n = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    bos = tl.load(bounds_ptr + n)
    eos = tl.load(bounds_ptr + n + 1)
    first_chunk = tl.load(offs_ptr + n)
    rows = tl.arange(0, BC)
    dz = tl.load(dht_ptr + n * D + dd, mask=dd < D, other=0.0)
    n_chunks = tl.cdiv(eos - bos, BC)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        h_in = tl.load(hs_ptr + (first_chunk + c) * D + dd, mask=dd < D, other=0.0)
        t = bos + c * BC + rows
        ok = t < eos
        # 4. dh by a reverse scan
        a_next = _load(a_ptr, t + 1, t + 1 < eos, D, dd, 1.0)
        dy = _load(dy_ptr, t, ok, D, dd, 0.0)
        prod, dh_loc = tl.associative_scan((a_next, dy), 0, _compose, reverse=True)
        dh = dh_loc + prod * dz[None, :]
        # 5. h_{t-1}: the forward scan of the pairs one step back
        back = (rows >= 1) & (t - 1 < eos)
        a_prev = _load(a_ptr, t - 1, back, D, dd, 1.0)
        b_prev = _load(b_ptr, t - 1, back, D, dd, 0.0)
        prod, h_loc = tl.associative_scan((a_prev, b_prev), 0, _compose)
        h_prev = h_loc + prod * h_in[None, :]
        # 6. gradients
        mask = ok[:, None] & (dd < D)[None, :]
        off = t[:, None] * D + dd[None, :]
        tl.store(db_ptr + off, dh.to(db_ptr.dtype.element_ty), mask=mask)
        tl.store(da_ptr + off, (dh * h_prev).to(da_ptr.dtype.element_ty), mask=mask)
        dz = tl.sum(tl.where(rows[:, None] == 0, dh, 0.0), 0)
    a_first = tl.load(a_ptr + bos * D + dd, mask=(dd < D) & (bos < eos), other=1.0)
    tl.store(dh0_ptr + n * D + dd, a_first.to(tl.float32) * dz, mask=dd < D)


class LinearScanTriton(torch.autograd.Function):
    """(a, b, h0) -> (h, ht) for `[B, T, D]` inputs."""

    @staticmethod
    def forward(ctx, a, b, h0, cu_seqlens, chunk_size):
        B, T, D = b.shape
        bounds, offsets, ht, hs, h0_in = state_buffers(b, B, T, cu_seqlens, chunk_size, (D,), h0)
        N = bounds.numel() - 1
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(b)
        BD = min(64, max(16, triton.next_power_of_2(D)))
        grid = (N, triton.cdiv(D, BD))
        _scan_fwd[grid](a, b, y, h0_in, ht, hs, bounds, offsets, D, BC=chunk_size, BD=BD,
                        HAS_H0=h0 is not None)  # fmt: skip
        ctx.save_for_backward(a, b, hs, bounds, offsets)
        ctx.meta, ctx.grid, ctx.h0_dtype = {"BC": chunk_size, "BD": BD}, grid, None
        if h0 is not None:
            ctx.h0_dtype = h0.dtype
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        a, b, hs, bounds, offsets = ctx.saved_tensors
        N, D = bounds.numel() - 1, b.shape[-1]
        da, db = torch.empty_like(a), torch.empty_like(b)
        dh0, dht = state_grads(b, N, (D,), dht)
        _scan_bwd[ctx.grid](a, b, dy.contiguous(), dht, hs, bounds, offsets, da, db,
                            dh0, D, **ctx.meta)  # fmt: skip
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        return da, db, dh0, None, None


def linear_scan_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rnnscale.kernels.scan.linear_scan` on Triton; the same arguments and results (the
    final state in fp32)."""
    check_shape("b", b, (None, None, None), "[B, T, D]")
    B, T, D = b.shape
    check_shape("a", a, (B, T, D), "[B, T, D]")
    N = check_sequences(B, T, cu_seqlens)
    check_state(initial_state, (N, D), "[N, D]")
    check_chunk_size(chunk_size)
    check_triton(chunk_size, {"a": a, "b": b})
    h, final = LinearScanTriton.apply(a, b, initial_state, cu_seqlens, chunk_size)
    return h, (final if output_final_state else None)


def sm90_launches(shape):
    """The launches of `linear_scan_triton` at `shape` (a `rnnscale.kernels.sm90.HeadShape`,
    B x T tokens as rows): the forward with and without an initial state, and the backward.
    a, b, y, da, db and a given h0 are in the shape's dtype; the states are fp32."""
    from rnnscale.kernels.sm90 import B, Launch

    if shape.family != "scan":
        return []
    D, x = shape.D, f"*{shape.dtype}"
    BD = min(64, max(16, triton.next_power_of_2(D)))  # as LinearScanTriton.forward
    meta = {"BC": shape.C, "BD": BD}
    programs = B * triton.cdiv(D, BD)
    rest = {"ht_ptr": "*fp32", "hs_ptr": "*fp32", "bounds_ptr": "*i32", "offs_ptr": "*i32",
            "D": "i32"}  # fmt: skip
    fwd = [Launch(_scan_fwd, {"a_ptr": x, "b_ptr": x, "y_ptr": x, "h0_ptr": h0, **rest},
                  {**meta, "HAS_H0": has_h0}, programs=programs)
           for has_h0, h0 in ((False, "*fp32"), (True, x))]  # fmt: skip
    for launch in fwd:
        launch.ints = {"D": D}
    bwd = {"a_ptr": x, "b_ptr": x, "dy_ptr": x, "dht_ptr": "*fp32", "da_ptr": x, "db_ptr": x,
           "dh0_ptr": "*fp32", **rest}  # fmt: skip
    backward = Launch(_scan_bwd, bwd, meta, programs=programs, ints={"D": D})
    return [*fwd, backward]
