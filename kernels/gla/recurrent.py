"""One step of gated linear attention: the form generation runs, O(1) state per token.

Legend: B batch (or sequences), H heads, K key width, V value width.
"""

from __future__ import annotations

import torch


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`S = diag(exp g) S + k v^T`, `o = scale q^T S` for one token.

    q, k, g: `[B, H, K]`; v: `[B, H, V]`; state: `[B, H, K, V]`. Returns `(o [B, H, V], state)`.
    """
    state = g.exp()[..., None] * state + k[..., None] * v[..., None, :]  # (B, H, K, V)
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state
