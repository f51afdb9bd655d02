"""The chunkwise PyTorch path saves little for backward: its inputs as given (not chunked
copies) and the initial states, never the K x V states entering each chunk or a per-chunk C x C
tensor (scores, decay masks, WY matrices), which it recomputes in the backward. Its gradients
are checked in test_families.py."""

import math

import pytest
import torch

from .families import FAMILIES


def saved_tensors(fn, *args, **kw) -> list[torch.Tensor]:
    """Every distinct tensor the autograd graph of `fn(*args, **kw)` keeps for backward."""
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.shape, t.stride())] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kw)
    return list(saved.values())


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("cu_seqlens", [None, [0, 20, 64]], ids=["rows", "packed"])
def test_backward_keeps_inputs_and_initial_states_only(fam, cu_seqlens):
    B, T, H, K, V, C = 1, 64, 3, 8, 8, 16  # the scan's D = H K differs from C
    gen = torch.Generator().manual_seed(0)
    xs = [x.requires_grad_() for x in fam.make(B, T, H, K, V, gen)]  # float64
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    bounds = [0, T] if cu_seqlens is None else cu_seqlens
    M = sum(math.ceil((e - s) / C) for s, e in zip(bounds[:-1], bounds[1:]))
    saved = saved_tensors(fam.chunk, *xs, cu_seqlens=cu, chunk_size=C, output_final_state=True)
    assert not [t.shape for t in saved if t.dim() >= 2 and t.shape[-2:] == (C, C)]
    state = math.prod(fam.state_shape(1, H, K, V))
    if fam.name == "scan":  # its inputs padded to whole chunks and its D-wide entering states
        bound = 8 * (sum(x.numel() for x in xs) * M * C // T + M * state) + 8 * (M * C + T)
        assert sum(t.numel() * t.element_size() for t in saved) <= bound
        return
    # the inputs themselves, not chunked copies; besides them only the initial states (the
    # backward recomputes the K x V states entering each chunk) and the packed layout's indices
    inputs = {x.untyped_storage().data_ptr() for x in xs}
    others = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    bound = 8 * (len(bounds) - 1) * state + 8 * (M * C + T)
    assert sum(t.numel() * t.element_size() for t in others) <= bound, [t.shape for t in others]
