"""Gated linear attention (per-key decay) on Triton: forward and backward kernels in
`kernels/common/linear_attention_triton.py` (shared with simple_gla), steps as in README.md."""

from __future__ import annotations

import torch

from rnnscale.kernels.common.linear_attention_triton import linear_attention_triton


def chunk_gla_triton(
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
    """`rnnscale.kernels.gla.chunk_gla` on Triton; the same arguments and results (the final
    state in fp32). Chunk-parallel; in-chunk scores in 16-row sub-chunks (README.md)."""
    return linear_attention_triton(
        q,
        k,
        v,
        g,
        per_key=True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
