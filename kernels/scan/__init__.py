"""Elementwise linear scan `h_t = a_t * h_{t-1} + b_t`: minGRU, minLSTM, HGRN, RG-LRU, LRU."""

from __future__ import annotations

import torch

from rnnscale.kernels.common.backend import dispatch
from rnnscale.kernels.scan import chunk_torch
from rnnscale.kernels.scan.naive import naive_linear_scan
from rnnscale.kernels.scan.recurrent import linear_scan_step

__all__ = ["linear_scan", "linear_scan_step", "naive_linear_scan"]


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elementwise linear recurrence; arguments and results as in `chunk_torch.linear_scan`,
    `backend` as in `rnnscale.kernels.gla.chunk_gla`. chunk_size: None for the path's default
    (32 on both)."""
    return dispatch(
        backend, b, chunk_torch.linear_scan,
        "rnnscale.kernels.scan.chunk_triton:linear_scan_triton",
        a, b, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )  # fmt: skip
