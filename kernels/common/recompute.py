"""Activations the backward makes again instead of keeping: the cheap elementwise results that
autograd would otherwise save beside the tensors they are made from (the normalised rows every
projection reads, SwiGLU's SiLU and product, the short convolutions' outputs, a gated norm's
output), as flash-linear-attention's fused layers and Liger's SwiGLU recompute them.

    with recomputed({h: lambda: rms_norm(x, w, eps)}):
        y = proj(h)       # autograd would keep h for the weight's gradient; it keeps the recipe

Inside the context, when autograd saves a tensor whose storage is a recipe's tensor (the tensor
itself or a view of it), it keeps the recipe and calls it when the backward reads the tensor.
A recipe must make the same values from tensors that the graph keeps anyway (so they cost no
memory) by the same operations as the forward (so the bits are the same), and hold copies of
the parameters it reads (ZeRO-3 partitions a module's parameters after its forward).

Contexts nest: an inner one adds its recipes to the outer one's. Nothing is recomputed, and
everything saved as usual, inside `recompute_allowed(False)` (the model's
`kernels.recompute_activations: false`), while other saved-tensor hooks are active
(activation checkpointing already recomputes the whole block; activation offload), while
torch.compile traces (inductor's partitioner chooses what to recompute itself), or with
autograd off.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

_ALLOWED = [True]  # recompute_allowed's setting, innermost last
_RECIPES: dict[tuple[torch.device, int], tuple[torch.Tensor, int, Callable]] = {}
"""The active recipes: (device, storage address) -> (its tensor, its version when registered,
the recipe)."""


@dataclass(frozen=True)
class _Saved:
    """What autograd keeps in place of a saved tensor: the recipe of its storage and the view."""

    make: Callable[[], torch.Tensor]
    whole: torch.Size
    dtype: torch.dtype
    device: torch.device
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


def _key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _recipe(t: torch.Tensor):
    """The (tensor, version, recipe) whose storage `t` is, or None; None too if the tensor was
    changed in place since it was registered (the recipe would make the old values)."""
    if t.layout != torch.strided:
        return None
    hit = _RECIPES.get(_key(t))
    if hit is None or hit[0].dtype != t.dtype or hit[0]._version != hit[1]:
        return None
    return hit if hit[0].untyped_storage().nbytes() == t.untyped_storage().nbytes() else None


def active() -> bool:
    """Whether a `recomputed` context entered now would recompute: not while torch.compile
    traces, not inside `recompute_allowed(False)`, with autograd on, and no one else's
    saved-tensor hooks innermost. Callers check it before they build recipes."""
    if torch.compiler.is_compiling() or not (_ALLOWED[-1] and torch.is_grad_enabled()):
        return False
    return _ours_on_top() is not False


def covered(t: torch.Tensor) -> bool:
    """Whether autograd would keep `t` as a recipe if it were saved now: a Function that may
    keep either its input or its output (the same size) keeps the input when this is true."""
    if torch.compiler.is_compiling() or not _ALLOWED[-1]:
        return False
    return _recipe(t) is not None and _ours_on_top() is True


def _pack(t: torch.Tensor):
    hit = _recipe(t)
    if hit is None:
        return t
    whole = hit[0]
    return _Saved(hit[2], whole.shape, whole.dtype, whole.device, t.shape, t.stride(),
                  t.storage_offset())  # fmt: skip


def _unpack(saved):
    if isinstance(saved, torch.Tensor):
        return saved
    with torch.no_grad():
        whole = saved.make()
    made = (tuple(whole.shape), whole.dtype, whole.device, whole.is_contiguous())
    if made != (tuple(saved.whole), saved.dtype, saved.device, True):
        raise RuntimeError(
            f"a recompute recipe made a tensor of shape, dtype, device, contiguity {made}; the "
            f"forward's was {(tuple(saved.whole), saved.dtype, saved.device, True)}: the recipe "
            "does not match its tensor"
        )
    return whole.as_strided(saved.shape, saved.stride, saved.offset)


class memoized:
    """A recipe that returns the tensor it made last while that is still alive (a view of it
    held elsewhere keeps it so): the tensors one backward step reads together (a scan's q and
    k, slices of one convolution's output) are made once."""

    def __init__(self, make: Callable[[], torch.Tensor]):
        self.make, self.last = make, None

    def __call__(self) -> torch.Tensor:
        made = None if self.last is None else self.last()
        if made is None:
            made = self.make()
            self.last = weakref.ref(made)
        return made


def _ours_on_top() -> bool | None:
    """True if our hooks are the innermost saved-tensor hooks, None if there are none, False
    if someone else's are."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if top is None else top[0] is _pack


def _whole(t: torch.Tensor) -> bool:
    """A tensor that is its storage, laid out contiguously from its start."""
    return (t.numel() > 0 and t.is_contiguous() and t.storage_offset() == 0
            and t.numel() * t.element_size() == t.untyped_storage().nbytes())  # fmt: skip


@contextlib.contextmanager
def recompute_allowed(allowed: bool):
    """`recomputed` contexts entered inside this one recompute (True) or keep everything as
    usual (False): the model's `kernels.recompute_activations`."""
    _ALLOWED.append(allowed)
    try:
        yield
    finally:
        _ALLOWED.pop()


@contextlib.contextmanager
def recomputed(recipes: dict[torch.Tensor, Callable[[], torch.Tensor] | None]):
    """Autograd keeps each of `recipes`' tensors (and views of it) as its recipe in this
    context: see the module docstring. A tensor that is not the whole of its storage, or whose
    recipe is None, is kept as usual."""
    if not active():
        yield
        return
    added = {_key(t): (t, t._version, memoized(make)) for t, make in recipes.items()
             if make is not None and _whole(t)}  # fmt: skip
    added = {key: hit for key, hit in added.items() if key not in _RECIPES}  # the outer's stay
    _RECIPES.update(added)
    try:
        if _ours_on_top():
            yield
        else:
            with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                yield
    finally:
        for key in added:
            del _RECIPES[key]


def with_recipes(recipes: dict[torch.Tensor, Callable[[], torch.Tensor] | None], fn, *args,
                 **kwargs):  # fmt: skip
    """`fn(*args, **kwargs)` inside `recomputed(recipes)`; a plain call where nothing would be
    recomputed. The form for model code: under torch.compile no context manager is traced,
    so a graph break inside `fn` (the scan dispatcher is one) stays resumable."""
    if not active():
        return fn(*args, **kwargs)
    with recomputed(recipes):
        return fn(*args, **kwargs)
