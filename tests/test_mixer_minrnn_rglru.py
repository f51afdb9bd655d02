"""minGRU, minLSTM and Griffin's RG-LRU block against float64 step loops of their equations,
written here from the papers through the modules' own parameters (outputs, final states,
parameter gradients; rows, packed documents, a carried state), and their initialisation."""

import math

import pytest
import torch
from test_mixers import TINY_KERNELS

from rnnscale.train.config import MinRNNSection, RGLRUSection, from_dict
from rnnscale.train.model import MixerDims, build_model
from rnnscale.train.model.minrnn import MinGRU, MinLSTM
from rnnscale.train.model.rglru import RGLRUBlock

TOL = {  # dtype -> (atol = rtol, reason)
    torch.float64: (1e-10, "chunked scan vs step loop, exp(log a) vs a^(c r): rounding only"),
}
DIMS = MixerDims(
    d_model=24,
    num_heads=3,
    norm_eps=1e-6,
    layer_idx=0,
    num_layers=1,
    kernels=from_dict({"kernels": TINY_KERNELS}).kernels,
)  # C = 8
CASES = {  # name -> (batch rows, time, cu_seqlens)
    "one-token": (2, 1, None),
    "rows": (2, 15, None),
    "long-rows": (1, 63, None),
    "packed": (1, 40, [0, 5, 6, 23, 40]),
    "packed-empty-docs": (1, 12, [0, 0, 5, 5, 12, 12]),
}


def sigmoid(v):
    return 1 / (1 + torch.exp(-v))


def causal_conv(v, weight, t, t0):
    """Depthwise causal conv at time t of one sequence starting at t0: weight [C, W]."""
    W = weight.shape[1]
    taps = [v[s] if s >= t0 else torch.zeros_like(v[t]) for s in range(t - W + 1, t + 1)]
    return sum(weight[:, j] * taps[j] for j in range(W))


def minrnn_reference(m, x, spans, lstm: bool):
    D = m.hidden
    y, finals = torch.zeros_like(x), []
    for b, t0, t1 in spans:
        h = x.new_zeros(D)
        for t in range(t0, t1):
            u = x[b, t]
            if m.conv is not None:
                u = u + causal_conv(x[b], m.conv.weight, t, t0)
            p = m.in_proj.weight @ u + m.in_proj.bias
            h_tilde = p[:D]
            if lstm:
                f, i = sigmoid(p[D : 2 * D]), sigmoid(p[2 * D :])
                h = f / (f + i) * h + i / (f + i) * h_tilde
            else:
                z = sigmoid(p[D:])
                h = (1 - z) * h + z * h_tilde
            y[b, t] = m.out_proj.weight @ h + m.out_proj.bias
        finals.append(h)
    return y, torch.stack(finals)


def gelu_tanh(v):
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


def rglru_reference(m, x, spans):
    H = m.num_heads
    y, finals = torch.zeros_like(x), []
    for b, t0, t1 in spans:
        v = x[b] @ m.in_proj.weight.T + m.in_proj.bias  # (T, D)
        h, first = x.new_zeros(m.width), True
        for t in range(t0, t1):
            g = gelu_tanh(m.gate_proj.weight @ x[b, t] + m.gate_proj.bias)
            u = causal_conv(v, m.conv.weight, t, t0) + m.conv.bias
            uh = u.view(H, -1)
            r = torch.cat([sigmoid(uh[k] @ m.w_a[k] + m.b_a[k]) for k in range(H)])
            i = torch.cat([sigmoid(uh[k] @ m.w_x[k] + m.b_x[k]) for k in range(H)])
            a = sigmoid(m.Lambda) ** (m.c * r)
            scale = 1.0 if first else torch.sqrt(1 - a**2)  # Griffin: no normalisation at t = 0
            h, first = a * h + scale * (i * u), False
            y[b, t] = m.out_proj.weight @ (g * h) + m.out_proj.bias
        finals.append(h)
    return y, torch.stack(finals)


def build(name, **options):
    torch.manual_seed(0)
    if name == "rglru":
        m = RGLRUBlock(RGLRUSection(**options), DIMS)
    else:
        cls = MinLSTM if name == "minlstm" else MinGRU
        m = cls(MinRNNSection(expand=1.5, **options), DIMS)
    m = m.double()
    with torch.no_grad():  # move every parameter off its init (zero biases hide bias bugs)
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def reference(name, m, x, spans):
    if name == "rglru":
        return rglru_reference(m, x, spans)
    return minrnn_reference(m, x, spans, lstm=name == "minlstm")


def spans_of(B, T, cu):
    if cu is None:
        return [(b, 0, T) for b in range(B)]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


MIXER_CASES = [("mingru", {}), ("mingru", {"conv_size": 0}), ("minlstm", {}), ("rglru", {})]
MIXER_IDS = ["mingru", "mingru-noconv", "minlstm", "rglru"]


@pytest.mark.parametrize("name,options", MIXER_CASES, ids=MIXER_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_step_loop_of_its_equations(name, options, case):
    B, T, cu = CASES[case]
    m = build(name, **options)
    x = torch.randn(
        B, T, DIMS.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    y, (_, h) = m(x, cu_seqlens=cu_t)
    y_ref, h_ref = reference(name, m, x, spans_of(B, T, cu))
    tol, _ = TOL[torch.float64]
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(h, h_ref, atol=tol, rtol=tol)

    probe = torch.randn_like(y)
    params = list(m.parameters())
    grads = torch.autograd.grad((y * probe).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), params)
    for (pname, _), g, g_ref in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=tol, rtol=tol, msg=lambda s, n=pname: f"{n}: {s}")


@pytest.mark.parametrize("name,options", MIXER_CASES, ids=MIXER_IDS)
def test_a_carried_state_continues_the_step_loop(name, options):
    """A prefix, then the rest from its state (conv tail and h): the whole sequence's loop."""
    m = build(name, **options)
    x = torch.randn(
        2, 21, DIMS.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        first, state = m(x[:, :9])
        second, state = m(x[:, 9:10], state=state)
        rest, _ = m(x[:, 10:], state=state)
        y_ref, _ = reference(name, m, x, spans_of(2, 21, None))
    tol, _ = TOL[torch.float64]
    torch.testing.assert_close(torch.cat([first, second, rest], 1), y_ref, atol=tol, rtol=tol)


def tiny_model(name, **options):
    cfg = {"d_model": 96, "num_heads": 4, "num_layers": 1, "mixer_pattern": [name], name: options}
    torch.manual_seed(0)
    return build_model(from_dict({"model": cfg}).model)


@pytest.mark.parametrize("a_min,a_max,c", [(0.9, 0.999, 8.0), (0.5, 0.6, 2.0)])
def test_rglru_init_puts_a_to_the_c_uniform_in_its_range(a_min, a_max, c):
    mixer = tiny_model("rglru", a_min=a_min, a_max=a_max, c=c, expand=4.0).blocks[0].mixer
    a_c = torch.sigmoid(mixer.Lambda.double()) ** c  # (D,)
    span = a_max - a_min
    assert a_c.min() >= a_min - 1e-6 and a_c.max() <= a_max + 1e-6
    assert a_c.min() < a_min + 0.1 * span and a_c.max() > a_max - 0.1 * span  # spread out
    assert all(getattr(p, "_no_weight_decay", False) for p in (mixer.Lambda, mixer.b_a, mixer.b_x))
    assert not mixer.b_a.any() and not mixer.b_x.any()


def test_minlstm_normalised_gates_sum_to_one_at_init_and_when_both_underflow():
    mixer = tiny_model("minlstm").blocks[0].mixer
    x = torch.randn(2, 7, 96)
    logits = mixer.in_proj(x)[..., mixer.hidden :]
    forget, write = mixer.gates(logits)
    assert ((forget > 0) & (forget < 1)).all()
    torch.testing.assert_close(forget + write, torch.ones_like(forget), atol=1e-6, rtol=0)
    forget, write = mixer.gates(torch.full((1, 1, 2 * mixer.hidden), -200.0))  # f = i = 0 in fp32
    torch.testing.assert_close(forget, torch.full_like(forget, 0.5))
    torch.testing.assert_close(write, torch.full_like(write, 0.5))


def test_rglru_gradients_stay_finite_where_a_reaches_one():
    """r_t = 0 makes a_t = 1 and sqrt(1 - a_t^2) = 0, whose derivative is infinite: the capped
    square root keeps every gradient finite."""
    m = RGLRUBlock(RGLRUSection(), DIMS)
    with torch.no_grad():
        m.b_a.fill_(-1e4)
    x = torch.randn(2, 11, DIMS.d_model)
    y, _ = m(x)
    y.square().sum().backward()
    for pname, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), pname
