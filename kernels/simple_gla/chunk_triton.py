"""Scalar-decay linear attention on Triton: forward and backward kernels in
`kernels/common/linear_attention_triton.py` (shared with gla, here with one gate per head so the
intra-chunk scores are a plain `tl.dot`), steps as in README.md."""

from __future__ import annotations

import torch

from rnnscale.kernels.common.linear_attention_triton import linear_attention_triton


def chunk_simple_gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rnnscale.kernels.simple_gla.chunk_simple_gla` on Triton; the same arguments and
    results (the final state in fp32)."""
    return linear_attention_triton(
        q,
        k,
        v,
        g,
        per_key=False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
