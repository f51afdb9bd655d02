"""The chunked cross-entropy equals the plain one: value and gradients, ignored labels, chunks
that do not divide the tokens, half-precision inputs."""

import pytest
import torch
import torch.nn.functional as F

from rnnscale.train.model.loss import chunked_cross_entropy


def plain(hidden, weight, labels):
    return F.cross_entropy(hidden.float() @ weight.float().T, labels, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_plain_cross_entropy(chunk):
    gen = torch.Generator().manual_seed(0)
    N, D, V = 50, 16, 37
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    got = chunked_cross_entropy(hidden, weight, labels, chunk)
    want = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    g_got = torch.autograd.grad(3 * got, (hidden, weight))
    g_want = torch.autograd.grad(3 * want, (hidden, weight))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bf16_inputs_get_fp32_math_and_their_own_dtype_back():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 8, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(300, 8, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (40,), generator=gen)
    got = chunked_cross_entropy(hidden, weight, labels, 16)
    torch.testing.assert_close(got, plain(hidden, weight, labels), atol=1e-5, rtol=1e-5)
    got.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_no_grad_evaluation_and_bad_shapes():
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        value = chunked_cross_entropy(hidden, weight, labels, 2)
    assert value.grad_fn is None
    with pytest.raises(ValueError, match=r"^labels must be \[N\] = \[4\]"):
        chunked_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match=r"^hidden must be \[N, D\] and weight \[V, D\]"):
        chunked_cross_entropy(hidden, torch.randn(5, 2), labels)
    with pytest.raises(ValueError, match=r"^chunk_tokens must be >= 1"):
        chunked_cross_entropy(hidden, weight, labels, 0)
