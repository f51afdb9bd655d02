"""The step-loop definition of the elementwise linear scan: the reference.

Legend: B batch, T time, D channels, N sequences. Computes in the dtype of b.
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.naive import step_loop
from rnnscale.kernels.scan.recurrent import linear_scan_step


def naive_linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rnnscale.kernels.scan.linear_scan`, one step at a time."""
    B, T, D = b.shape
    step = lambda x, h: linear_scan_step(x[0], x[1], h)  # noqa: E731
    return step_loop(
        step,
        [a.to(b.dtype), b],
        b.new_zeros(D),
        initial_state,
        cu_seqlens,
        output_final_state,
        out_shape=(B, T, D),
    )
