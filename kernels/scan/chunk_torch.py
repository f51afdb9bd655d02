"""Chunkwise elementwise linear scan in plain PyTorch (docs/scans.md section 4).

Legend: B batch, T time, D channels, N sequences, C chunk size, M chunks.
  1. in every chunk at once, C steps from a zero state: the local result hloc_r and the
     cumulative product P_r = a_1 ... a_r
  2. the scan over chunks: h_in of the next chunk = hloc_C + P_C * h_in
  3. h_r = hloc_r + P_r * h_in
C + (chunks per sequence) sequential steps instead of T. Products are taken step by step, never
divided, so a gate of 0 (a reset) is exact. Computes in fp32 or wider.
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

    # 1. in-chunk scan from zero, all chunks at once
    hloc, prod = [], []
    h, P = torch.zeros_like(bc[:, 0]), torch.ones_like(ac[:, 0])  # (M, D)
    for r in range(chunk_size):
        h, P = ac[:, r] * h + bc[:, r], P * ac[:, r]
        hloc.append(h)
        prod.append(P)
    hloc, prod = torch.stack(hloc, 1), torch.stack(prod, 1)  # (M, C, D)

    # 2. scan over chunks
    h0 = b.new_zeros(N, D, dtype=acc) if initial_state is None else initial_state.to(acc)
    h_in, final = scan_chunks(
        layout, h0, lambda h, hl, p: (hl + p * h, h), (hloc[:, -1], prod[:, -1])
    )

    # 3. outputs
    out = from_chunks(hloc + prod * h_in[:, None], layout)  # (B, T, D)
    return out.to(b.dtype), (final if output_final_state else None)
