"""Activations the backward recomputes (rnnscale.kernels.common.recompute): every mixer in a
model gives the same loss and the same gradients, bit for bit, as with
`kernels.recompute_activations: false` (everything kept); the gated_deltanet model holds less
after its forward; another saved-tensor hook (activation checkpointing, offload) turns it off;
a recipe that makes the wrong tensor is refused."""

import pytest
import torch
from test_mixers import tiny_model

from rnnscale.kernels.common import recompute
from rnnscale.kernels.common.recompute import covered, recomputed
from rnnscale.train.measure import cpu_live_bytes
from rnnscale.train.model import MIXERS


def loss_and_grads(model, ids, cu_seqlens, *, keep_all: bool):
    """The loss and every gradient; `keep_all`: `kernels.recompute_activations: false`."""
    model.zero_grad(set_to_none=True)
    model.recompute_activations = not keep_all
    loss = model.loss(ids[:, :-1], ids[:, 1:], cu_seqlens=cu_seqlens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MIXERS))
def test_recomputed_activations_give_the_same_gradients_bit_for_bit(name, monkeypatch):
    model = tiny_model([name, name], torch.float32)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)  # packed documents
    made = []
    unpack = recompute._unpack
    monkeypatch.setattr(recompute, "_unpack", lambda s: made.append(s) or unpack(s))
    loss, grads = loss_and_grads(model, ids, cu, keep_all=False)
    assert any(isinstance(s, recompute._Saved) for s in made)  # recipes were used
    made.clear()
    kept_loss, kept_grads = loss_and_grads(model, ids, cu, keep_all=True)
    assert not any(isinstance(s, recompute._Saved) for s in made)  # the config turns it off
    assert torch.equal(loss, kept_loss)
    for n, g in grads.items():
        assert torch.equal(g, kept_grads[n]), n


def test_gated_deltanet_holds_less_after_its_forward():
    """What the graph holds after the forward (allocator bytes): the recipes replace the
    normalised rows, the SwiGLU's SiLU and product, q, k, v after the convolutions and the
    gated norm's output."""
    model = tiny_model(["gated_deltanet"] * 2, torch.float32, d_model=64)
    ids = torch.randint(0, 97, (1, 257), generator=torch.Generator().manual_seed(2))

    def held(keep_all: bool) -> int:
        model.recompute_activations = not keep_all  # kernels.recompute_activations
        graph = []
        _, kept = cpu_live_bytes(lambda: graph.append(model.loss(ids[:, :-1], ids[:, 1:])))
        return kept

    recomputing, keeping = held(False), held(True)
    assert recomputing < 0.75 * keeping, (recomputing, keeping)


def test_other_saved_tensor_hooks_turn_it_off_and_a_wrong_recipe_is_refused():
    x = torch.randn(4, 3, requires_grad=True)
    y = x.exp()
    with recomputed({y: lambda: y.detach() * 2}):
        assert covered(y)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert not covered(y)  # the inner hooks win: y would be kept
        z = (y * y).sum()  # keeps the recipe, which makes the wrong values
    z.backward()  # autograd cannot tell wrong values; the grad shows they were used
    assert torch.allclose(x.grad, 2 * (2 * y.detach()) * y.detach())
    w = x.exp()
    with recomputed({w: lambda: torch.zeros(5)}):
        z = (w * w).sum()
    with pytest.raises(RuntimeError, match="recipe does not match"):
        z.backward()


def test_a_memoized_recipe_makes_its_tensor_once_while_it_lives():
    calls = []
    make = recompute.memoized(lambda: calls.append(1) or torch.ones(3))
    first = make()
    view = first[1:]
    del first
    assert make()[1:].data_ptr() == view.data_ptr() and len(calls) == 1  # alive through a view
    del view
    make()
    assert len(calls) == 2  # gone: made again
