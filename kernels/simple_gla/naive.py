"""The step-loop definition of scalar-decay linear attention: the reference.

Legend: B batch, T time, H heads, K key width, V value width. Computes in the dtype of q.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.naive import naive_linear_attention
from rnnscale.kernels.simple_gla.recurrent import simple_gla_step


def naive_recurrent_simple_gla(
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
    """`rnnscale.kernels.simple_gla.chunk_simple_gla`, one token at a time."""
    return naive_linear_attention(
        simple_gla_step, q, k, v, [g], scale, initial_state, output_final_state, cu_seqlens
    )
