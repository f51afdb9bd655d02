"""RetNet and Mamba-2 against the papers' equations written out as float64 step loops, the
paper's retention decays, and Mamba-2's initialisation and option errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_mixers import TINY_KERNELS

from rnnscale.train.config import Mamba2Section, RetNetSection, from_dict
from rnnscale.train.model.layers import MixerDims, apply_rope
from rnnscale.train.model.mamba2 import Mamba2
from rnnscale.train.model.retnet import MultiScaleRetention, retention_log_decays

DIMS = MixerDims(
    d_model=32,
    num_heads=4,
    norm_eps=1e-6,
    layer_idx=0,
    num_layers=1,
    kernels=from_dict({"kernels": TINY_KERNELS}).kernels,
)  # C = 8
# (atol, rtol) of each comparison against the float64 loops, and why
TOL = {
    "state": (1e-10, 1e-10),  # float64 end to end: only summation order differs
    "output": (1e-6, 1e-5),  # kernels.norm computes its RMS in float32 even for float64 inputs
}


def mamba2(**options):
    torch.manual_seed(0)
    cfg = Mamba2Section(**{"head_dim": 8, "state_size": 16, **options})
    m = Mamba2(cfg, DIMS).double()
    with torch.no_grad():  # move D and the norm weight off 1 so a dropped term shows
        m.D.uniform_(0.5, 1.5)
        m.norm_weight.uniform_(0.5, 1.5)
    return m


def mamba2_loop(m, u):
    """Mamba-2 of `u [B, T, d_model]` one token at a time, straight from the equations."""
    B, T, _ = u.shape
    e, H, P, G, N = m.d_inner, m.num_heads, m.head_dim, m.n_groups, m.state_size
    z, xbc, dt = m.in_proj(u).split([e, e + 2 * G * N, H], dim=-1)
    W = m.conv.weight.shape[1]
    padded = F.pad(xbc, (0, 0, W - 1, 0))  # (B, W - 1 + T, e + 2GN), zeros before the start
    A = -m.A_log.exp()  # (H,)
    h = u.new_zeros(B, H, N, P)
    ys = []
    for t in range(T):
        window = padded[:, t : t + W]  # (B, W, e + 2GN)
        conv = F.silu((window * m.conv.weight.T).sum(1) + m.conv.bias)
        x, b, c = conv.split([e, G * N, G * N], dim=-1)
        x = x.view(B, H, P)
        step = F.softplus(dt[:, t] + m.dt_bias)  # (B, H)
        y = torch.empty(B, H, P, dtype=u.dtype)
        for i in range(H):
            g = i // (H // G)
            b_t, c_t = b.view(B, G, N)[:, g], c.view(B, G, N)[:, g]  # (B, N)
            decay = torch.exp(step[:, i] * A[i])[:, None, None]
            h[:, i] = decay * h[:, i] + step[:, i, None, None] * b_t[:, :, None] * x[:, i, None]
            y[:, i] = torch.einsum("bn,bnp->bp", c_t, h[:, i]) + m.D[i] * x[:, i]
        ys.append(y.reshape(B, e) * F.silu(z[:, t]))
    y = torch.stack(ys, 1).unflatten(-1, (G, -1))  # (B, T, G, e / G)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + m.eps)
    return m.out_proj(y.flatten(-2) * m.norm_weight), h


@pytest.mark.parametrize("T", [1, 15, 23])
@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_matches_the_ssm_step_loop(T, n_groups):
    m = mamba2(n_groups=n_groups)
    u = torch.randn(2, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, h = mamba2_loop(m, u)
        got, (_, state) = m(u)
        split = T // 2 + 1  # the same through a carried state
        first, carried = m(u[:, :split])
        second, (_, resumed) = (
            m(u[:, split:], state=carried) if split < T else (first[:, :0], carried)
        )
    atol, rtol = TOL["state"]
    torch.testing.assert_close(state, h, atol=atol, rtol=rtol)
    torch.testing.assert_close(resumed, h, atol=atol, rtol=rtol)
    atol, rtol = TOL["output"]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(torch.cat([first, second], 1), want, atol=atol, rtol=rtol)


def test_mamba2_initialisation():
    cfg = Mamba2Section(head_dim=8, state_size=16, dt_min=0.01, dt_max=0.05, a_init_max=4.0)
    m = Mamba2(cfg, DIMS)
    A = m.A_log.exp()
    dt = F.softplus(m.dt_bias)
    assert m.num_heads == 2 * 32 // 8
    assert ((A >= 1) & (A <= 4)).all() and ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    assert (m.D == 1).all()
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.dt_bias, m.D))


def test_mamba2_head_dim_must_divide_d_inner():
    with pytest.raises(ValueError, match="model.mamba2.head_dim"):
        Mamba2(Mamba2Section(head_dim=24), DIMS)


def test_retnet_decays_are_the_papers():
    """gamma = 1 - 2^(-5 - arange(0, h)) (Sun et al. 2023, section 2.2)."""
    gamma = retention_log_decays(4).exp()
    want = torch.tensor([31 / 32, 63 / 64, 127 / 128, 255 / 256], dtype=torch.float64)
    torch.testing.assert_close(gamma, want, atol=1e-15, rtol=0)


def test_retnet_state_decays_by_gamma_per_head():
    """A zero input adds nothing (no biases), so the state of head h only shrinks by gamma_h."""
    m = MultiScaleRetention(RetNetSection(), DIMS).double()
    x = torch.randn(1, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, (S, pos) = m(x)
        _, (S_next, pos_next) = m(torch.zeros(1, 3, 32, dtype=torch.float64), state=(S, pos))
    gamma = torch.tensor([31 / 32, 63 / 64, 127 / 128, 255 / 256], dtype=torch.float64)
    torch.testing.assert_close(S_next, gamma[:, None, None] ** 3 * S, atol=1e-12, rtol=1e-12)
    assert pos.tolist() == [5] and pos_next.tolist() == [8]


def test_retnet_matches_the_retention_step_loop():
    m = MultiScaleRetention(RetNetSection(), DIMS).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    B, T, H = 2, 19, 4
    with torch.no_grad():
        got, (state, _) = m(x)
        pos = torch.arange(T).expand(B, T)
        q = apply_rope(m.q_proj(x).view(B, T, H, -1), pos, 10000.0)  # (B, T, H, K)
        k = apply_rope(m.k_proj(x).view(B, T, H, -1), pos, 10000.0)
        v = m.v_proj(x).view(B, T, H, -1)  # (B, T, H, V)
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
        S = x.new_zeros(B, H, q.shape[-1], v.shape[-1])
        outs = []
        for t in range(T):
            S = gamma[:, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) / math.sqrt(q.shape[-1]))
        o = torch.stack(outs, 1)  # (B, T, H, V)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.g_norm.weight
        o = o * F.silu(m.g_proj(x).view(B, T, H, -1))
        want = m.o_proj(o.reshape(B, T, -1))
    torch.testing.assert_close(state, S, atol=TOL["state"][0], rtol=TOL["state"][1])
    atol, rtol = TOL["output"]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
