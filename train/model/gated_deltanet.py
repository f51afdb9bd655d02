"""Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2024, "Gated Delta Networks: Improving Mamba2
with Delta Rule"), the token mixer around `rnnscale.kernels.delta`, as fla's `GatedDeltaNet`
and `GatedDeltaProduct` layers compute it. Per head, with key width K = head_dim and value
width V = expand_v * K:

    q_t, k_t = l2norm(silu(conv(W_q x))), l2norm(silu(conv(W_k x)))    v_t = silu(conv(W_v x))
    beta_t = sigmoid(W_b x_t)                     (x 2 with allow_neg_eigval: beta in (0, 2))
    g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)             (g = 0 without the forget gate)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = K^-0.5 q_t^T S_t          y_t = W_o (rms_norm(o_t) * silu(W_g x_t))   (norm per head)

use_forget_gate = false is plain DeltaNet (Yang et al. 2024); allow_neg_eigval lets the
transition I - beta k k^T have a negative eigenvalue (Grazzi et al. 2024). num_householder = n
> 1 is DeltaProduct (Siems et al. 2025): W_k, W_v, W_b give n keys, values and betas per token,
applied as n delta steps in a row after the token's decay exp(g_t) (once per token), and q
reads the state after the last one (`chunk_delta_product`).

State: `(conv_q [N, H K, W-1], conv_k [N, n H K, W-1], conv_v [N, n H V, W-1], S [N, H, K, V])`:
the short convolutions' last W - 1 inputs and the recurrent state, per sequence or document.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.kernels.common.recompute import with_recipes
from rnnscale.kernels.norm import l2_normalize
from rnnscale.train.model import flops
from rnnscale.train.model.layers import GatedRMSNorm, MixerDims, ShortConvolution, gated_output
from rnnscale.train.model.scan import scan


class GatedDeltaNet(nn.Module):
    """`forward(x [B, T, d_model], *, cu_seqlens=None, state=None) -> (y, state)`, state as in
    the module docstring."""

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d_model, H = dims.d_model, dims.num_heads
        self.num_heads, self.d_model = H, d_model
        self.head_dim = cfg.head_dim or d_model // H
        self.head_v_dim = round(self.head_dim * cfg.expand_v)
        if not math.isclose(self.head_v_dim, self.head_dim * cfg.expand_v) or self.head_v_dim < 1:
            raise ValueError(
                f"model.gated_deltanet.expand_v={cfg.expand_v} times head_dim={self.head_dim} "
                "must be a positive whole number of value channels per head"
            )
        self.key_dim, self.value_dim = H * self.head_dim, H * self.head_v_dim
        n = self.num_householder = cfg.num_householder
        self.use_forget_gate, self.allow_neg_eigval = cfg.use_forget_gate, cfg.allow_neg_eigval
        self.settings, self.conv_size = dims.scan_settings("delta"), cfg.conv_size
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n * self.value_dim, bias=False)
        self.b_proj = nn.Linear(d_model, n * H, bias=False)
        self.q_conv = ShortConvolution(self.key_dim, cfg.conv_size)
        self.k_conv = ShortConvolution(n * self.key_dim, cfg.conv_size)
        self.v_conv = ShortConvolution(n * self.value_dim, cfg.conv_size)
        if self.use_forget_gate:
            self.a_proj = nn.Linear(d_model, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=dims.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """As fla (Mamba2's ranges): A uniform in (0, 16), dt log-uniform in [1e-3, 0.1]
        (floored at 1e-4), dt_bias its softplus inverse."""
        if not self.use_forget_gate:
            return
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
            log_dt = torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3))
            dt = (log_dt + math.log(1e-3)).exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def flops_per_token(self, seq_len: int) -> int:
        d, k, v, H = self.d_model, self.key_dim, self.value_dim, self.num_heads
        n = self.num_householder
        projections = flops.linear(d, k) + flops.linear(d, n * k) + flops.linear(d, n * v)
        projections += flops.linear(d, n * H) + flops.linear(d, v) + flops.linear(v, d)
        if self.use_forget_gate:
            projections += flops.linear(d, H)
        convs = sum(flops.conv(dim, self.conv_size) for dim in (k, n * k, n * v))
        recurrence = flops.delta_rule(H, self.head_dim, self.head_v_dim, steps=n)
        return projections + convs + recurrence

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        H, n = self.num_heads, self.num_householder
        cq, ck, cv, S = (None,) * 4 if state is None else state
        conv = dict(cu_seqlens=cu_seqlens, shard=shard, with_recipe=True)
        qc, cq, q_again = self.q_conv(self.q_proj(x), state=cq, **conv)
        kc, ck, k_again = self.k_conv(self.k_proj(x), state=ck, **conv)
        v, cv, v_again = self.v_conv(self.v_proj(x), state=cv, **conv)
        K, V = self.head_dim, self.head_v_dim
        convs = {qc: q_again, kc: k_again, v: v_again}  # kept: the convolutions' inputs
        q = with_recipes(convs, l2_normalize, qc.view(B, T, H, K))  # (B, T, H, K)
        k = with_recipes(convs, l2_normalize, kc.view(B, T, n, H, K))  # (B, T, n, H, K)
        recipes = dict(convs)
        if q_again is not None:  # recomputing: q and k after the L2 norm too
            recipes[q] = lambda: l2_normalize(q_again().view(B, T, H, K))
            recipes[k] = lambda: l2_normalize(k_again().view(B, T, n, H, K))
        args = (q, k, v.view(B, T, n, H, V), x, S, cu_seqlens, shard)
        o, S = with_recipes(recipes, self._scan, *args)
        gate = self.g_proj(x).view(B, T, H, V)  # o: (B, T, H, V), S: (N, H, K, V)
        return gated_output(self.o_norm, self.o_proj, o, gate), (cq, ck, cv, S)

    def _scan(self, q, k, v, x, S, cu_seqlens, shard):
        """The gated delta rule (n = 1) or DeltaProduct over q `[B, T, H, K]`, k `[B, T, n, H,
        K]`, v `[B, T, n, H, V]`, with the gates of x: `(o [B, T, H, V], S)`."""
        g, beta = self.gates(x)  # (B, T, H), (B, T, n, H)
        if self.num_householder == 1:  # the gated delta rule
            k, v, beta, family = k[:, :, 0], v[:, :, 0], beta[:, :, 0], "delta"
        else:  # DeltaProduct: n Householder steps per token
            family = "delta_product"
        return scan(family, q, k, v, g, beta, state=S, cu_seqlens=cu_seqlens,
                    settings=self.settings, shard=shard, scale=self.head_dim**-0.5)  # fmt: skip

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-decay g `[B, T, H]` (zeros without the forget gate) and the write strengths
        beta `[B, T, n, H]`, in fp32 or wider."""
        B, T, _ = x.shape
        H, acc = self.num_heads, torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.b_proj(x).to(acc)).view(B, T, self.num_householder, H)
        if self.allow_neg_eigval:
            beta = 2 * beta
        if not self.use_forget_gate:
            return x.new_zeros(B, T, H, dtype=acc), beta
        dt = F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        return -self.A_log.to(acc).exp() * dt, beta
