"""The step-loop definition of gated linear attention: the reference every fast path meets.

Legend: B batch, T time, H heads, K key width, V value width, N sequences.
Computes in the dtype of q (tests run it in float64).
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.naive import naive_linear_attention
from rnnscale.kernels.gla.recurrent import gla_step


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rnnscale.kernels.gla.chunk_gla`, one token at a time with `gla_step`."""
    return naive_linear_attention(
        gla_step, q, k, v, [g], scale, initial_state, output_final_state, cu_seqlens
    )
