"""Gated linear attention (per-key decay): `S_t = diag(exp g_t) S_{t-1} + k_t v_t^T`."""

from __future__ import annotations

import torch

from rnnscale.kernels.common.backend import dispatch
from rnnscale.kernels.gla import chunk_torch
from rnnscale.kernels.gla.naive import naive_recurrent_gla
from rnnscale.kernels.gla.recurrent import gla_step

__all__ = ["chunk_gla", "gla_step", "naive_recurrent_gla"]


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, chunkwise; arguments and results as in `chunk_torch.chunk_gla`.

    backend: "torch" (any device and dtype), "triton" (CUDA, or CPU under TRITON_INTERPRET=1;
        fp32/bf16/fp16), or "auto" (Triton on CUDA tensors, PyTorch otherwise).
    chunk_size: None for the path's default (32 for PyTorch, 64 for Triton).
    """
    return dispatch(
        backend, q, chunk_torch.chunk_gla, "rnnscale.kernels.gla.chunk_triton:chunk_gla_triton",
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )  # fmt: skip
