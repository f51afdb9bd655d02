"""Numerics specific to per-key decay."""

import pytest
import torch
import torch.nn.functional as F

from rnnscale.kernels.gla import chunk_gla, chunk_torch, naive_recurrent_gla

from .test_families import assert_close


def test_strong_decay_does_not_overflow():
    # in-chunk cumulative gates far below -80: the factorised form would give inf/nan in fp32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    g = 40 * F.logsigmoid(torch.randn(1, 64, 2, 8, generator=gen, dtype=torch.float64))
    o, s = chunk_gla(*(x.float() for x in (q, k, v, g)), output_final_state=True, chunk_size=64)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), o_ref, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(s.double(), s_ref, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_factorised_and_pairwise_chunks_agree_with_the_loop(dtype, chunk_size, monkeypatch):
    """Head 0 decays hard (its chunks span far more than SAFE_SPAN: pairwise scores), head 1
    gently (factorised scores); outputs, state and every gradient against the float64 loop."""
    calls = []
    original = chunk_torch.PairwiseScores.apply
    monkeypatch.setattr(
        chunk_torch.PairwiseScores, "apply", lambda *a: calls.append(1) or original(*a)
    )
    gen = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 100, 2, 8, 6
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    g = F.logsigmoid(r(B, T, H, K) + 2)
    g[:, :, 0] = g[:, :, 0] * 30 - 5  # about -8 per step: a 16-token chunk spans ~120
    xs = [r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), g, r(B, H, K, V)]
    ref = [x.to(dtype).double().requires_grad_() for x in xs]
    fast = [x.to(dtype).requires_grad_() for x in xs]
    o_ref, s_ref = naive_recurrent_gla(*ref[:4], initial_state=ref[4], output_final_state=True)
    o, s = chunk_gla(
        *fast[:4], initial_state=fast[4], output_final_state=True, chunk_size=chunk_size,
        backend="torch",
    )  # fmt: skip
    assert calls, "the strongly decaying head should take the pairwise path"
    do, ds = r(*o.shape), r(*s.shape)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref)
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), fast)
    assert_close("output", o, o_ref, dtype)
    assert_close("final state", s, s_ref, dtype)
    for name, got, want in zip("q k v g initial_state".split(), grads, grads_ref, strict=True):
        assert torch.isfinite(got).all(), name
        assert_close(f"gradient of {name}", got, want, dtype)
