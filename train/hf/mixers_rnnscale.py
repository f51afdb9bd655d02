"""The token mixers of an exported rnnscale model, in plain PyTorch, with parameter names equal to
rnnscale's own (its model.safetensors loads as it is). Copied with `layers_rnnscale.py` into the
directory `rnnscale export --format hf` writes; the equations are those of rnnscale's mixers
(rnnscale/train/model/<mixer>.py), and tests/test_hf.py checks the outputs equal.

`forward(x [B, T, d_model], state, mask) -> (y, state)`: `state` continues every row where the
last call stopped (None: a fresh start); `mask [B, T]` (None: every token is real) is False at
left padding, which no state and no attention ever sees: the recurrences' inputs there are zero,
so every row's state is still zero at its first real token, and positions count real tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers_rnnscale import (
    acc_dtype,
    apply_rope,
    delta_product,
    delta_rule,
    elementwise_scan,
    l2_normalize,
    linear_attention,
    rms_norm,
    short_conv,
)


def _masked(x: torch.Tensor, mask) -> torch.Tensor:
    """x with zeros where `mask [B, T]` is False (a `where`, so no NaN leaks from padding)."""
    if mask is None:
        return x
    return torch.where(mask.view(*mask.shape, *([1] * (x.dim() - 2))), x, torch.zeros_like(x))


def _positions(B, T, past, mask, device):
    """Every token's position in its row `[B, T]` (real tokens counted after `past [B]`), and
    the count after this call `[B]`."""
    real = torch.ones(B, T, dtype=torch.long, device=device) if mask is None else mask.long()
    past = torch.zeros(B, dtype=torch.long, device=device) if past is None else past
    pos = past[:, None] + real.cumsum(1) - 1
    return pos.clamp(min=0), past + real.sum(1)


class Norm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x, gate=None):
        return rms_norm(x, self.weight, self.eps, gate)


class Conv(nn.Module):
    def __init__(self, dim, size, bias=False, activation="silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.activation = activation

    def forward(self, x, state, mask):
        return short_conv(_masked(x, mask), self.weight, self.bias, state, self.activation)


class GLA(nn.Module):
    def __init__(self, o, d, H, eps, layer_idx, chunk):
        super().__init__()
        head = d // H
        self.H, self.normalizer, self.chunk = H, o["gate_logit_normalizer"], chunk["gla"]
        key, value = int(head * o["expand_k"]) * H, int(head * o["expand_v"]) * H
        self.q_proj, self.k_proj = nn.Linear(d, key, bias=False), nn.Linear(d, key, bias=False)
        self.v_proj = nn.Linear(d, value, bias=False)
        r = o["gate_low_rank_dim"]
        self.gk_proj = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, key, bias=True))
        self.g_proj = nn.Linear(d, value, bias=False)
        self.g_norm, self.o_proj = Norm(value // H, eps), nn.Linear(value, d, bias=False)

    def forward(self, x, state, mask):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.H, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        g = (F.logsigmoid(self.gk_proj(x).float()) / self.normalizer).view(B, T, self.H, -1)
        o, state = linear_attention(q, _masked(k, mask), v, g, q.shape[-1] ** -0.5, state,
                                    self.chunk)  # fmt: skip
        o = self.g_norm(o, self.g_proj(x).view(B, T, self.H, -1))
        return self.o_proj(o.flatten(-2)), state


class RetNet(nn.Module):
    def __init__(self, o, d, H, eps, layer_idx, chunk):
        super().__init__()
        head = d // H
        self.H, self.theta, self.chunk = H, o["rope_theta"], chunk["simple_gla"]
        self.head_k, head_v = int(head * o["expand_k"]), int(head * o["expand_v"])
        self.q_proj = nn.Linear(d, H * self.head_k, bias=False)
        self.k_proj = nn.Linear(d, H * self.head_k, bias=False)
        self.v_proj = nn.Linear(d, H * head_v, bias=False)
        self.g_proj = nn.Linear(d, H * head_v, bias=False)
        self.g_norm, self.o_proj = Norm(head_v, eps), nn.Linear(H * head_v, d, bias=False)

    def forward(self, x, state, mask):
        B, T, _ = x.shape
        S, past = (None, None) if state is None else state
        pos, past = _positions(B, T, past, mask, x.device)
        q = apply_rope(self.q_proj(x).view(B, T, self.H, -1), pos, self.theta)
        k = apply_rope(self.k_proj(x).view(B, T, self.H, -1), pos, self.theta)
        v = self.v_proj(x).view(B, T, self.H, -1)
        h = torch.arange(self.H, dtype=torch.float64)
        g = torch.log1p(-(2.0 ** (-5.0 - h))).to(x.device, acc_dtype(x)).expand(B, T, self.H)
        o, S = linear_attention(q, _masked(k, mask), v, g[..., None], self.head_k**-0.5, S,
                                self.chunk)  # fmt: skip
        o = self.g_norm(o, self.g_proj(x).view(B, T, self.H, -1))
        return self.o_proj(o.flatten(-2)), (S, past)


class Mamba2(nn.Module):
    def __init__(self, o, d, H, eps, layer_idx, chunk):
        super().__init__()
        self.e, self.P = o["expand"] * d, o["head_dim"]
        self.N, self.G = o["state_size"], o["n_groups"]
        self.H, self.eps, self.chunk = self.e // self.P, eps, chunk["simple_gla"]
        bc = self.G * self.N
        self.in_proj = nn.Linear(d, 2 * self.e + 2 * bc + self.H, bias=False)
        self.conv = Conv(self.e + 2 * bc, o["conv_size"], bias=True)
        self.A_log, self.dt_bias, self.D = (nn.Parameter(torch.zeros(self.H)) for _ in range(3))
        self.norm_weight = nn.Parameter(torch.ones(self.e))
        self.out_proj = nn.Linear(self.e, d, bias=False)

    def forward(self, x, state, mask):
        B, T, _ = x.shape
        H, P, G, N, e = self.H, self.P, self.G, self.N, self.e
        conv_state, h = (None, None) if state is None else state
        z, xbc, dt = self.in_proj(x).split([e, e + 2 * G * N, H], dim=-1)
        xbc, conv_state = self.conv(xbc, conv_state, mask)
        acc = acc_dtype(x)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        g = dt * -self.A_log.to(acc).exp()
        xs, b, c = xbc.split([e, G * N, G * N], dim=-1)
        xs = xs.view(B, T, H, P)
        v = _masked((xs.to(acc) * dt[..., None]).to(x.dtype), mask)
        k = b.view(B, T, G, N).repeat_interleave(H // G, dim=2)
        q = c.view(B, T, G, N).repeat_interleave(H // G, dim=2)
        y, h = linear_attention(q, k, v, g[..., None], 1.0, h, self.chunk)
        y = (y.to(acc) + self.D.to(acc)[:, None] * xs.to(acc)).reshape(B, T, e)
        out = rms_norm(y, self.norm_weight, self.eps, z.to(acc), G, norm_before_gate=False)
        return self.out_proj(out.to(x.dtype)), (conv_state, h)


class HGRN2(nn.Module):
    def __init__(self, o, d, H, eps, layer_idx, chunk):
        super().__init__()
        self.H, self.key_width, self.layer_idx = H, o["expand_ratio"], layer_idx
        self.chunk, forget = chunk["gla"], H * self.key_width
        self.q_proj = nn.Linear(d, forget, bias=False)
        self.f_proj = nn.Linear(d, forget, bias=False)
        self.i_proj = nn.Linear(d, d, bias=False)
        self.g_norm, self.o_proj = Norm(d, eps), nn.Linear(d, d, bias=False)
        if layer_idx > 0:
            self.lower_bound_logit = nn.Parameter(torch.zeros(forget))

    def forward(self, x, state, mask):
        B, T, d = x.shape
        q = F.silu(self.q_proj(x)).view(B, T, self.H, -1)
        v = self.i_proj(x).view(B, T, self.H, -1)
        f = self.f_proj(x).to(acc_dtype(x))
        if self.layer_idx == 0:
            g = F.logsigmoid(f)
        else:
            theta = self.lower_bound_logit.to(f.dtype)
            g = torch.logaddexp(F.logsigmoid(theta), F.logsigmoid(-theta) + F.logsigmoid(f))
        g = g.view(B, T, self.H, -1)
        k = _masked((-torch.expm1(g)).to(x.dtype), mask)
        o, state = linear_attention(q, k, v, g, self.key_width**-0.5, state, self.chunk)
        return self.o_proj(self.g_norm(o.reshape(B, T, d))), state


class GatedDeltaNet(nn.Module):
    def __init__(self, o, d, H, eps, layer_idx, chunk):
        super().__init__()
        self.H, self.K = H, o["head_dim"] or d // H
        self.V, n = round(self.K * o["expand_v"]), o["num_householder"]
        self.n, self.forget, self.neg = n, o["use_forget_gate"], o["allow_neg_eigval"]
        self.chunk = chunk["delta"]
        key, value = H * self.K, H * self.V
        self.q_proj = nn.Linear(d, key, bias=False)
        self.k_proj = nn.Linear(d, n * key, bias=False)
        self.v_proj = nn.Linear(d, n * value, bias=False)
        self.b_proj = nn.Linear(d, n * H, bias=False)
        size = o["conv_size"]
        self.q_conv, self.k_conv = Conv(key, size), Conv(n * key, size)
        self.v_conv = Conv(n * value, size)
        if self.forget:
            self.a_proj = nn.Linear(d, H, bias=False)
            self.A_log, self.dt_bias = nn.Parameter(torch.zeros(H)), nn.Parameter(torch.zeros(H))
        self.g_proj = nn.Linear(d, value, bias=False)
        self.o_norm, self.o_proj = Norm(self.V, eps), nn.Linear(value, d, bias=False)

    def forward(self, x, state, mask):
        B, T, _ = x.shape
        H, K, V, n = self.H, self.K, self.V, self.n
        cq, ck, cv, S = (None,) * 4 if state is None else state
        q, cq = self.q_conv(self.q_proj(x), cq, mask)
        k, ck = self.k_conv(self.k_proj(x), ck, mask)
        v, cv = self.v_conv(self.v_proj(x), cv, mask)
        q, k = l2_normalize(q.view(B, T, H, K)), l2_normalize(k.view(B, T, n, H, K))
        v = v.view(B, T, n, H, V)
        acc = acc_dtype(x)
        beta = _masked(torch.sigmoid(self.b_proj(x).to(acc)).view(B, T, n, H), mask)
        beta = 2 * beta if self.neg else beta
        g = x.new_zeros(B, T, H, dtype=acc)
        if self.forget:
            dt = F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))
            g = -self.A_log.to(acc).exp() * dt
        if n == 1:
            o, S = delta_rule(q, k[:, :, 0], v[:, :, 0], g, beta[:, :, 0], K**-0.5, S, self.chunk)
        else:
            o, S = delta_product(q, k, v, g, beta, K**-0.5, S, self.chunk)
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.flatten(-2)), (cq, ck, cv, S)


class MinRNN(nn.Module):
    """minGRU (`lstm=False`) and minLSTM."""

    def __init__(self, o, d, H, eps, layer_idx, chunk, lstm=False):
        super().__init__()
        self.hidden, self.lstm, self.chunk = max(1, round(o["expand"] * d)), lstm, chunk["scan"]
        self.conv = Conv(d, o["conv_size"], activation=None) if o["conv_size"] else None
        self.in_proj = nn.Linear(d, (2 + lstm) * self.hidden)
        self.out_proj = nn.Linear(self.hidden, d)

    def forward(self, x, state, mask):
        conv_state, h0 = (None, None) if state is None else state
        u = x
        if self.conv is not None:
            c, conv_state = self.conv(x, conv_state, mask)
            u = x + c
        h_tilde, logits = self.in_proj(u).to(acc_dtype(x)).split(
            [self.hidden, (1 + self.lstm) * self.hidden], dim=-1)  # fmt: skip
        if self.lstm:
            f_logit, i_logit = logits.chunk(2, dim=-1)
            diff = F.logsigmoid(f_logit) - F.logsigmoid(i_logit)
            a, w = torch.sigmoid(diff), torch.sigmoid(-diff)
        else:
            a, w = torch.sigmoid(-logits), torch.sigmoid(logits)
        h, h_last = elementwise_scan(a, _masked(w * h_tilde, mask), h0, self.chunk)
        return self.out_proj(h.to(x.dtype)), (conv_state, h_last)


class RGLRU(nn.Module):
    def __init__(self, o, d, H, eps, layer_idx, chunk):
        super().__init__()
        self.H, self.c, self.chunk = H, o["c"], chunk["scan"]
        width = H * max(1, round(o["expand"] * d / H))
        block = width // H
        self.gate_proj, self.in_proj = nn.Linear(d, width), nn.Linear(d, width)
        self.conv = Conv(width, o["conv_size"], bias=True, activation=None)
        self.w_a, self.w_x = (nn.Parameter(torch.zeros(H, block, block)) for _ in range(2))
        self.b_a, self.b_x = (nn.Parameter(torch.zeros(H, block)) for _ in range(2))
        self.Lambda = nn.Parameter(torch.zeros(width))
        self.out_proj = nn.Linear(width, d)

    def forward(self, x, state, mask):
        B, T, _ = x.shape
        conv_state, h0 = (None, None) if state is None else state
        g = F.gelu(self.gate_proj(x), approximate="tanh")
        u, conv_state = self.conv(self.in_proj(x), conv_state, mask)
        acc = acc_dtype(u)
        uf = u.to(acc)
        blocks = uf.unflatten(-1, (self.H, -1))

        def gate(w, b):  # block-diagonal: blocks [B, T, H, K] @ w [H, K, K] + b [H, K]
            return (torch.einsum("bthi,hij->bthj", blocks, w.to(acc)) + b.to(acc)).flatten(-2)

        r, i = torch.sigmoid(gate(self.w_a, self.b_a)), torch.sigmoid(gate(self.w_x, self.b_x))
        log_a = -self.c * F.softplus(-self.Lambda.to(acc)) * r
        m = (-torch.expm1(2 * log_a)).sqrt()
        if h0 is None:  # m = 1 at every row's first real token
            real = torch.ones(B, T, dtype=torch.long, device=x.device)
            real = real if mask is None else mask.long()
            first = (real.cumsum(1) == 1) & (real == 1)
            m = torch.where(first[..., None], torch.ones_like(m), m)
        h, h_last = elementwise_scan(log_a.exp(), _masked(m * i * uf, mask), h0, self.chunk)
        return self.out_proj(g * h.to(x.dtype)), (conv_state, h_last)


class Attention(nn.Module):
    """Softmax attention with rotary positions; `window` set: sliding-window attention (each
    query sees its last `window` tokens, itself included). State: the keys and values of the
    past tokens (the last window - 1 for a window), their positions (-1: padding) and the count
    of real tokens per row."""

    def __init__(self, o, d, H, eps, layer_idx, chunk, window=None):
        super().__init__()
        self.H, self.D, self.theta, self.window = H, d // H, o["rope_theta"], window
        self.qkv, self.o_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x, state, mask):
        B, T, _ = x.shape
        k0, v0, kpos0, past = (None,) * 4 if state is None else state
        pos, seen = _positions(B, T, past, mask, x.device)
        q, k, v = self.qkv(x).view(B, T, 3, self.H, self.D).unbind(2)
        q = apply_rope(q, pos, self.theta).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k, pos, self.theta).transpose(1, 2)
        v = v.transpose(1, 2)
        kpos = pos if mask is None else torch.where(mask, pos, -1)
        if state is None and mask is None and self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if state is not None:
                k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
                kpos = torch.cat([kpos0, kpos], 1)
            qpos = pos[:, :, None]
            see = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos)  # (B, T, L)
            if self.window is not None:
                see = see & (qpos - kpos[:, None, :] < self.window)
            if mask is not None:  # a padding query sees itself only (its output is unused)
                own = torch.zeros_like(see)
                own[:, :, k.shape[2] - T :] = torch.eye(T, dtype=torch.bool, device=x.device)
                see = torch.where(mask[:, :, None], see, own)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=see[:, None])
        if self.window is not None:
            drop = k.shape[2] - min(self.window - 1, k.shape[2])  # keep the last window - 1
            k, v, kpos = k[:, :, drop:], v[:, :, drop:], kpos[:, drop:]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), (k, v, kpos, seen)


def _swa(o, d, H, eps, layer_idx, chunk):
    return Attention(o, d, H, eps, layer_idx, chunk, window=o["window"])


MIXERS = {
    "gla": GLA,
    "retnet": RetNet,
    "mamba2": Mamba2,
    "hgrn2": HGRN2,
    "gated_deltanet": GatedDeltaNet,
    "mingru": MinRNN,
    "minlstm": lambda *args: MinRNN(*args, lstm=True),
    "rglru": RGLRU,
    "attn": Attention,
    "swa": _swa,
}
"""Mixer name (rnnscale's `model.mixer_pattern`) -> `cls(options, d_model, num_heads, norm_eps,
layer_idx, chunk_sizes)`."""
