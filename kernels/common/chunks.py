"""Chunk layout of (packed) sequences and the sequential scan over chunk states.

Legend: B batch, T time, N sequences (rows, or packed documents), C chunk size, M chunks in all.

Every chunkwise path works on chunks that never straddle two sequences: a batch of B rows is
read as B documents of length T laid end to end, and a packed batch (`cu_seqlens`) as its
documents. Each sequence is cut into ceil(len / C) chunks; the last is padded. Padded positions
read zeros, so a family pads its gates with 0 (decay 1) and its keys with 0, and the state
leaving the padding is the state leaving the sequence.

The only sequential part of a chunkwise scan is the pass of states from chunk to chunk. It runs
in `max chunks per sequence` steps, each over all the sequences that still have a chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ChunkLayout:
    """Where every chunk row comes from, and the order of the state scan."""

    B: int
    T: int
    C: int
    N: int  # sequences
    index: torch.Tensor  # (M, C) long: position in the flat [B*T] sequence; B*T means padding
    steps: list[tuple[torch.Tensor, torch.Tensor]]  # per scan step: (chunk ids, sequence ids)
    rows: bool = False  # B rows of T, no cu_seqlens: chunks are a padded view, no gather

    @property
    def M(self) -> int:
        return self.index.shape[0]


def sequence_bounds(B: int, T: int, cu_seqlens: torch.Tensor | None, C: int):
    """`(bounds, first_chunk)`, lists of N + 1 ints: the token offsets of the sequences in the
    flat `[B * T]` layout (B rows of T laid end to end, or `cu_seqlens`), and where each one's
    ceil(len / C) chunks start among all M chunks (`first_chunk[-1]` = M). The one place the
    PyTorch layout and the Triton launches get their offsets from."""
    if cu_seqlens is None:
        bounds = [i * T for i in range(B + 1)]
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
    first_chunk = [0]
    for s, e in zip(bounds[:-1], bounds[1:]):
        first_chunk.append(first_chunk[-1] + -(-(e - s) // C))
    return bounds, first_chunk


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, C: int, device) -> ChunkLayout:
    """Lay out B rows of T tokens (or the documents of `cu_seqlens`, B = 1) in chunks of C."""
    bounds, first_chunk = sequence_bounds(B, T, cu_seqlens, C)
    starts, ends = bounds[:-1], bounds[1:]
    n_chunks = [b - a for a, b in zip(first_chunk[:-1], first_chunk[1:])]
    rows = []
    for s, e, n in zip(starts, ends, n_chunks):
        pos = torch.arange(s, s + n * C)
        rows.append(torch.where(pos < e, pos, B * T).view(n, C))
    index = torch.cat(rows) if rows else torch.empty(0, C, dtype=torch.long)
    steps = []
    for j in range(max(n_chunks, default=0)):
        seqs = [i for i, n in enumerate(n_chunks) if n > j]
        chunk_ids = torch.tensor([first_chunk[i] + j for i in seqs], device=device)
        steps.append((chunk_ids, torch.tensor(seqs, device=device)))
    return ChunkLayout(B, T, C, len(starts), index.to(device), steps, rows=cu_seqlens is None)


def to_chunks(
    x: torch.Tensor, layout: ChunkLayout, dtype: torch.dtype, fill: float = 0.0
) -> torch.Tensor:
    """`[B, T, *F]` -> `[M, C, *F]` in `dtype`, `fill` at padded positions."""
    if layout.rows:  # pad each row to whole chunks and view: no gather, no scatter backward
        x = x.to(dtype)
        pad = layout.M // layout.B * layout.C - layout.T
        if pad:
            x = torch.cat([x, x.new_full((layout.B, pad, *x.shape[2:]), fill)], dim=1)
        return x.reshape(layout.M, layout.C, *x.shape[2:])
    flat = x.reshape(layout.B * layout.T, *x.shape[2:]).to(dtype)
    flat = torch.cat([flat, flat.new_full((1, *flat.shape[1:]), fill)])  # row B*T: the padding
    return flat[layout.index]


def from_chunks(y: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """`[M, C, *F]` -> `[B, T, *F]`, dropping padded positions."""
    if layout.rows:
        return y.reshape(layout.B, -1, *y.shape[2:])[:, : layout.T]
    # a gather through the inverse of `index`: its backward keeps the indices, not y
    index = layout.index.flatten()
    inverse = torch.empty(layout.B * layout.T + 1, dtype=torch.long, device=index.device)
    inverse[index] = torch.arange(len(index), device=index.device)  # padding lands on B*T
    return y.flatten(0, 1)[inverse[:-1]].view(layout.B, layout.T, *y.shape[2:])


def scan_chunks(
    layout: ChunkLayout,
    state: torch.Tensor,
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    per_chunk: tuple[torch.Tensor, ...],
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass states through the chunks of every sequence, in order.

    `state [N, ...]` enters the first chunk of each sequence. `per_chunk` are tensors `[M, ...]`
    with one row per chunk; `step(S, *rows)` gets the states entering some chunks (one per active
    sequence) and those chunks' rows, and returns `(states leaving them, per-chunk record)`;
    a record may be a tuple of tensors.
    Returns `(records [M, ...] in chunk order, final states [N, ...])`.
    `reverse=True` walks every sequence from its last chunk to its first (the backward pass of
    a state scan: `state` then enters each sequence's last chunk and the result leaves its first).

    The rows are put in scan order once and split, not indexed per step: the backward of an
    index into an [M, ...] tensor allocates all of it, which would make the scan O(M^2).
    Out-of-place throughout, so autograd sees every step.
    """
    if not layout.steps:
        raise ValueError("scan_chunks needs at least one chunk")
    if layout.rows:  # every row has the same chunks: step j reads column j of a [B, M / B] view
        columns = list(zip(*(x.view(layout.B, -1, *x.shape[1:]).unbind(1) for x in per_chunk)))
        records = [None] * len(columns)
        for j in _walk(len(columns), reverse):
            state, records[j] = step(state, *columns[j])
        return _gather(records, lambda rs: torch.stack(rs, 1).flatten(0, 1)), state
    order = torch.cat([chunk_ids for chunk_ids, _ in layout.steps])
    sizes = [len(chunk_ids) for chunk_ids, _ in layout.steps]
    pieces = [x[order].split(sizes) for x in per_chunk]
    records = [None] * len(sizes)
    for j in _walk(len(sizes), reverse):
        seq_ids, rows = layout.steps[j][1], [p[j] for p in pieces]
        if len(seq_ids) == layout.N:  # every sequence active: no gather, no scatter
            state, records[j] = step(state, *rows)
        else:
            new, records[j] = step(state[seq_ids], *rows)
            state = state.index_copy(0, seq_ids, new)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return _gather(records, lambda rs: torch.cat(rs)[inverse]), state


def _walk(n: int, reverse: bool) -> range:
    return range(n - 1, -1, -1) if reverse else range(n)


def _gather(records: list, put_in_order: Callable):
    """Per-step records (tensors, or tuples of tensors) as [M, ...] tensors in chunk order."""
    if isinstance(records[0], tuple):
        return tuple(put_in_order(list(rs)) for rs in zip(*records))
    return put_in_order(records)
