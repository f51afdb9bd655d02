"""DeltaProduct through the delta family, against its own float64 step loop."""

import pytest
import torch
import torch.nn.functional as F

from rnnscale.kernels.delta.product import chunk_delta_product

from .test_families import assert_close


def delta_product_loop(q, k, v, g, beta, initial_state):
    B, T, n, H, K = k.shape
    S = initial_state.clone()  # (B, H, K, V)
    out = []
    for t in range(T):
        S = g[:, t].exp()[..., None, None] * S
        for j in range(n):
            kj, vj, bj = k[:, t, j], v[:, t, j], beta[:, t, j]  # (B, H, K), (B, H, V), (B, H)
            S = (
                S
                - bj[..., None, None]
                * kj[..., None]
                * torch.einsum("bhk,bhkv->bhv", kj, S)[..., None, :]
            )
            S = S + bj[..., None, None] * kj[..., None] * vj[..., None, :]
        out.append(K**-0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_delta_product_matches_its_step_loop(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    B, T, n, H, K, V = 2, 21, 3, 2, 8, 6
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), F.normalize(r(B, T, n, H, K), dim=-1), r(B, T, n, H, V)
    g, beta = F.logsigmoid(r(B, T, H) + 3), 2 * torch.sigmoid(r(B, T, n, H))
    h0 = r(B, H, K, V)
    ref = [x.to(dtype).double().requires_grad_() for x in (q, k, v, g, beta, h0)]
    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_ref, s_ref = delta_product_loop(*ref)
    o, s = chunk_delta_product(
        *inputs[:5], initial_state=inputs[5], output_final_state=True, chunk_size=16,
        backend=backend,
    )  # fmt: skip
    assert_close("output", o, o_ref, dtype)
    assert_close("final state", s, s_ref, dtype)
    loss = lambda o, s: o.double().pow(2).sum() + s.double().sum()  # noqa: E731
    for name, a, b in zip(
        "q k v g beta h0".split(),
        torch.autograd.grad(loss(o, s), inputs),
        torch.autograd.grad(loss(o_ref, s_ref), ref),
        strict=True,
    ):
        assert_close(f"gradient of {name}", a, b, dtype)
