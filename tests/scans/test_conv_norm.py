"""Short convolution against its step-by-step definition; RMSNorm and gated RMSNorm against
their float64 formulas."""

import pytest
import torch
import torch.nn.functional as F

from rnnscale.kernels.conv import causal_conv1d, naive_causal_conv1d
from rnnscale.kernels.norm import gated_rms_norm, l2_normalize, rms_norm

from .test_families import assert_close


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_matches_step_loop(W, packed, with_state):
    gen = torch.Generator().manual_seed(W)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if packed:  # documents shorter than the window, empty, and long
        cu = torch.tensor([0, 2, 2, 3, 30], dtype=torch.int32)
        x, N = r(1, 30, 5), 4
    else:
        cu, x, N = None, r(3, 17, 5), 3
    weight, bias = r(5, W), r(5)
    h0 = r(N, 5, W - 1) if with_state else None
    inputs = [x, weight, bias] + ([h0] if with_state else [])
    inputs = [t.requires_grad_() for t in inputs]

    def call(fn):
        state = inputs[3] if with_state else None
        return fn(
            *inputs[:3],
            activation="silu",
            initial_state=state,
            output_final_state=True,
            cu_seqlens=cu,
        )

    y, s = call(causal_conv1d)
    y_ref, s_ref = call(naive_causal_conv1d)
    assert_close("output", y, y_ref, torch.float64)
    if W > 1:
        assert_close("final state", s, s_ref, torch.float64)
    assert s.shape == (N, 5, W - 1)
    loss = lambda y, s: (y * y_ref.detach()).sum() + s.sum()  # noqa: E731
    for i, (a, b) in enumerate(
        zip(
            torch.autograd.grad(loss(y, s), inputs),
            torch.autograd.grad(loss(y_ref, s_ref), inputs),
            strict=True,
        )
    ):
        assert_close(f"gradient of input {i}", a, b, torch.float64)


def test_short_conv_state_continues():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 25, 3, generator=gen), torch.randn(3, 4, generator=gen)
    y, _ = causal_conv1d(x, w)
    y1, s = causal_conv1d(x[:, :11], w, output_final_state=True)
    y2, _ = causal_conv1d(x[:, 11:], w, initial_state=s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


def test_short_conv_bad_input():
    x = torch.randn(1, 8, 3)
    with pytest.raises(ValueError, match=r"^weight must have shape"):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"^activation must be None or 'silu'"):
        causal_conv1d(x, torch.randn(3, 4), activation="relu")
    with pytest.raises(ValueError, match=r"^initial_state must have shape"):
        causal_conv1d(x, torch.randn(3, 4), initial_state=torch.zeros(1, 3, 2))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_norms_match_float64_formula(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(4, 7, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.rand(24, generator=gen, dtype=torch.float64) + 0.5
    ref = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    got = rms_norm(x.to(dtype), w.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, atol=tol * 4, rtol=tol)
    got = gated_rms_norm(x.to(dtype), gate.to(dtype), w.to(dtype))
    torch.testing.assert_close(got.double(), ref * F.silu(gate), atol=tol * 4, rtol=tol)
    with pytest.raises(ValueError, match=r"^gate must have the shape of x"):
        gated_rms_norm(x, gate[..., :3], w)
    with pytest.raises(ValueError, match=r"^weight must have shape \[24\]"):
        rms_norm(x, w[:3])


@pytest.mark.parametrize("groups,before", [(1, True), (2, True), (3, False)])
def test_norm_gradients_match_the_formulas(groups, before):
    """The norms' own backward against autograd of their float64 formulas (every input's
    gradient); and they keep the inputs and one scale per row and group, nothing of x's size."""
    from .test_chunk_autograd import saved_tensors

    gen = torch.Generator().manual_seed(groups)
    x, gate = (torch.randn(2, 5, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    x, gate, w = (t.requires_grad_() for t in (x, gate, w))

    def formula(x, gate, w):
        u = x if before else x * F.silu(gate)
        ug = u.unflatten(-1, (groups, -1))
        n = (ug / (ug.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).flatten(-2) * w
        return n * F.silu(gate) if before else n

    dy = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    got = gated_rms_norm(x, gate, w, groups=groups, norm_before_gate=before)
    want = formula(x, gate, w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, (x, gate, w), dy)
    for g, ref in zip(grads, torch.autograd.grad(want, (x, gate, w), dy)):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)
    plain = torch.autograd.grad(rms_norm(x, w), (x, w), dy)
    ref = torch.autograd.grad(x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w, (x, w), dy)
    for g, r in zip(plain, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    unit = torch.autograd.grad(l2_normalize(x), x, dy)[0]
    ref = torch.autograd.grad(x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt(), x, dy)[0]
    torch.testing.assert_close(unit, ref, rtol=1e-10, atol=1e-10)
    kept = saved_tensors(gated_rms_norm, x, gate, w, groups=groups, norm_before_gate=before)
    assert sum(t.numel() for t in kept) == 2 * x.numel() + w.numel() + 10 * groups, kept


def test_short_conv_keeps_its_input_not_its_windows():
    """Autograd of the gathered windows would keep W copies of the input, and the SiLU its
    input; the convolution keeps the input (with the carried states) and the tap indices."""
    from .test_chunk_autograd import saved_tensors

    x, w = torch.randn(2, 64, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    saved = saved_tensors(causal_conv1d, x, w, activation="silu")
    floats = sum(t.numel() for t in saved if t.is_floating_point())
    assert floats <= x.numel() + 2 * 3 * 8 + 8 + w.numel(), [t.shape for t in saved]
