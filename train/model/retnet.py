"""Multi-Scale Retention (Sun et al., 2023, "Retentive Network: A Successor to Transformer for
Large Language Models", arXiv:2307.08621, sections 2.1-2.2), as flash-linear-attention's
`MultiScaleRetention` layer computes it, on `rnnscale.kernels.simple_gla.chunk_simple_gla`.

Per head h (q, k of width K = expand_k * head_dim, v and the gate of width V = expand_v * head_dim,
head_dim = d_model / num_heads), with n the position of the token inside its own document:

    q_n, k_n = rope(W_Q x_n, n), rope(W_K x_n, n)      (xPos/RoPE: Theta_n = e^{i n theta})
    S_n = gamma_h S_{n-1} + k_n v_n^T,   o_n = K^-1/2 q_n^T S_n
    y_n = W_O [rms_norm(o_n) * swish(W_G x_n)]  (norm per head, heads concatenated)

with the fixed decay gamma_h = 1 - 2^(-5 - h), h = 0 .. H - 1 (paper section 2.2:
"gamma = 1 - 2^(-5 - arange(0, h))"; fla: `s = log(1 - 2^(-5 - arange(H)))`, torchscale's
`RetNetRelPos` the same). The scan gets g = log gamma_h at every token.
As in fla, the output norm is RMSNorm (the paper: GroupNorm) and the paper's retention-score
normalisations (dividing by sqrt(sum of decays) and by max(|scores sum|, 1)) are left out: each
scales o_n by one number per token and head, which the per-head norm removes (up to its eps).

State: `(S [N, H, K, V], position [N] int64)`: the retention state of every sequence (or packed
document) and how many tokens it has seen, so rotary positions continue where the call stopped.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rnnscale.train.model import flops
from rnnscale.train.model.layers import (
    GatedRMSNorm,
    MixerDims,
    apply_rope,
    gated_output,
    positions,
)
from rnnscale.train.model.scan import scan


def retention_log_decays(num_heads: int) -> torch.Tensor:
    """log gamma_h = log(1 - 2^(-5 - h)) for h = 0 .. num_heads - 1, float64 `[H]`."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))))


class MultiScaleRetention(nn.Module):
    """RetNet's retention mixer; see the module docstring for the equations and the state."""

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d_model, H = dims.d_model, dims.num_heads
        head_dim = d_model // H
        self.num_heads, self.d_model = H, d_model
        self.head_k, self.head_v = int(head_dim * cfg.expand_k), int(head_dim * cfg.expand_v)
        if self.head_k == 0 or self.head_k % 2 or self.head_v == 0:
            raise ValueError(
                f"model.retnet.expand_k/expand_v give heads {self.head_k} key and {self.head_v} "
                f"value channels wide (head width {head_dim}); rotary positions need an even, "
                "non-zero key width: change expand_k/expand_v or model.d_model/num_heads"
            )
        self.key_dim, self.value_dim = H * self.head_k, H * self.head_v
        self.rope_theta, self.settings = cfg.rope_theta, dims.scan_settings("simple_gla")
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_norm = GatedRMSNorm(self.head_v, eps=dims.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def flops_per_token(self, seq_len: int) -> int:
        d, k, v, H = self.d_model, self.key_dim, self.value_dim, self.num_heads
        projections = 2 * flops.linear(d, k) + 2 * flops.linear(d, v) + flops.linear(v, d)
        return projections + flops.linear_attention(H, k // H, v // H)

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        H = self.num_heads
        S, past = (None, None) if state is None else state
        pos, past = _positions(B, T, cu_seqlens, past, x.device)  # pos: (B, T), past: (N,)
        if shard is not None:  # positions inside the documents of the whole rows
            pos = shard.positions.to(x.device).expand(B, T)
            before = torch.zeros_like(past)  # tokens of the first sequences on earlier ranks
            before[: len(past) if cu_seqlens is None else 1] = pos[0, 0]
            past = past + before
        q = apply_rope(self.q_proj(x).view(B, T, H, -1), pos, self.rope_theta)  # (B, T, H, K)
        k = apply_rope(self.k_proj(x).view(B, T, H, -1), pos, self.rope_theta)  # (B, T, H, K)
        v = self.v_proj(x).view(B, T, H, -1)  # (B, T, H, V)
        acc = torch.promote_types(x.dtype, torch.float32)  # the decay stays in fp32 or better
        g = retention_log_decays(H).to(x.device, acc).expand(B, T, H).contiguous()  # (B, T, H)
        o, S = scan("simple_gla", q, k, v, g, state=S, cu_seqlens=cu_seqlens,
                    settings=self.settings, shard=shard, scale=self.head_k**-0.5)  # fmt: skip
        gate = self.g_proj(x).view(B, T, H, -1)  # (B, T, H, V)
        return gated_output(self.g_norm, self.o_proj, o, gate), (S, past)


def _positions(B: int, T: int, cu_seqlens, past, device):
    """Rotary position of every token `[B, T]` (restarting at each packed document, continuing
    each sequence's `past` count `[N]`), and the counts after this call `[N]`."""
    pos = positions(B, T, cu_seqlens, 0, device)  # (B, T)
    if cu_seqlens is None:
        seen = torch.full((B,), T, dtype=torch.long, device=device)  # (N,) = (B,)
    else:
        seen = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)  # (N,)
    if past is None:
        return pos, seen
    start = past[:, None] if cu_seqlens is None else past.repeat_interleave(seen, output_size=T)
    return pos + start, past + seen
