"""Gated Linear Attention (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), the token mixer around `rnnscale.kernels.gla.chunk_gla`.

Per head: q, k of width expand_k * head_dim, v of width expand_v * head_dim; the forget gate is
a low-rank projection, `g = logsigmoid(W2 W1 x) / gate_logit_normalizer` (<= 0, close to 0 at
init so the state decays slowly); the output is normalised per head and gated by swish(W_g x).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from rnnscale.train.model import flops
from rnnscale.train.model.layers import GatedRMSNorm, MixerDims, gated_output
from rnnscale.train.model.scan import scan


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d_model, num_heads, norm_eps = dims.d_model, dims.num_heads, dims.norm_eps
        head_dim = d_model // num_heads
        self.num_heads = num_heads
        self.key_dim = int(head_dim * cfg.expand_k) * num_heads
        self.value_dim = int(head_dim * cfg.expand_v) * num_heads
        if self.key_dim == 0 or self.value_dim == 0:
            raise ValueError(
                f"model.gla.expand_k/expand_v leave a head {head_dim} wide with no key or value "
                "channels: raise them or d_model"
            )
        self.settings = dims.scan_settings("gla")
        self.normalizer = cfg.gate_logit_normalizer
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d_model, cfg.gate_low_rank_dim, bias=False),
            nn.Linear(cfg.gate_low_rank_dim, self.key_dim, bias=True),
        )
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_norm = GatedRMSNorm(self.value_dim // num_heads, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.d_model, self.low_rank = d_model, cfg.gate_low_rank_dim

    def flops_per_token(self, seq_len: int) -> int:
        d, k, v, r = self.d_model, self.key_dim, self.value_dim, self.low_rank
        projections = 2 * flops.linear(d, k) + 2 * flops.linear(d, v) + flops.linear(v, d)
        gate = flops.linear(d, r) + flops.linear(r, k)
        H = self.num_heads
        scan = flops.linear_attention(H, k // H, v // H)
        return projections + gate + scan

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, -1)  # (B, T, H, K)
        k = self.k_proj(x).view(B, T, H, -1)  # (B, T, H, K)
        v = self.v_proj(x).view(B, T, H, -1)  # (B, T, H, V)
        g = (F.logsigmoid(self.gk_proj(x).float()) / self.normalizer).view(B, T, H, -1)
        o, state = scan("gla", q, k, v, g, state=state, cu_seqlens=cu_seqlens,
                        settings=self.settings, shard=shard)  # fmt: skip
        # o: (B, T, H, V), state: (N, H, K, V)
        gate = self.g_proj(x).view(B, T, H, -1)
        return gated_output(self.g_norm, self.o_proj, o, gate), state
