"""HGRN2 (Qin et al., 2024, "HGRN2: Gated Linear RNNs with State Expansion"), the token mixer
around `rnnscale.kernels.gla.chunk_gla`, as fla's `HGRN2Attention` computes it.

Per head, with a forget gate f_t in (lb, 1) of width K = expand_ratio and the input i_t of
width V = d_model / num_heads:

    f_t = lb + (1 - lb) * sigmoid(W_f x_t)        g_t = log f_t (computed as a logaddexp)
    k_t = 1 - f_t                                  the input gate, tied to the forget gate
    q_t = silu(W_q x_t)                            v_t = i_t = W_i x_t
    S_t = diag(f_t) S_{t-1} + k_t v_t^T            o_t = K^-0.5 q_t^T S_t
    y_t = W_o rms_norm(o_t)                        one RMSNorm over all heads (d_model wide)

The lower bound lb (one per forget channel) keeps upper layers' memory long. fla computes it at
the model level, `softmax(P, 0).cumsum(0) - softmax(P, 0)[0]` over a `[num_layers, K H]`
parameter P initialised to zero, so layer l starts at l / num_layers, layer 0 is pinned to 0,
and the bounds stay monotone in depth while training. A mixer here is self-contained, so each
layer l > 0 owns its bound as `lb = sigmoid(theta)` with theta initialised to
logit(l / num_layers) (the same schedule at init; the layers then move independently, without
the cross-layer monotonicity), and layer 0 has no bound (lb = 0), as in fla.

State: `S [N, H, K, V]`, the recurrent state of every sequence or packed document (no
convolution: fla's HGRN2 leaves its short convolutions off by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.train.model import flops
from rnnscale.train.model.layers import MixerDims, RMSNorm
from rnnscale.train.model.scan import scan


class HGRN2(nn.Module):
    """`forward(x [B, T, d_model], *, cu_seqlens=None, state=None) -> (y, S [N, H, K, V])`."""

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d_model, num_heads = dims.d_model, dims.num_heads
        self.num_heads, self.d_model = num_heads, d_model
        self.key_width = cfg.expand_ratio  # K: forget-gate channels per head
        self.forget_dim = num_heads * cfg.expand_ratio
        self.settings = dims.scan_settings("gla")
        self.layer_idx, self.num_layers = dims.layer_idx, dims.num_layers
        self.q_proj = nn.Linear(d_model, self.forget_dim, bias=False)
        self.f_proj = nn.Linear(d_model, self.forget_dim, bias=False)
        self.i_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_norm = RMSNorm(d_model, eps=dims.norm_eps)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        if dims.layer_idx > 0:
            self.lower_bound_logit = nn.Parameter(torch.empty(self.forget_dim))
            self.lower_bound_logit._no_weight_decay = True
        self.init_weights()

    def init_weights(self) -> None:
        """Lower bound l / num_layers at layer l, HGRN's schedule at init."""
        if self.layer_idx > 0:
            start = self.layer_idx / self.num_layers
            nn.init.constant_(self.lower_bound_logit, math.log(start / (1 - start)))

    def lower_bound(self) -> torch.Tensor:
        """The forget gate's lower bound per forget channel, `[H K]` (zeros at layer 0)."""
        if self.layer_idx == 0:
            return self.f_proj.weight.new_zeros(self.forget_dim)
        return torch.sigmoid(self.lower_bound_logit)

    def flops_per_token(self, seq_len: int) -> int:
        d, f, H = self.d_model, self.forget_dim, self.num_heads
        projections = 2 * flops.linear(d, f) + 2 * flops.linear(d, d)
        scan = flops.linear_attention(H, self.key_width, d // H)
        return projections + scan

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        H = self.num_heads
        acc = torch.promote_types(x.dtype, torch.float32)  # gates in fp32 or wider
        q = F.silu(self.q_proj(x)).view(B, T, H, -1)  # (B, T, H, K)
        v = self.i_proj(x).view(B, T, H, -1)  # (B, T, H, V)
        g = self.log_forget_gate(self.f_proj(x).to(acc)).view(B, T, H, -1)  # (B, T, H, K)
        k = (-torch.expm1(g)).to(x.dtype)  # 1 - f: (B, T, H, K)
        scale = self.key_width**-0.5
        o, state = scan("gla", q, k, v, g, state=state, cu_seqlens=cu_seqlens,
                        settings=self.settings, shard=shard, scale=scale)  # fmt: skip
        # o: (B, T, H, V), state: (N, H, K, V)
        o = self.g_norm(o.reshape(B, T, self.d_model))
        return self.o_proj(o), state

    def log_forget_gate(self, f: torch.Tensor) -> torch.Tensor:
        """log(lb + (1 - lb) sigmoid(f)) without forming f near 0 or 1 in linear space."""
        if self.layer_idx == 0:
            return F.logsigmoid(f)
        theta = self.lower_bound_logit.to(f.dtype)
        return torch.logaddexp(F.logsigmoid(theta), F.logsigmoid(-theta) + F.logsigmoid(f))
