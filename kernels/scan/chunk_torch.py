"""Chunkwise elementwise linear scan in plain PyTorch (docs/scans.md section 4).

Legend: B batch, T time, D channels, N sequences, C chunk size, M chunks.
  1. in every chunk at once, C steps from a zero state: the local result hloc_r and the
     cumulative product P_r = a_1 ... a_r
  2. the scan over chunks: h_in of the next chunk = hloc_C + P_C * h_in
  3. h_r = hloc_r + P_r * h_in
C + (chunks per sequence) sequential steps instead of T. Products are taken step by step, never
divided, so a gate of 0 (a reset) is exact. Computes in fp32 or wider.

`ChunkScan` saves a, b and the entering h_in [M, D] only. Its backward is the same scan run in
reverse on the output gradient, with a shifted by one step: dh_r = dout_r + a_{r+1} dh_{r+1};
then db = dh and da_r = dh_r h_{r-1}, h recomputed from steps 1 and 3.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.checks import (
    check_chunk_size,
    check_sequences,
    check_shape,
    check_state,
)
from rnnscale.kernels.common.chunks import chunk_layout, from_chunks, scan_chunks, to_chunks


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elementwise linear recurrence `h_t = a_t * h_{t-1} + b_t`; the output is h.

    Args:
        a: `[B, T, D]` decay (usually in [0, 1]). b: `[B, T, D]` input.
        initial_state: `[N, D]` h before the first step of each sequence.
        output_final_state: also return h after the last step, `[N, D]` (fp32 or wider).
        cu_seqlens: int `[N + 1]` offsets of packed documents in a `B = 1` batch.
        chunk_size: C.
    Returns:
        `(h [B, T, D] in the dtype of b, final_state or None)`.
    """
    check_shape("b", b, (None, None, None), "[B, T, D]")
    B, T, D = b.shape
    check_shape("a", a, (B, T, D), "[B, T, D]")
    N = check_sequences(B, T, cu_seqlens)
    check_state(initial_state, (N, D), "[N, D]")
    check_chunk_size(chunk_size)
    acc = torch.promote_types(b.dtype, torch.float32)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, b.device)
    ac = to_chunks(a, layout, acc, fill=1.0)  # (M, C, D): padding keeps h (a = 1, b = 0)
    bc = to_chunks(b, layout, acc)  # (M, C, D)
    h0 = b.new_zeros(N, D, dtype=acc) if initial_state is None else initial_state.to(acc)
    out, final = ChunkScan.apply(ac, bc, h0, layout)
    out = from_chunks(out, layout)  # (B, T, D)
    return out.to(b.dtype), (final if output_final_state else None)


def _local_scan(ac, bc):
    """Step 1: `(hloc, P)`, both (M, C, D), C steps from a zero state in every chunk at once."""
    hloc, prod = torch.empty_like(bc), torch.empty_like(ac)
    h, P = torch.zeros_like(bc[:, 0]), torch.ones_like(ac[:, 0])  # (M, D)
    for r in range(ac.shape[1]):
        h, P = ac[:, r] * h + bc[:, r], P * ac[:, r]
        hloc[:, r], prod[:, r] = h, P
    return hloc, prod


def _step(h, hl, p):
    return hl + p * h, h


class ChunkScan(torch.autograd.Function):
    """`(h [M, C, D], final [N, D])` from chunked `a, b [M, C, D]` and `h0 [N, D]`."""

    @staticmethod
    def forward(ctx, ac, bc, h0, layout):
        hloc, prod = _local_scan(ac, bc)
        h_in, final = scan_chunks(layout, h0, _step, (hloc[:, -1], prod[:, -1]))  # 2: (M, D)
        ctx.save_for_backward(ac, bc, h_in)
        ctx.layout = layout
        return hloc + prod * h_in[:, None], final  # 3

    @staticmethod
    def backward(ctx, dh, dfinal):
        ac, bc, h_in = ctx.saved_tensors
        # in-chunk reverse scan from zero: dloc_r = dh_r + a_{r+1} dloc_{r+1}, and the product
        # of the gates after r, Q_r = a_{r+1} ... a_C
        dloc, after = torch.empty_like(dh), torch.empty_like(ac)  # (M, C, D)
        d, Q = torch.zeros_like(dh[:, 0]), torch.ones_like(ac[:, 0])  # (M, D)
        for r in range(ac.shape[1] - 1, -1, -1):
            d = dh[:, r] + d
            dloc[:, r], after[:, r] = d, Q
            d, Q = d * ac[:, r], Q * ac[:, r]
        # the gradient of the h leaving each chunk, from the later chunks and the final state
        dh_out, dh0 = scan_chunks(ctx.layout, dfinal, _step, (d, Q), reverse=True)  # (M, D)
        db = after.mul_(dh_out[:, None]).add_(dloc)  # (M, C, D); in place: peak memory
        del dloc
        hloc, prod = _local_scan(ac, bc)
        h = hloc.addcmul_(prod, h_in[:, None])
        del prod
        h_prev = torch.cat([h_in[:, None], h[:, :-1]], dim=1)  # (M, C, D)
        del h, hloc
        return h_prev.mul_(db), db, dh0, None
