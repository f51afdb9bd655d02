"""HGRN2 and Gated DeltaNet (plain DeltaNet, negative eigenvalues, DeltaProduct) against float64
step loops of the papers' equations, written here through the modules' own parameters; the
variants keep the mixer contract of tests/test_mixers.py; beta's range follows allow_neg_eigval;
hgrn2's forget-gate lower bound starts at HGRN's schedule (0 at layer 0, l / num_layers above)."""

import pytest
import torch
import torch.nn.functional as F
from test_mixers import TINY, build_tiny, decode

# (atol, rtol) against the step loops: float64 end to end (kernels.norm keeps float64 in float64),
# so only the summation order differs
REFERENCE_TOL = (1e-10, 1e-10)

VARIANTS = {
    "deltanet": {"use_forget_gate": False},
    "neg_eigval": {"allow_neg_eigval": True},
    "product2": {"num_householder": 2},
    "product3": {"num_householder": 3, "allow_neg_eigval": True},
}


def model_with(name, options, num_layers=2, dtype=torch.float64):
    """A tiny model of `num_layers` `name` mixers, TINY's options updated with `options`."""
    cfg = {"vocab_size": 97, "d_model": 32, "num_layers": num_layers, "num_heads": 2}
    cfg.update(mixer_pattern=[name], **{name: {**TINY[name], **options}})
    return build_tiny(cfg).to(dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_gdn_variant_decoding_matches_the_parallel_forward(variant, dtype, tol):
    model = model_with("gated_deltanet", VARIANTS[variant], dtype=dtype)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)
        prefix, state = model(ids[:, :9])
        rest, _ = decode(model, ids[:, 9:], state)
        stepped, _ = decode(model, ids)
    torch.testing.assert_close(torch.cat([prefix, rest], 1), full, atol=tol, rtol=tol)
    torch.testing.assert_close(stepped, full, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gdn_variant_packed_documents(variant):
    """Packed == each document decoded alone, and the packed states continue each document."""
    model = model_with("gated_deltanet", VARIANTS[variant])
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in (7, 20, 1, 12)]
    cu = torch.tensor([0, 7, 27, 28, 40], dtype=torch.int32)
    nxt = torch.randint(0, 97, (4, 5), generator=gen)
    with torch.no_grad():
        packed, state = model(torch.cat(docs, 1), cu_seqlens=cu)
        alone = torch.cat([decode(model, d)[0] for d in docs], 1)
        cont, _ = model(nxt, state=state)  # row n continues document n
        torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-10)
        for n, doc in enumerate(docs):
            whole, _ = model(torch.cat([doc, nxt[n : n + 1]], 1))
            torch.testing.assert_close(cont[n], whole[0, -5:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gdn_variant_gradients_reach_every_parameter(variant):
    model = model_with("gated_deltanet", VARIANTS[variant], dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    model(ids)[0].logsumexp(-1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


def test_plain_deltanet_has_no_decay():
    mixer = model_with("gated_deltanet", VARIANTS["deltanet"]).blocks[0].mixer
    assert not hasattr(mixer, "A_log") and not hasattr(mixer, "a_proj")
    g, _ = mixer.gates(torch.randn(2, 5, 32, dtype=torch.float64))
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("neg", [False, True])
def test_beta_range_follows_allow_neg_eigval(neg):
    mixer = model_with("gated_deltanet", {"allow_neg_eigval": neg}).blocks[0].mixer
    x = 20 * torch.randn(4, 50, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g, beta = mixer.gates(x)  # large inputs spread the logits over the whole sigmoid
    assert beta.shape == (4, 50, 1, 2) and beta.min() > 0 and (g <= 0).all()
    if neg:
        assert beta.max() > 1.5 and beta.max() < 2
    else:
        assert beta.max() < 1


def test_hgrn2_lower_bound_schedule_at_init():
    layers = 4
    model = model_with("hgrn2", {}, num_layers=layers)
    bounds = [block.mixer.lower_bound() for block in model.blocks]  # each [H K]
    assert torch.equal(bounds[0], torch.zeros_like(bounds[0]))
    for lower, upper in zip(bounds, bounds[1:]):
        assert (upper > lower).all()
    for i, lb in enumerate(bounds):
        torch.testing.assert_close(lb, torch.full_like(lb, i / layers))
    assert not hasattr(model.blocks[0].mixer, "lower_bound_logit")  # layer 0 is pinned at 0
    assert model.blocks[1].mixer.lower_bound_logit._no_weight_decay


def test_hgrn2_forget_gate_lies_between_its_bound_and_one():
    model = model_with("hgrn2", {}, num_layers=3)
    f = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4], dtype=torch.float64)[:, None].expand(5, 16)
    for i, block in enumerate(model.blocks):
        forget = block.mixer.log_forget_gate(f).exp()  # (5, H K)
        lb = i / 3
        torch.testing.assert_close(forget[0], torch.full_like(forget[0], lb))  # f -> -inf: lb
        torch.testing.assert_close(forget[-1], torch.ones_like(forget[-1]))  # f -> +inf: 1
        torch.testing.assert_close(forget[2], torch.full_like(forget[2], lb + (1 - lb) / 2))
        assert (forget[1:] > forget[:-1]).all()


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def conv_silu(x, conv):
    """Causal depthwise convolution `y_t = sum_j w_j x_{t - (W-1) + j}`, then SiLU."""
    W = conv.weight.shape[1]
    padded = F.pad(x, (0, 0, W - 1, 0))  # (B, W - 1 + T, D)
    y = sum(conv.weight[:, j] * padded[:, j : j + x.shape[1]] for j in range(W))
    return F.silu(y)


def gdn_reference(m, x):
    """Yang et al. (2024) eqs., n Householder steps per token (Siems et al. 2025), step by step."""
    B, T, _ = x.shape
    H, K, V, n = m.num_heads, m.head_dim, m.head_v_dim, m.num_householder
    l2 = lambda a: a / a.pow(2).sum(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    q = l2(conv_silu(m.q_proj(x), m.q_conv).view(B, T, H, K))
    k = l2(conv_silu(m.k_proj(x), m.k_conv).view(B, T, n, H, K))
    v = conv_silu(m.v_proj(x), m.v_conv).view(B, T, n, H, V)
    beta = torch.sigmoid(m.b_proj(x)).view(B, T, n, H) * (2 if m.allow_neg_eigval else 1)
    g = torch.zeros(B, T, H, dtype=x.dtype)
    if m.use_forget_gate:
        g = -m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias)
    S, out = torch.zeros(B, H, K, V, dtype=x.dtype), []
    eye = torch.eye(K, dtype=x.dtype)
    for t in range(T):
        S = g[:, t, :, None, None].exp() * S
        for j in range(n):
            kj, b = k[:, t, j], beta[:, t, j, :, None, None]  # (B, H, K), (B, H, 1, 1)
            outer = kj[..., :, None] * kj[..., None, :]  # (B, H, K, K)
            S = (eye - b * outer) @ S + b * kj[..., :, None] * v[:, t, j, :, None, :]
        out.append(K**-0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = rms(torch.stack(out, 1), m.o_norm.weight, m.o_norm.eps)  # (B, T, H, V)
    o = o * F.silu(m.g_proj(x).view(B, T, H, V))
    return m.o_proj(o.reshape(B, T, H * V)), S


def hgrn2_reference(m, x):
    """Qin et al. (2024) with the lower-bounded forget gate, step by step."""
    B, T, _ = x.shape
    H = m.num_heads
    lb = 0 if m.layer_idx == 0 else torch.sigmoid(m.lower_bound_logit)
    f = (lb + (1 - lb) * torch.sigmoid(m.f_proj(x))).view(B, T, H, -1)  # (B, T, H, K)
    q, v = F.silu(m.q_proj(x)).view(B, T, H, -1), m.i_proj(x).view(B, T, H, -1)
    S, out = torch.zeros(B, H, f.shape[-1], v.shape[-1], dtype=x.dtype), []
    for t in range(T):
        S = f[:, t, ..., None] * S + (1 - f[:, t, ..., None]) * v[:, t, :, None, :]
        out.append(f.shape[-1] ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = rms(torch.stack(out, 1).reshape(B, T, -1), m.g_norm.weight, m.g_norm.eps)
    return m.o_proj(o), S


def perturbed(mixer):
    """Norm weights and the lower bound moved off their init, so a dropped term shows."""
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if "norm" in name or "lower_bound" in name:
                p.add_(torch.rand_like(p) - 0.5)
    return mixer


@pytest.mark.parametrize("variant", ["gated", *VARIANTS])
def test_gdn_matches_the_paper_step_loop(variant):
    mixer = perturbed(model_with("gated_deltanet", VARIANTS.get(variant, {})).blocks[1].mixer)
    x = torch.randn(2, 15, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y, state = mixer(x)
        y_ref, S_ref = gdn_reference(mixer, x)
    torch.testing.assert_close(state[-1], S_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y, y_ref, atol=REFERENCE_TOL[0], rtol=REFERENCE_TOL[1])


@pytest.mark.parametrize("layer", [0, 2])
def test_hgrn2_matches_the_paper_step_loop(layer):
    mixer = perturbed(model_with("hgrn2", {}, num_layers=3).blocks[layer].mixer)
    x = torch.randn(2, 15, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y, state = mixer(x)
        y_ref, S_ref = hgrn2_reference(mixer, x)
    torch.testing.assert_close(state, S_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y, y_ref, atol=REFERENCE_TOL[0], rtol=REFERENCE_TOL[1])
