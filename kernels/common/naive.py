"""The step loop behind every family's naive.py: one token at a time, any dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch


def step_loop(
    step: Callable,
    inputs: list[torch.Tensor],
    zero_state: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    output_final_state: bool,
    out_shape: tuple,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `o_t, S = step([x[b, t] for x in inputs] batched as [1, ...], S)` over every sequence.

    Sequences are the batch rows, or the documents of `cu_seqlens` (B = 1); each starts from its
    row of `initial_state` or from `zero_state`. Returns `(out [*out_shape], final [N, ...])`.
    """
    B, T = inputs[0].shape[:2]
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    dtype = inputs[0].dtype
    outs = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, t0, t1) in enumerate(spans):
        S = (zero_state if initial_state is None else initial_state[n].to(dtype))[None]
        for t in range(t0, t1):
            o, S = step([x[b, t][None] for x in inputs], S)
            outs[b][t] = o[0]
        finals.append(S[0])
    out = torch.stack([torch.stack(row) for row in outs]) if T else inputs[0].new_zeros(out_shape)
    return out.reshape(out_shape), (torch.stack(finals) if output_final_state else None)


def naive_linear_attention(
    step: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: list[torch.Tensor],
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step loop of a q/k/v family: `step(q_t, k_t, v_t, *gates_t, S, scale) -> (o_t, S)`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    return step_loop(
        lambda x, S: step(*x, S, scale),
        [q, k, v, *(x.to(q.dtype) for x in gates)],
        q.new_zeros(H, K, V),
        initial_state,
        cu_seqlens,
        output_final_state,
        out_shape=(B, T, H, V),
    )
