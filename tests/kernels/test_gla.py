"""chunk_gla (PyTorch chunkwise) against the float64 step loop: outputs, final state, every
input gradient, initial state, packed documents, odd lengths, non-power-of-two head sizes."""

import pytest
import torch
import torch.nn.functional as F

from rnnscale.kernels.gla import chunk_gla, naive_recurrent_gla

# Tolerances, one row per case, each with its reason.
TOL = {
    # both sides in float64: only summation order differs
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    # the chunk path in fp32 against the float64 loop: fp32 rounding over T steps
    torch.float32: dict(atol=2e-4, rtol=2e-3),
}


def make_inputs(B, T, H, K, V, dtype, seed=0, gate_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)) * gate_scale
    return [x.to(dtype).requires_grad_() for x in (q, k, v, g)]


def grads(out, state, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    ds = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    return torch.autograd.grad((out * do).sum() + (state * ds).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 15, 63, 100])
@pytest.mark.parametrize("K,V", [(8, 8), (12, 20)])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_step_loop(dtype, T, K, V, with_state):
    B, H = 2, 3
    q, k, v, g = make_inputs(B, T, H, K, V, dtype)
    h0 = None
    inputs = [q, k, v, g]
    if with_state:
        h0 = torch.randn(B, H, K, V, dtype=torch.float64).to(dtype).requires_grad_()
        inputs.append(h0)
    ref = make_inputs(B, T, H, K, V, torch.float64)
    ref_h0 = None if h0 is None else h0.detach().double().requires_grad_()
    ref_inputs = ref + ([ref_h0] if with_state else [])
    o_ref, s_ref = naive_recurrent_gla(*ref, initial_state=ref_h0, output_final_state=True)
    o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16)
    tol = TOL[dtype]
    assert o.dtype == dtype
    torch.testing.assert_close(o.double(), o_ref, **tol)
    torch.testing.assert_close(s.double(), s_ref, **tol)
    for got, want in zip(grads(o, s, inputs), grads(o_ref, s_ref, ref_inputs), strict=True):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_packed_documents_match_separate_sequences(chunk_size):
    lengths = [5, 17, 1, 40]
    H, K, V = 2, 8, 6
    T = sum(lengths)
    q, k, v, g = make_inputs(1, T, H, K, V, torch.float64)
    h0 = torch.randn(len(lengths), H, K, V, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    o, s = chunk_gla(
        q,
        k,
        v,
        g,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=cu,
        chunk_size=chunk_size,
    )
    o_ref, s_ref = naive_recurrent_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu
    )
    torch.testing.assert_close(o, o_ref, **TOL[torch.float64])
    torch.testing.assert_close(s, s_ref, **TOL[torch.float64])
    inputs = [q, k, v, g, h0]
    for got, want in zip(grads(o, s, inputs), grads(o_ref, s_ref, inputs), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    # each document on its own, as a batch of one: the state really resets at the boundaries
    for n, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = slice(t0, t1)
        o_n, s_n = naive_recurrent_gla(
            q[:, part],
            k[:, part],
            v[:, part],
            g[:, part],
            initial_state=h0[n : n + 1],
            output_final_state=True,
        )
        torch.testing.assert_close(o[:, part], o_n, **TOL[torch.float64])
        torch.testing.assert_close(s[n : n + 1], s_n, **TOL[torch.float64])


def test_strong_decay_does_not_overflow():
    # in-chunk cumulative gates far below -80: the factorised form would give inf/nan in fp32
    q, k, v, g = make_inputs(1, 64, 2, 8, 8, torch.float32, gate_scale=40.0)
    o, s = chunk_gla(q, k, v, g, output_final_state=True, chunk_size=64)
    ref = make_inputs(1, 64, 2, 8, 8, torch.float64, gate_scale=40.0)
    o_ref, s_ref = naive_recurrent_gla(*ref, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), o_ref, **TOL[torch.float32])
    torch.testing.assert_close(s.double(), s_ref, **TOL[torch.float32])


def test_state_carries_across_calls():
    q, k, v, g = make_inputs(2, 50, 2, 8, 8, torch.float64)
    o_full, s_full = chunk_gla(q, k, v, g, output_final_state=True)
    o1, s1 = chunk_gla(q[:, :23], k[:, :23], v[:, :23], g[:, :23], output_final_state=True)
    o2, s2 = chunk_gla(
        q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], initial_state=s1, output_final_state=True
    )
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, **TOL[torch.float64])
    torch.testing.assert_close(s2, s_full, **TOL[torch.float64])


def test_bad_cu_seqlens_are_refused():
    q, k, v, g = make_inputs(2, 10, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="B = 1"):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise from 0"):
        chunk_gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
