"""The step-loop definition of the gated delta rule: the reference.

Legend: B batch, T time, H heads, K key width, V value width. Computes in the dtype of q.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.naive import naive_linear_attention
from rnnscale.kernels.delta.recurrent import gated_delta_rule_step


def naive_recurrent_gated_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rnnscale.kernels.delta.chunk_gated_delta_rule`, one token at a time."""
    return naive_linear_attention(
        gated_delta_rule_step,
        q,
        k,
        v,
        [g, beta],
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
    )
