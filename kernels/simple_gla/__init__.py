"""Scalar-decay linear attention (one decay per head): RetNet, Mamba2/SSD, lightning attention."""

from __future__ import annotations

import torch

from rnnscale.kernels.common.backend import dispatch, resolve_backend
from rnnscale.kernels.common.checks import repeat_groups
from rnnscale.kernels.simple_gla import chunk_torch
from rnnscale.kernels.simple_gla.naive import naive_recurrent_simple_gla
from rnnscale.kernels.simple_gla.recurrent import simple_gla_step

__all__ = ["chunk_simple_gla", "naive_recurrent_simple_gla", "simple_gla_step"]


def chunk_simple_gla(
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
    """Scalar-decay linear attention, chunkwise; arguments and results as in
    `chunk_torch.chunk_simple_gla`, `backend` as in `rnnscale.kernels.gla.chunk_gla`.
    chunk_size: None for the path's default (64 on both). Grouped q and k (fewer heads than v)
    are scored once per group on the PyTorch path; the Triton path gets them repeated to every
    head (its kernels take one q and k per head)."""
    if q.shape[2:3] != v.shape[2:3] and resolve_backend(backend, q) != "torch":
        q, k = repeat_groups(q, v), repeat_groups(k, v)
    return dispatch(
        backend, q, chunk_torch.chunk_simple_gla,
        "rnnscale.kernels.simple_gla.chunk_triton:chunk_simple_gla_triton",
        q, k, v, g, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )  # fmt: skip
