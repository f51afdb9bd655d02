"""Activations the backward recomputes (rnnscale.kernels.common.recompute): every mixer in a
model gives the same loss and the same gradients, bit for bit, as with
`kernels.recompute_activations: false` (everything kept); no block keeps its normalised rows
and the gated_deltanet model holds less after its forward; activation checkpointing, compiled
blocks and other saved-tensor hooks use no recipe; a tensor changed in place is kept as usual;
a recipe that makes the wrong tensor is refused."""

import gc
import weakref

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
    for wrong in (lambda: torch.zeros(5), lambda: torch.zeros(4, 3, dtype=torch.float64)):
        w = x.exp()
        with recomputed({w: wrong}):
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


@pytest.mark.parametrize("name", list(MIXERS))
def test_no_block_keeps_its_normalised_rows(name):
    """After the forward, the graph holds recipes of every norm's output, not the rows (a
    recipe that captured them would keep them: Mamba2's once did)."""
    model = tiny_model([name, name], torch.float32)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))

    def alive_after_forward(recompute: bool) -> list[bool]:
        model.recompute_activations, rows = recompute, []
        hooks = [norm.register_forward_hook(lambda m, i, out: rows.append(weakref.ref(out[0])))
                 for b in model.blocks for norm in (b.mixer_norm, b.mlp_norm)]  # fmt: skip
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        gc.collect()
        alive = [r() is not None for r in rows]
        loss.backward()
        for hook in hooks:
            hook.remove()
        return alive

    assert not any(alive_after_forward(True))
    assert any(alive_after_forward(False))  # kept for the projections' weight gradients


def test_checkpointed_and_compiled_blocks_use_no_recipes(monkeypatch):
    """Activation checkpointing recomputes whole blocks and torch.compile chooses its own
    recomputation: neither sees a recipe, and both give the gradients of recomputing off."""
    made = []
    unpack = recompute._unpack
    monkeypatch.setattr(recompute, "_unpack", lambda s: made.append(s) or unpack(s))
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 11, 23], dtype=torch.int32)
    for name in ("gated_deltanet", "mamba2"):
        model = tiny_model([name, name], torch.float32)
        _, want = loss_and_grads(model, ids, cu, keep_all=True)
        model.activation_checkpointing = True  # per block, non-reentrant (training mode)
        _, checkpointed = loss_and_grads(model, ids, cu, keep_all=False)
        model.activation_checkpointing = False
        for block in model.blocks:
            block.compile(backend="aot_eager")  # dynamo traces; no inductor kernels to build
        _, compiled = loss_and_grads(model, ids, cu, keep_all=False)
        for n, g in want.items():
            assert torch.equal(checkpointed[n], g), (name, n)
            assert torch.allclose(compiled[n], g, rtol=1e-5, atol=1e-7), (name, n)
    assert not any(isinstance(s, recompute._Saved) for s in made)


def test_a_tensor_changed_in_place_is_kept_not_recomputed():
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 1.0
    with recomputed({y: lambda: x.detach() * 1.0}):  # the recipe of y before the change
        y.mul_(3)
        z = (y * y).sum()  # y is saved now: its recipe no longer holds, so y is kept
    z.backward()
    assert torch.allclose(x.grad, 18 * x.detach())
