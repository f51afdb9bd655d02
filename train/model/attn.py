"""Causal softmax attention with rotary positions, through `scaled_dot_product_attention`.

Packed documents (`cu_seqlens`) attend only inside themselves and restart their positions.
The state is the key/value cache `(k, v)`, each `[B, H, T_past, D]`, for generation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.train.model.layers import apply_rope, positions


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, cfg, norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(
                f"attention needs an even head width for rotary positions, got {self.head_dim} "
                "(model.d_model / model.num_heads)"
            )
        self.rope_theta = cfg.rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, *, cu_seqlens=None, state=None):
        B, T, _ = x.shape
        if cu_seqlens is not None and state is not None:
            raise ValueError("attention cannot continue a key/value cache across packed documents")
        past = 0 if state is None else state[0].shape[2]
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        pos = positions(B, T, cu_seqlens, past, x.device)  # (B, T)
        q = apply_rope(q, pos, self.rope_theta).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k, pos, self.rope_theta).transpose(1, 2)  # (B, H, T, D)
        v = v.transpose(1, 2)  # (B, H, T, D)
        if state is not None:
            k = torch.cat([state[0], k], dim=2)  # (B, H, past + T, D)
            v = torch.cat([state[1], v], dim=2)
        mask = _mask(T, past, cu_seqlens, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), (k, v)


def _mask(T: int, past: int, cu_seqlens, device) -> torch.Tensor | None:
    """None for a plain causal batch; a (T, T) boolean mask for packed or cached input."""
    if cu_seqlens is None and past == 0:
        return None
    key = torch.arange(past + T, device=device)
    query = torch.arange(T, device=device) + past
    mask = key[None, :] <= query[:, None]  # (T, past + T) causal
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # (T,)
        mask = mask & (doc[:, None] == doc[None, :])
    return mask
