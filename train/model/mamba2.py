"""Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", arXiv:2405.21060), the SSD block of the reference
`mamba_ssm.modules.mamba2.Mamba2`, on `rnnscale.kernels.simple_gla.chunk_simple_gla`.

With d_inner = expand * d_model, H = d_inner / head_dim heads of P = head_dim channels, G groups
of B and C (N = state_size wide; head h reads group h // (H / G)):

    [z, x, B, C, dt] = in_proj(u)                    z, x: d_inner; B, C: G * N; dt: H
    [x, B, C] = silu(causal_conv1d([x, B, C]) + bias) (depthwise, conv_size taps)
    dt_t = softplus(dt_t + dt_bias),  A = -exp(A_log)                (one of each per head)
    h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T,  y_t = C_t^T h_t + D x_t     (h_t: N x P)
    out = out_proj(rms_norm_per_group(y * silu(z)))  (RMSNormGated, norm_before_gate=False)

The scan is scalar-decay linear attention with q = C, k = B, v = dt x, g = dt A and scale 1.
Initialisation as mamba_ssm: A = uniform(1, a_init_max), dt = exp(uniform(log dt_min,
log dt_max)) clamped at 1e-4 and dt_bias its inverse softplus, D = 1.

State: `(conv [N, d_inner + 2 G N, conv_size - 1], ssm [N, H, N, P])`: the last conv_size - 1
inputs of the convolution and the SSM state h (mamba_ssm holds h as [.., P, N]; this is its
transpose) of every sequence or packed document.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.kernels.common.recompute import with_recipes
from rnnscale.kernels.norm import gated_rms_norm
from rnnscale.train.model import flops
from rnnscale.train.model.layers import MixerDims, ShortConvolution, normed
from rnnscale.train.model.scan import scan


class Mamba2(nn.Module):
    """The Mamba-2 SSD mixer; see the module docstring for the equations and the state."""

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        self.d_model, self.d_inner = dims.d_model, cfg.expand * dims.d_model
        if self.d_inner % cfg.head_dim:
            raise ValueError(
                f"model.mamba2.head_dim = {cfg.head_dim} must divide d_inner = expand * d_model "
                f"= {self.d_inner}: choose a head_dim that divides it"
            )
        self.num_heads = self.d_inner // cfg.head_dim
        if self.num_heads % cfg.n_groups:
            raise ValueError(
                f"model.mamba2.n_groups = {cfg.n_groups} must divide the {self.num_heads} "
                "SSM heads (d_inner / head_dim)"
            )
        self.head_dim, self.state_size, self.n_groups = cfg.head_dim, cfg.state_size, cfg.n_groups
        self.cfg, self.eps = cfg, dims.norm_eps
        self.settings = dims.scan_settings("simple_gla")
        bc = cfg.n_groups * cfg.state_size
        self.in_proj = nn.Linear(
            self.d_model, 2 * self.d_inner + 2 * bc + self.num_heads, bias=False
        )
        self.conv = ShortConvolution(self.d_inner + 2 * bc, cfg.conv_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg, H = self.cfg, self.num_heads
        self.A_log.copy_(torch.empty(H).uniform_(1.0, cfg.a_init_max).log())
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = (torch.rand(H) * (hi - lo) + lo).exp().clamp(min=1e-4)  # (H,), log-uniform
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D.fill_(1.0)

    def flops_per_token(self, seq_len: int) -> int:
        d, e, H = self.d_model, self.d_inner, self.num_heads
        conv_dim = e + 2 * self.n_groups * self.state_size
        projections = flops.linear(d, 2 * e + 2 * self.n_groups * self.state_size + H)
        projections += flops.linear(e, d)
        conv = flops.conv(conv_dim, self.conv.weight.shape[1])
        scan = flops.linear_attention(H, self.state_size, self.head_dim)  # per head N x P
        return projections + conv + scan

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        conv_state, h = (None, None) if state is None else state
        e = self.d_inner
        z, xbc, dt = self.in_proj(x).split([e, e + 2 * G * N, H], dim=-1)
        xbc, conv_state, xbc_again = self.conv(
            xbc, cu_seqlens=cu_seqlens, state=conv_state, shard=shard, with_recipe=True
        )  # the backward keeps the convolution's input and makes xbc, v, the norm's output again
        acc, dtype = torch.promote_types(x.dtype, torch.float32), x.dtype  # dt, A, decay: fp32+
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        g = dt * -self.A_log.to(acc).exp()  # (B, T, H), log of the decay exp(dt A)

        def split(xbc):  # xs, v = xs dt: (B, T, H, P); B, C (B, T, G, N) shared by H / G heads
            xs, b, c = xbc.split([e, G * N, G * N], dim=-1)
            xs = xs.view(B, T, H, P)
            v = (xs.to(acc) * dt[..., None]).to(dtype)
            return xs, b.view(B, T, G, N), c.view(B, T, G, N), v

        kept = {xbc: xbc_again}  # the convolution's output: xs, B and C are slices of it
        xs, k, q, v = with_recipes(kept, split, xbc)
        if xbc_again is not None:
            kept[v] = lambda: split(xbc_again())[3]
        y, h = with_recipes(kept, scan, "simple_gla", q, k, v, g, state=h, cu_seqlens=cu_seqlens,
                            settings=self.settings, shard=shard, scale=1.0)  # fmt: skip
        skip = self.D.to(acc)[:, None]  # y: (B, T, H, P)
        y = with_recipes(kept, lambda y: y.to(acc) + skip * xs.to(acc), y)
        # gated before the norm, each group normalised alone, then the full-width weight
        # z is a view of in_proj's output: a copy lets the norm keep z alone, not all of it
        y, z = y.reshape(B, T, e), z.to(acc).contiguous()
        out, again = normed(gated_rms_norm, (y, z), self.norm_weight, self.eps, with_recipe=True,
                            groups=G, norm_before_gate=False)  # fmt: skip
        out = out.to(dtype)  # what out_proj keeps: in bf16 a copy of the fp32 norm's output
        cast_again = None if again is None else lambda: again().to(dtype)
        return with_recipes({out: cast_again}, self.out_proj, out), (conv_state, h)
