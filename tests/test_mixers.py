"""Every token mixer in the registry, alone and in a hybrid: token-by-token decoding with the
carried state gives the parallel forward's logits, packed documents equal separate sequences,
gradients reach every parameter, and the FLOP count behaves (constant per token for recurrent
mixers, growing with T for global attention)."""

import dataclasses
import os

import pytest
import torch

from rnnscale.train.config import from_dict
from rnnscale.train.mixers import FAMILIES
from rnnscale.train.model import MIXERS, build_model

# Small options for every mixer
TINY = {
    "gla": {},
    "retnet": {},
    "mamba2": {"head_dim": 8, "state_size": 16},
    "hgrn2": {"expand_ratio": 8},
    "gated_deltanet": {},
    "mingru": {},
    "minlstm": {},
    "rglru": {},
    "attn": {},
    "swa": {"window": 6},
}
# chunks shorter than the test sequences, so several chunks run (the PyTorch path takes any C)
TINY_KERNELS = {"backend": "torch", "chunk_size": dict.fromkeys(FAMILIES, 8)}
RECURRENT = [name for name in MIXERS if name not in ("attn", "swa")]
HYBRID = ["gated_deltanet", "mamba2", "gla", "attn", "rglru", "swa"]


def tiny_model(pattern, dtype=torch.float64, **model):
    cfg = {"vocab_size": 97, "d_model": 32, "num_layers": len(pattern), "num_heads": 2}
    cfg.update(mixer_pattern=pattern, **TINY, **model)
    return build_tiny(cfg).to(dtype)


def build_tiny(model: dict):
    """The model of a `model` section, its scans with TINY_KERNELS, seeded."""
    cfg = from_dict({"model": model, "kernels": TINY_KERNELS})
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.kernels)


def decode(model, ids, state=None):
    """Logits of feeding `ids [B, T]` one token at a time, carrying the state."""
    out = []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state=state)
        out.append(logits)
    return torch.cat(out, 1), state


def test_registry_matches_the_config_names():
    import typing

    from rnnscale.train.config import MixerName

    assert set(MIXERS) == set(typing.get_args(MixerName)) == set(TINY)


def test_every_scan_family_has_its_forms_and_a_chunk_size():
    """One table per side: the torch-free FAMILIES (chunk sizes, the config's fields) and
    SCANS (the forms); every recurrent mixer names a family both know."""
    from rnnscale.train.config import ChunkSizeSection
    from rnnscale.train.mixers import REGISTRY
    from rnnscale.train.model.scan import SCANS

    assert set(FAMILIES) <= set(SCANS)
    assert {m.family for m in REGISTRY.values()} - {None} == set(FAMILIES)
    assert [f.name for f in dataclasses.fields(ChunkSizeSection)] == list(FAMILIES)


PATTERNS = [[name] for name in MIXERS] + [HYBRID]
IDS = [p[0] if len(p) == 1 else "hybrid" for p in PATTERNS]


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_decoding_token_by_token_matches_the_parallel_forward(pattern, dtype, tol):
    model = tiny_model(pattern * (2 if len(pattern) == 1 else 1), dtype)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)
        prefix, state = model(ids[:, :9])  # a parallel prefill, then one token at a time
        rest, _ = decode(model, ids[:, 9:], state)
        stepped, _ = decode(model, ids)
    torch.testing.assert_close(torch.cat([prefix, rest], 1), full, atol=tol, rtol=tol)
    torch.testing.assert_close(stepped, full, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", RECURRENT)
def test_one_token_runs_the_step_form_not_a_padded_chunk(name, monkeypatch):
    """Every recurrent mixer, GLA included, decodes a token with its family's one-step form
    (through rnnscale.train.model.scan): with the chunkwise kernels made to fail, token-by-
    token decoding still equals the chunkwise forward of the whole sequence."""
    from rnnscale.train.model import scan

    model = tiny_model([name])
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = model(ids)

    def no_chunks(*args, **kwargs):
        raise AssertionError("a one-token call reached a chunkwise kernel")

    for family, entry in scan.SCANS.items():
        monkeypatch.setitem(scan.SCANS, family, dataclasses.replace(entry, chunk=no_chunks))
    with torch.no_grad():
        stepped, _ = decode(model, ids)
    torch.testing.assert_close(stepped, full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS, ids=IDS)
def test_packed_documents_equal_separate_decoding(pattern):
    model = tiny_model(pattern)
    lengths = [7, 20, 1, 12]
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in lengths]
    cu = torch.tensor([0, 7, 27, 28, 40], dtype=torch.int32)
    with torch.no_grad():
        packed, _ = model(torch.cat(docs, 1), cu_seqlens=cu)
        alone = torch.cat([decode(model, d)[0] for d in docs], 1)
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", RECURRENT)
def test_packed_states_continue_each_document(name):
    """A packed forward returns one state per document; continuing document n from it gives
    what running document n whole gives."""
    model = tiny_model([name, name])
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in (9, 14, 5)]
    cu = torch.tensor([0, 9, 23, 28], dtype=torch.int32)
    nxt = torch.randint(0, 97, (3, 4), generator=gen)
    with torch.no_grad():
        _, state = model(torch.cat(docs, 1), cu_seqlens=cu)
        cont, _ = model(nxt, state=state)  # row n continues document n
        for n, doc in enumerate(docs):
            whole, _ = model(torch.cat([doc, nxt[n : n + 1]], 1))
            torch.testing.assert_close(cont[n], whole[0, -4:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", list(MIXERS))
def test_gradients_reach_every_parameter(name):
    model = tiny_model([name, name], torch.float32)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    logits, _ = model(ids)
    logits.logsumexp(-1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", list(MIXERS))
def test_flops_per_token(name):
    model = tiny_model([name], torch.float32)
    mixer = model.blocks[0].mixer
    short, long = mixer.flops_per_token(64), mixer.flops_per_token(4096)
    assert isinstance(short, int) and short > 0
    if name == "attn":
        assert long > short  # the quadratic term grows with T
    else:  # recurrent mixers and the window: constant per token once T passes the window
        assert mixer.flops_per_token(8192) == long
    total = model.flops_per_token(64)
    assert total > short + 2 * 32 * 97  # mixer + MLP + head


@pytest.mark.parametrize("name", RECURRENT)
def test_triton_backend_equals_the_torch_backend(name):
    """`kernels.backend: triton` (Triton's interpreter here, the compiled kernels on a GPU)
    gives the torch backend's logits and parameter gradients, fp32, across several chunks."""
    compiled = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    device = "cuda" if compiled else "cpu"
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(6))
    got = {}
    for backend in ("torch", "triton"):
        kernels = {"backend": backend, "chunk_size": dict.fromkeys(FAMILIES, 16)}
        model = {"vocab_size": 97, "d_model": 32, "num_layers": 1, "num_heads": 2,
                 "mixer_pattern": [name], **TINY}  # fmt: skip
        cfg = from_dict({"model": model, "kernels": kernels})
        torch.manual_seed(0)
        net = build_model(cfg.model, cfg.kernels).to(device)
        logits, _ = net(ids.to(device))
        logits.logsumexp(-1).mean().backward()
        got[backend] = [logits.detach().cpu()] + [p.grad.cpu() for p in net.parameters()]
    for want, have in zip(got["torch"], got["triton"], strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "L,window,n,docs",
    [(37, 6, 0, None), (37, 6, 3, None), (5, 6, 2, None), (1, 6, 5, None),
     (40, 8, 7, [0, 3, 20, 21, 40]), (13, 1, 0, None)],
)  # fmt: skip
def test_blocked_sliding_window_equals_the_masked_dense_form(L, window, n, docs):
    """`swa`'s blocked attention (blocks of `window` queries, O(L window)) gives the outputs
    and the gradients of every input of SDPA under the full (L, n + L) mask, float64: with n
    keys before the queries (a cache or a halo, fewer than window - 1 too), packed documents,
    a length that is not a multiple of the window, and lengths below it (the dense form)."""
    import torch.nn.functional as F

    from rnnscale.train.model.attn import local_attention

    gen = torch.Generator().manual_seed(L + n)
    q, k, v = (torch.randn(2, m, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for m in (L, n + L, n + L))  # fmt: skip
    if docs is None:
        pos = torch.arange(L) + 50  # the queries continue a longer sequence
    else:
        starts = torch.tensor(docs)
        pos = torch.arange(L) - torch.repeat_interleave(starts[:-1], starts.diff())
    t, j = torch.arange(L)[:, None], torch.arange(-n, L)[None, :]
    mask = (j <= t) & (j > t - window) & (j >= t - pos[:, None])
    dense = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask
    ).transpose(1, 2)  # fmt: skip
    blocked = local_attention(q, k, v, window, pos)
    grad = torch.randn(blocked.shape, generator=gen, dtype=torch.float64)
    want = [dense, *torch.autograd.grad(dense, (q, k, v), grad)]
    have = [blocked, *torch.autograd.grad(blocked, (q, k, v), grad)]
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "n,docs", [(0, [0, 3, 20, 21, 40]), (0, [0, 40]), (9, [0, 17, 40]), (5, [0, 40])]
)
def test_document_attention_in_query_blocks_equals_the_whole_mask(n, docs):
    """Packed global attention in query blocks (each against its documents' keys only) gives
    the outputs and gradients of SDPA under the whole (L, n + L) document-causal mask, float64:
    short and long documents, one document (the causal SDPA), and n keys before the queries
    (the key/value all-gather's rows before a sequence-parallel slice, where the first
    document starts)."""
    import torch.nn.functional as F

    from rnnscale.train.model.attn import document_attention

    L = docs[-1]
    gen = torch.Generator().manual_seed(L + n)
    q, k, v = (torch.randn(1, m, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for m in (L, n + L, n + L))  # fmt: skip
    starts = torch.tensor(docs)
    pos = torch.arange(L) - torch.repeat_interleave(starts[:-1], starts.diff())
    pos[: docs[1]] += n  # the first document began n keys before the queries
    t, j = torch.arange(L)[:, None], torch.arange(-n, L)[None, :]
    mask = (j <= t) & (j >= t - pos[:, None])
    dense = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask
    ).transpose(1, 2)  # fmt: skip
    blocked = document_attention(q, k, v, pos, block=6)
    grad = torch.randn(blocked.shape, generator=gen, dtype=torch.float64)
    want = [dense, *torch.autograd.grad(dense, (q, k, v), grad)]
    have = [blocked, *torch.autograd.grad(blocked, (q, k, v), grad)]
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
