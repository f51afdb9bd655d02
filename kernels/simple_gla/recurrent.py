"""One step of scalar-decay linear attention (generation), O(1) state per token.

Legend: B batch (or sequences), H heads, K key width, V value width.
"""

from __future__ import annotations

import torch


def simple_gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`S = exp(g) S + k v^T`, `o = scale q^T S` for one token.

    q, k: `[B, H, K]`; v: `[B, H, V]`; g: `[B, H]`; state: `[B, H, K, V]`.
    Returns `(o [B, H, V], state)`.
    """
    state = g.exp()[..., None, None] * state + k[..., None] * v[..., None, :]  # (B, H, K, V)
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state
