"""One step of the elementwise linear scan (generation). Legend: B batch, D channels."""

from __future__ import annotations

import torch


def linear_scan_step(
    a: torch.Tensor, b: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`h = a * h + b`; a, b, state: `[B, D]`. Returns `(h, h)`: the output is the state."""
    state = a * state + b
    return state, state
