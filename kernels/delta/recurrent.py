"""One step of the gated delta rule (generation), O(1) state per token.

Legend: B batch (or sequences), H heads, K key width, V value width.
"""

from __future__ import annotations

import torch


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`S = exp(g) (I - beta k k^T) S + beta k v^T`, `o = scale q^T S` for one token.

    Written as the delta correction: the state's prediction for k, `k^T S`, moves toward v by
    beta. q, k: `[B, H, K]`; v: `[B, H, V]`; g, beta: `[B, H]`; state: `[B, H, K, V]`.
    """
    state = g.exp()[..., None, None] * state  # (B, H, K, V)
    pred = torch.einsum("bhk,bhkv->bhv", k, state)  # (B, H, V)
    delta = beta[..., None] * (v - pred)  # (B, H, V)
    state = state + k[..., None] * delta[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state
