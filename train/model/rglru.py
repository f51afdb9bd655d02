"""The recurrent block of Griffin and Hawk (De et al., 2024, "Griffin: Mixing Gated Linear
Recurrences with Local Attention"), around the RG-LRU (Real-Gated Linear Recurrent Unit).

Two branches over D = lru_width = expand * d_model rounded to a multiple of num_heads:

    g_t = GeLU(W_g x_t + b_g)                          gate branch (tanh GeLU, as the reference)
    u   = Conv1D(W_u x + b_u)                          causal depthwise conv, with bias
    r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_x u_t + b_x)   W_a, W_x block-diagonal
    log a_t = -c * softplus(-Lambda) * r_t             a_t = sigmoid(Lambda)^(c r_t)
    m_t = sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t))    input normalisation
    h_t = a_t * h_{t-1} + m_t * (i_t * u_t)
    y_t = W_o (g_t * h_t) + b_o

The RG-LRU (gates, a_t, m_t and the scan) runs in fp32 or wider. The block-diagonal gates have
num_heads blocks. At the first token of a sequence or packed document (no previous state)
m_t = 1: the input enters unnormalised, as in Griffin's reference code (recurrentgemma,
`RGLRU`), which also caps the gradient of the square root at 1000 (a_t -> 1 would make it
infinite). A call given a state continues it: its first token is not a document start.

Init (`init_weights`): a^c = sigmoid(Lambda)^c uniform in [a_min, a_max] (the paper's rule; the
reference code draws a^2 uniform in [0.81, 0.998] instead), block-diagonal gate weights normal
with variance 1 / block width and zero biases, the convolution normal with variance
0.01 / conv_size and zero bias (the reference's choices). Lambda and the gate biases take no
weight decay.

State: `(conv, h)`: conv the last conv_size - 1 inputs of the conv `[N, D, conv_size - 1]`,
h the RG-LRU state `[N, D]` (fp32 or wider); one row per sequence, or per packed document.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.train.model import flops
from rnnscale.train.model.layers import MixerDims, ShortConvolution
from rnnscale.train.model.scan import scan

MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedGradient(torch.autograd.Function):
    """sqrt(x) whose gradient 1 / (2 sqrt(x)) is capped at MAX_SQRT_GRADIENT (Griffin: NaNs in
    bf16 otherwise, where a_t rounds to 1)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (4 * x).clamp(min=MAX_SQRT_GRADIENT**-2).sqrt()


def document_starts(B: int, T: int, cu_seqlens, device) -> torch.Tensor:
    """`[B, T]` True at the first token of every row, or of every packed document."""
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    if cu_seqlens is None:
        starts[:, :1] = True
    else:
        flags = torch.zeros(T + 1, dtype=torch.bool, device=device)  # T: empty trailing docs
        flags[cu_seqlens[:-1].to(device=device, dtype=torch.long)] = True
        starts[0] = flags[:T]
    return starts


class RGLRUBlock(nn.Module):
    """Griffin's recurrent block (module docstring: equations, init, state)."""

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d, H = dims.d_model, dims.num_heads
        self.d_model, self.num_heads = d, H
        self.width = H * max(1, round(cfg.expand * d / H))
        block = self.width // H
        self.conv_size, self.settings = cfg.conv_size, dims.scan_settings("scan")
        self.c, self.a_min, self.a_max = cfg.c, cfg.a_min, cfg.a_max
        self.gate_proj = nn.Linear(d, self.width)
        self.in_proj = nn.Linear(d, self.width)
        self.conv = ShortConvolution(self.width, cfg.conv_size, bias=True, activation=None)
        self.w_a = nn.Parameter(torch.empty(H, block, block))
        self.b_a = nn.Parameter(torch.empty(H, block))
        self.w_x = nn.Parameter(torch.empty(H, block, block))
        self.b_x = nn.Parameter(torch.empty(H, block))
        self.Lambda = nn.Parameter(torch.empty(self.width))
        for p in (self.Lambda, self.b_a, self.b_x):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(self.width, d)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        block = self.width // self.num_heads
        for w in (self.w_a, self.w_x):
            w.normal_(0.0, block**-0.5)
        self.b_a.zero_()
        self.b_x.zero_()
        self.conv.weight.normal_(0.0, (0.01 / self.conv_size) ** 0.5)
        self.conv.bias.zero_()
        a_c = torch.empty(self.width, dtype=torch.float64).uniform_(self.a_min, self.a_max)
        a = a_c ** (1 / self.c)
        self.Lambda.copy_(torch.log(a) - torch.log1p(-a))  # logit: sigmoid(Lambda) = a

    def flops_per_token(self, seq_len: int) -> int:
        d, D, H = self.d_model, self.width, self.num_heads
        projections = 2 * flops.linear(d, D) + flops.linear(D, d)
        gates = 2 * H * flops.linear(D // H, D // H)
        return projections + flops.conv(D, self.conv_size) + gates + flops.elementwise_scan(D)

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        conv_state, h0 = (None, None) if state is None else state
        g = F.gelu(self.gate_proj(x), approximate="tanh")  # (B, T, D)
        u, conv_state = self.conv(
            self.in_proj(x), cu_seqlens=cu_seqlens, state=conv_state, shard=shard
        )
        starts = document_starts(B, T, cu_seqlens, x.device) if state is None else None
        if shard is not None:  # where documents of the whole rows start
            starts = (shard.positions.to(x.device) == 0).expand(B, T)
        a, b = self.coefficients(u, starts)
        h, h_last = scan("scan", a, b, state=h0, cu_seqlens=cu_seqlens, settings=self.settings,
                         shard=shard)  # fmt: skip
        return self.out_proj(g * h.to(x.dtype)), (conv_state, h_last)

    def coefficients(self, u: torch.Tensor, starts: torch.Tensor | None):
        """The scan's `a_t` and `b_t = m_t * i_t * u_t`, `[B, T, D]` in fp32 or wider, from the
        conv output `u [B, T, D]`; m_t = 1 where `starts [B, T]` is True."""
        acc = torch.promote_types(u.dtype, torch.float32)
        u = u.to(acc)
        blocks = u.unflatten(-1, (self.num_heads, -1))  # (B, T, H, D / H)
        r = torch.sigmoid(self._block_diagonal(blocks, self.w_a, self.b_a))  # (B, T, D)
        i = torch.sigmoid(self._block_diagonal(blocks, self.w_x, self.b_x))  # (B, T, D)
        log_a = -self.c * F.softplus(-self.Lambda.to(acc)) * r  # (B, T, D), <= 0
        m = _SqrtBoundedGradient.apply(-torch.expm1(2 * log_a))
        if starts is not None:
            m = torch.where(starts[..., None], torch.ones_like(m), m)
        return log_a.exp(), m * i * u

    @staticmethod
    def _block_diagonal(blocks, w, b):
        """`blocks [B, T, H, K] @ w [H, K, K] + b [H, K]`, flattened to `[B, T, H * K]`."""
        y = torch.einsum("bthi,hij->bthj", blocks, w.to(blocks.dtype)) + b.to(blocks.dtype)
        return y.flatten(-2)
