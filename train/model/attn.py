"""Causal softmax attention with rotary positions through `scaled_dot_product_attention`:
`attn` (global) and `swa` (sliding window: each query sees its last `window` tokens, itself
included, as in Mistral and Griffin's local attention).

Packed documents (`cu_seqlens`) attend only inside themselves and restart their positions.
The state is a key/value cache for generation: `(k, v)` with every past token for `attn`,
`(k, v, position)` with the last `window - 1` tokens for `swa` (a rolling window: memory
stays O(window) however long the generation).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.train.model import flops
from rnnscale.train.model.layers import MixerDims, apply_rope, positions


class Attention(nn.Module):
    window: int | None = None

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d_model, self.num_heads = dims.d_model, dims.num_heads
        self.head_dim = d_model // self.num_heads
        if self.head_dim % 2:
            raise ValueError(
                f"attention needs an even head width for rotary positions, got {self.head_dim} "
                "(model.d_model / model.num_heads)"
            )
        self.rope_theta = cfg.rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def flops_per_token(self, seq_len: int) -> int:
        d = self.num_heads * self.head_dim
        scores = flops.softmax_attention(self.num_heads, self.head_dim, seq_len, self.window)
        return flops.linear(d, 3 * d) + flops.linear(d, d) + scores

    def forward(self, x, *, cu_seqlens=None, state=None):
        B, T, _ = x.shape
        if cu_seqlens is not None and state is not None:
            raise ValueError("attention cannot continue a key/value cache across packed documents")
        past = self._position(state)
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        pos = positions(B, T, cu_seqlens, past, x.device)  # (B, T)
        q = apply_rope(q, pos, self.rope_theta).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k, pos, self.rope_theta).transpose(1, 2)  # (B, H, T, D)
        v = v.transpose(1, 2)  # (B, H, T, D)
        if state is not None:
            k = torch.cat([state[0], k], dim=2)  # (B, H, cached + T, D)
            v = torch.cat([state[1], v], dim=2)
        mask = self._mask(T, past, k.shape[2] - T, cu_seqlens, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), self._cache(k, v, past + T)

    def _position(self, state) -> int:
        return 0 if state is None else state[0].shape[2]

    def _cache(self, k, v, position: int):
        return (k, v)

    def _mask(self, T: int, past: int, cached: int, cu_seqlens, device) -> torch.Tensor | None:
        """None for a plain causal batch; else a (T, cached + T) boolean mask."""
        if cu_seqlens is None and cached == 0 and self.window is None:
            return None
        key = torch.arange(cached + T, device=device) + (past - cached)  # absolute positions
        query = torch.arange(T, device=device) + past
        mask = key[None, :] <= query[:, None]
        if self.window is not None:
            mask = mask & (query[:, None] - key[None, :] < self.window)
        if cu_seqlens is not None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
            doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
            mask = mask & (doc[:, None] == doc[None, :])
        return mask


class SlidingWindowAttention(Attention):
    def __init__(self, cfg, dims: MixerDims):
        super().__init__(cfg, dims)
        self.window = cfg.window

    def _position(self, state) -> int:
        return 0 if state is None else state[2]

    def _cache(self, k, v, position: int):
        keep = min(self.window - 1, k.shape[2])  # the next query sees these and itself
        return k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :], position
