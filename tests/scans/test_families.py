"""Every scan family's two fast paths, chunkwise PyTorch and Triton (on CPU in Triton's
interpreter, see tests/conftest.py), against its float64 step loop: outputs, final state, the
gradient of every input (gates and initial state included), packed documents, odd lengths,
non-power-of-two head sizes; and the one-step form against the chunkwise one.

The Triton path takes fp32, bf16 or fp16 inputs (and computes in fp32), so its cases run in fp32
and bf16; the interpreter runs every program in NumPy, so its shapes stay tiny."""

import pytest
import torch

from .families import FAMILIES, grouped_simple_gla

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


BACKENDS = ["torch", "triton"]


def run_case(
    fam,
    B,
    T,
    H,
    K,
    V,
    dtype,
    with_state,
    cu_seqlens=None,
    chunk_size=16,
    seed=0,
    backend="torch",
    device="cpu",
):
    gen = torch.Generator().manual_seed(seed)
    base = fam.make(B, T, H, K, V, gen)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if with_state:
        base.append(torch.randn(fam.state_shape(N, H, K, V), generator=gen, dtype=torch.float64))
    ref_in = [x.clone().requires_grad_() for x in base]
    # the fast path gets the inputs rounded to dtype; the reference sees the same rounded values
    fast_in = [x.to(dtype).to(device).requires_grad_() for x in base]
    ref_in = [x.to(dtype).double().requires_grad_() for x in base]
    n_args = len(base) - with_state

    def call(fn, xs, **kw):
        state = xs[n_args] if with_state else None
        return fn(
            *xs[:n_args], initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens, **kw
        )

    o_ref, s_ref = call(fam.naive, ref_in)
    fast_cu = None if cu_seqlens is None else cu_seqlens.to(device)
    state = fast_in[n_args] if with_state else None
    o, s = fam.chunk(
        *fast_in[:n_args],
        initial_state=state,
        output_final_state=True,
        cu_seqlens=fast_cu,
        chunk_size=chunk_size,
        backend=backend,
    )
    o, s = o.cpu(), s.cpu()
    assert o.dtype == dtype
    assert s.shape == s_ref.shape
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    loss_ref = (o_ref * do).sum() + (s_ref * ds).sum()
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    grads_ref = torch.autograd.grad(loss_ref, ref_in)
    grads = [x.cpu() for x in torch.autograd.grad(loss, fast_in)]
    assert_close("output", o, o_ref, dtype)
    assert_close("final state", s, s_ref, dtype)
    names = [f"input {i}" for i in range(n_args)] + (["initial_state"] if with_state else [])
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        assert_close(f"gradient of {name}", got, want, dtype)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("T", [1, 15, 63, 100])
@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)],
)
def test_matches_step_loop(fam, T, backend, dtype):
    run_case(fam, B=2, T=T, H=2, K=12, V=20, dtype=dtype, with_state=False, backend=backend)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("K,V", [(8, 8), (12, 20), (16, 6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_state_and_head_sizes(fam, K, V, backend):
    run_case(fam, B=2, T=37, H=3, K=K, V=V, dtype=torch.float32, with_state=True, backend=backend)


# uneven documents, one empty, one of a single token, one longer than a chunk
PACKED = torch.tensor([0, 5, 22, 22, 23, 63], dtype=torch.int32)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "backend,dtype,chunk_size",
    [("torch", torch.float64, c) for c in (4, 16, 64)]
    + [("triton", torch.float32, c) for c in (16, 64)],
)
def test_packed_documents(fam, backend, dtype, chunk_size):
    run_case(
        fam,
        B=1,
        T=63,
        H=2,
        K=8,
        V=12,
        dtype=dtype,
        with_state=True,
        cu_seqlens=PACKED,
        chunk_size=chunk_size,
        backend=backend,
    )


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_packed_equals_separate_runs(fam, backend, dtype):
    lengths = [9, 30, 1, 17]
    gen = torch.Generator().manual_seed(3)
    xs = [x.to(dtype) for x in fam.make(1, sum(lengths), 2, 8, 8, gen)]
    cu = torch.tensor([0, 9, 39, 40, 57], dtype=torch.int32)
    o, s = fam.chunk(*xs, output_final_state=True, cu_seqlens=cu, backend=backend)
    for n, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, s_n = fam.chunk(*[x[:, t0:t1] for x in xs], output_final_state=True, backend=backend)
        assert_close(f"document {n}", o[:, t0:t1], o_n, dtype)
        assert_close(f"document {n} state", s[n : n + 1], s_n, dtype)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_triton_matches_torch_on_a_longer_sequence(fam):
    """Several chunks per sequence at the default chunk sizes of both paths, bf16-free."""
    gen = torch.Generator().manual_seed(11)
    xs = [x.float() for x in fam.make(1, 150, 2, 16, 16, gen)]
    o_t, s_t = fam.chunk(*xs, output_final_state=True, backend="torch")
    o, s = fam.chunk(*xs, output_final_state=True, backend="triton")
    assert_close("output", o, o_t, torch.float32)
    assert_close("final state", s, s_t, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_triton_on_cuda(fam, chunk_size):
    """The compiled kernels (not the interpreter): longer sequences, packed documents."""
    run_case(fam, B=2, T=300, H=4, K=64, V=48, dtype=torch.float32, with_state=True,
             chunk_size=chunk_size, backend="triton", device="cuda")  # fmt: skip
    cu = torch.tensor([0, 100, 101, 350, 512], dtype=torch.int32)
    run_case(fam, B=1, T=512, H=2, K=32, V=32, dtype=torch.float32, with_state=True,
             cu_seqlens=cu, chunk_size=chunk_size, backend="triton", device="cuda")  # fmt: skip


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(fam, backend):
    run_case(
        fam, B=2, T=50, H=2, K=16, V=16, dtype=torch.bfloat16, with_state=False, backend=backend
    )


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


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_bad_input_for_the_triton_path(fam, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    xs = fam.make(2, 10, 2, 4, 4, gen)  # float64
    first = "a" if fam.name == "scan" else "q"
    with pytest.raises(ValueError, match=rf"^{first} has dtype torch.float64; backend='triton'"):
        fam.chunk(*xs, backend="triton")
    fp32 = [x.float() for x in xs]
    mixed = list(fp32)
    mixed[1] = mixed[1].bfloat16()
    second = "b" if fam.name == "scan" else "k"
    with pytest.raises(ValueError, match=rf"^{second} has dtype torch.bfloat16 but {first} has"):
        fam.chunk(*mixed, backend="triton")
    with pytest.raises(ValueError, match=r"^chunk_size must be a power of two >= 16"):
        fam.chunk(*fp32, backend="triton", chunk_size=24)
    with pytest.raises(ValueError, match=r"^backend must be one of auto, torch, triton"):
        fam.chunk(*fp32, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors"):
        fam.chunk(*fp32, backend="triton")


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_non_contiguous_inputs_give_the_same_result(fam):
    """Strided views (e.g. q, k, v split from one projection) are copied, not misread."""
    gen = torch.Generator().manual_seed(2)
    xs = [x.float() for x in fam.make(2, 20, 2, 8, 8, gen)]
    wide = [torch.cat([x, x], dim=-1)[..., : x.shape[-1]] for x in xs]
    assert not wide[0].is_contiguous()
    for backend in BACKENDS:
        o, _ = fam.chunk(*xs, backend=backend)
        o_strided, _ = fam.chunk(*wide, backend=backend)
        assert torch.equal(o, o_strided), backend


def test_delta_rule_on_triton_holds_wide_heads_and_refuses_wider():
    """The delta rule's Triton state passes hold all of K as up to four tiles of 64 rows:
    K = 200 uses all four; K > 256 and chunks over 64 are refused with the argument named."""
    fam = next(f for f in FAMILIES if f.name == "delta")
    run_case(fam, B=1, T=40, H=1, K=200, V=24, dtype=torch.float32, with_state=True,
             backend="triton")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    xs = [x.float() for x in fam.make(1, 8, 1, 264, 8, gen)]
    with pytest.raises(ValueError, match=r"^q and k have head size 264; the delta rule's"):
        fam.chunk(*xs, backend="triton")
    xs = [x.float() for x in fam.make(1, 8, 1, 8, 8, gen)]
    with pytest.raises(ValueError, match=r"^chunk_size must be 16, 32 or 64 for the delta"):
        fam.chunk(*xs, backend="triton", chunk_size=128)


@pytest.mark.parametrize(
    "groups,H,backend,dtype,cu_seqlens",
    [(g, H, "torch", torch.float64, cu) for g, H in ((1, 3), (2, 4)) for cu in (None, PACKED)]
    + [(2, 4, "triton", torch.float32, None)],  # the interpreter is slow: one case
)  # fmt: skip
def test_grouped_q_and_k(groups, H, backend, dtype, cu_seqlens):
    """simple_gla with q and k shared by groups of heads (Mamba2): the PyTorch path scores once
    per group and sums their gradients over the group; Triton reads them repeated."""
    B = 2 if cu_seqlens is None else 1
    run_case(grouped_simple_gla(groups), B=B, T=63, H=H, K=8, V=12, dtype=dtype, with_state=True,
             cu_seqlens=cu_seqlens, backend=backend)  # fmt: skip


def test_grouped_q_and_k_must_divide_the_heads():
    q, k, v, g = grouped_simple_gla(2).make(1, 8, 3, 4, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="q and k have 2 heads .groups., which must divide v's 3"):
        FAMILIES[1].chunk(q, k, v, g, backend="torch")
