"""Gated delta rule: DeltaNet, Gated DeltaNet, negative eigenvalues, DeltaProduct."""

from __future__ import annotations

import torch

from rnnscale.kernels.common.backend import dispatch
from rnnscale.kernels.delta import chunk_torch
from rnnscale.kernels.delta.naive import naive_recurrent_gated_delta_rule
from rnnscale.kernels.delta.product import chunk_delta_product
from rnnscale.kernels.delta.recurrent import gated_delta_rule_step

__all__ = [
    "chunk_delta_product",
    "chunk_gated_delta_rule",
    "gated_delta_rule_step",
    "naive_recurrent_gated_delta_rule",
]


def chunk_gated_delta_rule(
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
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunkwise; arguments and results as in
    `chunk_torch.chunk_gated_delta_rule`, `backend` as in `rnnscale.kernels.gla.chunk_gla`.
    chunk_size: None for the path's default (64 on both)."""
    return dispatch(
        backend, q, chunk_torch.chunk_gated_delta_rule,
        "rnnscale.kernels.delta.chunk_triton:chunk_gated_delta_rule_triton",
        q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )  # fmt: skip
