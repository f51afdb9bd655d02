"""Every scan family's chunkwise PyTorch path against its float64 step loop: outputs, final
state, the gradient of every input (gates and initial state included), packed documents,
odd lengths, non-power-of-two head sizes; and the one-step form against the chunkwise one."""

import pytest
import torch

from .families import FAMILIES

# Relative-RMS error allowed, one row per comparison, with its reason.
TOLERANCE = {
    # float64 on both sides: only the order of summation differs
    torch.float64: 1e-10,
    # fp32 inputs and arithmetic against the float64 loop: rounding over T steps
    torch.float32: 1e-5,
    # bf16 inputs (8 bits of mantissa) rounded once on entry and once on exit; fp32 inside
    torch.bfloat16: 2e-2,
}


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS of the difference over the RMS of the reference; where the reference is exactly zero
    (a gradient that must vanish, e.g. of g at T = 1) the plain RMS of the difference."""
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    scale = want.pow(2).mean().sqrt().item()
    return (got - want).pow(2).mean().sqrt().item() / (scale if scale > 0 else 1.0)


def assert_close(name, got, want, dtype):
    err = rel_rms(got, want)
    assert err <= TOLERANCE[dtype], f"{name}: relative RMS error {err:.2e} > {TOLERANCE[dtype]}"


def run_case(fam, B, T, H, K, V, dtype, with_state, cu_seqlens=None, chunk_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = fam.make(B, T, H, K, V, gen)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if with_state:
        base.append(torch.randn(fam.state_shape(N, H, K, V), generator=gen, dtype=torch.float64))
    ref_in = [x.clone().requires_grad_() for x in base]
    # the fast path gets the inputs rounded to dtype; the reference sees the same rounded values
    fast_in = [x.to(dtype).requires_grad_() for x in base]
    ref_in = [x.to(dtype).double().requires_grad_() for x in base]
    n_args = len(base) - with_state

    def call(fn, xs, **kw):
        state = xs[n_args] if with_state else None
        return fn(
            *xs[:n_args], initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens, **kw
        )

    o_ref, s_ref = call(fam.naive, ref_in)
    o, s = call(fam.chunk, fast_in, chunk_size=chunk_size)
    assert o.dtype == dtype
    assert s.shape == s_ref.shape
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    loss_ref = (o_ref * do).sum() + (s_ref * ds).sum()
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    grads_ref = torch.autograd.grad(loss_ref, ref_in)
    grads = torch.autograd.grad(loss, fast_in)
    assert_close("output", o, o_ref, dtype)
    assert_close("final state", s, s_ref, dtype)
    names = [f"input {i}" for i in range(n_args)] + (["initial_state"] if with_state else [])
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        assert_close(f"gradient of {name}", got, want, dtype)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("T", [1, 15, 63, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_step_loop(fam, T, dtype):
    run_case(fam, B=2, T=T, H=2, K=12, V=20, dtype=dtype, with_state=False)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("K,V", [(8, 8), (12, 20), (16, 6)])
def test_initial_state_and_head_sizes(fam, K, V):
    run_case(fam, B=2, T=37, H=3, K=K, V=V, dtype=torch.float32, with_state=True)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_packed_documents(fam, chunk_size):
    # uneven documents, one empty, one of a single token, one longer than a chunk
    cu = torch.tensor([0, 5, 22, 22, 23, 63], dtype=torch.int32)
    run_case(
        fam,
        B=1,
        T=63,
        H=2,
        K=8,
        V=12,
        dtype=torch.float64,
        with_state=True,
        cu_seqlens=cu,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_packed_equals_separate_runs(fam):
    lengths = [9, 30, 1, 17]
    gen = torch.Generator().manual_seed(3)
    xs = fam.make(1, sum(lengths), 2, 8, 8, gen)
    cu = torch.tensor([0, 9, 39, 40, 57], dtype=torch.int32)
    o, s = fam.chunk(*xs, output_final_state=True, cu_seqlens=cu)
    for n, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = fam.chunk(*[x[:, t0:t1] for x in xs], output_final_state=True)
        assert_close(f"document {n}", o[:, t0:t1], o_n, torch.float64)
        assert_close(f"document {n} state", s[n : n + 1], s_n, torch.float64)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_bf16_inputs(fam):
    run_case(fam, B=2, T=50, H=2, K=16, V=16, dtype=torch.bfloat16, with_state=False)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_one_step_form_continues_a_chunked_prefix(fam):
    """Generation: prefill 40 tokens chunkwise, then step token by token; the outputs are the
    chunkwise outputs of the whole sequence."""
    gen = torch.Generator().manual_seed(5)
    xs = fam.make(2, 52, 2, 8, 12, gen)
    o_full, s_full = fam.chunk(*xs, output_final_state=True)
    _, state = fam.chunk(*[x[:, :40] for x in xs], output_final_state=True)
    K = xs[0].shape[-1]
    extra = (K**-0.5,) if fam.has_scale else ()
    for t in range(40, 52):
        o_t, state = fam.step(*[x[:, t] for x in xs], state, *extra)
        assert_close(f"token {t}", o_t, o_full[:, t], torch.float64)
    assert_close("final state", state, s_full, torch.float64)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_bad_input_names_the_argument(fam):
    gen = torch.Generator().manual_seed(0)
    xs = fam.make(2, 10, 2, 4, 4, gen)
    first = "a" if fam.name == "scan" else "q"
    with pytest.raises(ValueError, match=r"^cu_seqlens needs a packed batch with B = 1"):
        fam.chunk(*xs, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))
    one = [x[:1] for x in xs]
    with pytest.raises(ValueError, match=r"^cu_seqlens must rise from 0 to T = 10"):
        fam.chunk(*one, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^cu_seqlens must not decrease"):
        fam.chunk(*one, cu_seqlens=torch.tensor([0, 6, 3, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^cu_seqlens must hold integers"):
        fam.chunk(*one, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"^initial_state must have shape"):
        fam.chunk(*xs, initial_state=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer"):
        fam.chunk(*xs, chunk_size=0)
    bad = list(xs)
    bad[-1] = bad[-1][:, :7]
    last = {"gla": "g", "simple_gla": "g", "delta": "beta", "scan": "b"}[fam.name]
    if fam.name == "scan":  # b gives the shape; a wrong a is what gets named
        bad = [xs[0][:, :7], xs[1]]
        last = "a"
    with pytest.raises(ValueError, match=rf"^{last} must have shape"):
        fam.chunk(*bad)
    ints = list(xs)
    ints[0] = ints[0].long()
    with pytest.raises(ValueError, match=rf"^{first} must be a floating-point tensor"):
        fam.chunk(*ints)
