"""minGRU and minLSTM (Feng et al., 2024, "Were RNNs All We Needed?"): a GRU and an LSTM whose
gates no longer read the previous hidden state, so the recurrence is an elementwise linear scan.

Per token, over D = round(expand * d_model) channels (gates and scan in fp32 or wider):

    u_t  = x_t + conv(x)_t                  causal depthwise conv over d_model (conv_size > 0)
    h~_t = W_h u_t + b_h
    minGRU:   z_t = sigmoid(W_z u_t + b_z)                a_t = 1 - z_t,   w_t = z_t
    minLSTM:  f_t = sigmoid(W_f u_t + b_f), i_t = sigmoid(W_i u_t + b_i)
              a_t = f'_t = f_t / (f_t + i_t),  w_t = i'_t = i_t / (f_t + i_t)
    h_t  = a_t * h_{t-1} + w_t * h~_t       (`linear_scan`, h_0 = 0 at every sequence start)
    y_t  = W_o h_t + b_o

This is the paper's non-log-space ("vanilla") form: h~ is a plain projection, not g(.), and the
gates read x alone. Around the recurrence we follow the authors' language model
(BorealisAI/minRNNs, `models/model.py`, built on lucidrains/minGRU-pytorch): the hidden state is
`expand` times wider than d_model with an output projection back, projections with bias, and a
causal depthwise convolution ahead of the recurrence as a residual branch, x + conv(x) (linear,
no activation). lucidrains' conv module follows the depthwise conv with a pointwise (1x1) one;
we leave that out: the projections right after it mix channels.

State: `(conv, h)`: conv the last conv_size - 1 inputs `[N, d_model, conv_size - 1]` (None
when conv_size = 0), h the recurrent state `[N, D]` (fp32 or wider); one row per sequence, or
per packed document.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.train.model import flops
from rnnscale.train.model.layers import MixerDims, ShortConvolution
from rnnscale.train.model.scan import scan


class _MinRNN(nn.Module):
    """The block shared by minGRU and minLSTM; a subclass sets `num_gates` (projections besides
    h~) and `gates(logits [B, T, num_gates * D]) -> (a, w)`, each `[B, T, D]`."""

    num_gates: int

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d = dims.d_model
        self.d_model, self.hidden = d, max(1, round(cfg.expand * d))
        self.conv_size, self.settings = cfg.conv_size, dims.scan_settings("scan")
        self.conv = ShortConvolution(d, cfg.conv_size, activation=None) if cfg.conv_size else None
        self.in_proj = nn.Linear(d, (1 + self.num_gates) * self.hidden)
        self.out_proj = nn.Linear(self.hidden, d)

    def flops_per_token(self, seq_len: int) -> int:
        d, D = self.d_model, self.hidden
        conv = flops.conv(d, self.conv_size) if self.conv is not None else 0
        projections = flops.linear(d, (1 + self.num_gates) * D) + flops.linear(D, d)
        return projections + conv + flops.elementwise_scan(D)

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        conv_state, h0 = (None, None) if state is None else state
        u = x
        if self.conv is not None:
            c, conv_state = self.conv(x, cu_seqlens=cu_seqlens, state=conv_state, shard=shard)
            u = x + c  # (B, T, d_model)
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 rounds a decay of 0.999 to 1
        h_tilde, logits = (
            self.in_proj(u).to(acc).split([self.hidden, self.num_gates * self.hidden], dim=-1)
        )  # (B, T, D), (B, T, num_gates * D)
        a, w = self.gates(logits)
        h, h_last = scan("scan", a, w * h_tilde, state=h0, cu_seqlens=cu_seqlens,
                         settings=self.settings, shard=shard)  # fmt: skip
        return self.out_proj(h.to(x.dtype)), (conv_state, h_last)


class MinGRU(_MinRNN):
    """minGRU: `h_t = (1 - z_t) h_{t-1} + z_t h~_t` (module docstring: the block and state)."""

    num_gates = 1

    def gates(self, logits):
        """(a, w) = (1 - z, z), z = sigmoid(logits); 1 - z as sigmoid(-logits), exact near 1."""
        return torch.sigmoid(-logits), torch.sigmoid(logits)


class MinLSTM(_MinRNN):
    """minLSTM: `h_t = f'_t h_{t-1} + i'_t h~_t` with f' + i' = 1 (module docstring)."""

    num_gates = 2

    def gates(self, logits):
        """(a, w) = (f', i'): f / (f + i) = sigmoid(log f - log i), which stays defined where
        both gates underflow (f + i = 0 in the direct form)."""
        f_logit, i_logit = logits.chunk(2, dim=-1)  # (B, T, D) each
        diff = F.logsigmoid(f_logit) - F.logsigmoid(i_logit)
        return torch.sigmoid(diff), torch.sigmoid(-diff)
