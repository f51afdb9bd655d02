"""Causal softmax attention with rotary positions through `scaled_dot_product_attention`:
`attn` (global) and `swa` (sliding window: each query sees its last `window` tokens, itself
included, as in Mistral and Griffin's local attention).

Packed documents (`cu_seqlens`) attend only inside themselves and restart their positions.
The state is a key/value cache for generation: `(k, v)` with every past token for `attn`,
`(k, v, position)` with the last `window - 1` tokens for `swa` (a rolling window: memory
stays O(window) however long the generation).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.parallel.sequence import gather_sequence, previous_tokens, ulysses_attention
from rnnscale.train.model import flops
from rnnscale.train.model.layers import MixerDims, apply_rope, positions


class Attention(nn.Module):
    window: int | None = None

    def __init__(self, cfg, dims: MixerDims):
        super().__init__()
        d_model, self.num_heads = dims.d_model, dims.num_heads
        self.head_dim = d_model // self.num_heads
        if self.head_dim % 2:
            raise ValueError(
                f"attention needs an even head width for rotary positions, got {self.head_dim} "
                "(model.d_model / model.num_heads)"
            )
        self.rope_theta = cfg.rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def flops_per_token(self, seq_len: int) -> int:
        d = self.num_heads * self.head_dim
        scores = flops.softmax_attention(self.num_heads, self.head_dim, seq_len, self.window)
        return flops.linear(d, 3 * d) + flops.linear(d, d) + scores

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        B, T, _ = x.shape
        if shard is not None:
            return self._sequence_parallel(x, shard), None
        if cu_seqlens is not None and state is not None:
            raise ValueError("attention cannot continue a key/value cache across packed documents")
        past = self._position(state)
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        pos = positions(B, T, cu_seqlens, past, x.device)  # (B, T)
        q = apply_rope(q, pos, self.rope_theta).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(k, pos, self.rope_theta).transpose(1, 2)  # (B, H, T, D)
        v = v.transpose(1, 2)  # (B, H, T, D)
        if state is not None:
            k = torch.cat([state[0], k], dim=2)  # (B, H, cached + T, D)
            v = torch.cat([state[1], v], dim=2)
        if self.window is not None:
            o = local_attention(q, k, v, self.window, pos[0], heads_first=True)
        elif cu_seqlens is not None:  # no cache: checked above
            rows = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D)
            o = document_attention(*rows, pos[0]).transpose(1, 2)
        else:
            mask = self._mask(T, past, k.shape[2] - T, x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), self._cache(k, v, past + T)

    def _sequence_parallel(self, x, shard) -> torch.Tensor:
        """This rank's slice of the rows: `swa` reads a halo of the previous rank's last
        window - 1 keys and values; `attn` runs DeepSpeed Ulysses (all-to-all from sequence to
        head slices and back) when the heads split evenly over the group, else it all-gathers
        the keys and values. Positions and document masks are those of the whole rows."""
        B, L, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, L, 3, H, D).unbind(2)  # (B, L, H, D) each
        pos = shard.positions.to(x.device)  # (L,)
        q = apply_rope(q, pos.expand(B, L), self.rope_theta)
        k = apply_rope(k, pos.expand(B, L), self.rope_theta)
        if self.window is not None:
            n = self.window - 1
            k = torch.cat([previous_tokens(shard, k, n), k], dim=1)  # (B, n + L, H, D)
            v = torch.cat([previous_tokens(shard, v, n), v], dim=1)
            o = local_attention(q, k, v, self.window, pos)
        elif H % shard.size == 0:
            o = ulysses_attention(shard, q, k, v, _global_attention(shard))
        else:
            end = shard.start + L  # no later key is seen
            k, v = (gather_sequence(shard, x)[:, :end] for x in (k, v))
            o = document_attention(q, k, v, pos)
        return self.o_proj(o.reshape(B, L, -1))

    def _position(self, state) -> int:
        return 0 if state is None else state[0].shape[2]

    def _cache(self, k, v, position: int):
        return (k, v)

    def _mask(self, T: int, past: int, cached: int, device) -> torch.Tensor | None:
        """Global attention's mask over one document: None for a plain causal batch; after a
        cache of `cached` keys, (T, cached + T) booleans (no (T, T) integers)."""
        if cached == 0:
            return None
        key = torch.arange(cached + T, device=device) + (past - cached)  # absolute positions
        return key[None, :] <= (torch.arange(T, device=device) + past)[:, None]


class SlidingWindowAttention(Attention):
    def __init__(self, cfg, dims: MixerDims):
        super().__init__(cfg, dims)
        self.window = cfg.window

    def _position(self, state) -> int:
        return 0 if state is None else state[2]

    def _cache(self, k, v, position: int):
        keep = min(self.window - 1, k.shape[2])  # the next query sees these and itself
        return k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :], position


def _sdpa(q, k, v, mask) -> torch.Tensor:
    """`[B, Tq, H, D]` queries against `[B, Tk, H, D]` keys and values under a `(Tq, Tk)`
    boolean mask (None: causal), in `[B, Tq, H, D]`."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None,
    )  # fmt: skip
    return o.transpose(1, 2)


def _document_causal_mask(pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`(Lq, Lk)`: query t (at `pos[t]` in its document) sees the key `keys[j]` tokens from the
    slice start when that key is not later and is in the same document (no further back than
    `pos[t]`)."""
    query, key = torch.arange(len(pos), device=pos.device)[:, None], keys[None, :]
    # comparisons of a column with a row: boolean (Lq, Lk) masks, no (Lq, Lk) integers
    return (key <= query) & (key >= query - pos[:, None])


def document_attention(q, k, v, pos: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Causal attention inside packed documents: `q [B, L, H, D]` against `k, v [B, n + L, H,
    D]` whose first n keys precede the queries (the rows before a sequence-parallel slice);
    query t (at `pos[t]` in its document) sees the keys t - pos[t] .. t, numbered from query 0.

    The queries go in blocks of `block`, each against the keys from its first query's document
    start to its last query (document starts never decrease along the rows), under its own
    (block, keys) mask: O(L (block + document)) scores and mask where one (L, n + L) mask
    costs O(L (n + L)); a single long document scores about half of the square, and rows
    that are one document from the first query on take the unmasked causal SDPA (PyTorch's
    flash kernels)."""
    L, n = q.shape[1], k.shape[1] - q.shape[1]
    starts = torch.arange(0, L, block, device=pos.device)
    ends = torch.cat([starts, starts.new_tensor([L - 1])])
    first = (ends - pos[ends] + n).clamp(min=0).tolist()  # each block's first key, the last's
    if first[0] == first[-1] == 0 and n == 0:  # one document, from query 0: plain causal
        return _sdpa(q, k, v, None)
    out = []
    for s, lo in zip(range(0, L, block), first):
        e = min(s + block, L)
        keys = torch.arange(lo - n - s, e - s, device=q.device)  # numbered from query s
        mask = _document_causal_mask(pos[s:e], keys)
        out.append(_sdpa(q[:, s:e], k[:, lo : e + n], v[:, lo : e + n], mask))
    return torch.cat(out, 1)


def local_attention(q, k, v, window: int, pos: torch.Tensor, heads_first: bool = False):
    """Sliding-window attention in blocks, O(L * window) work and memory, not O(L^2).

    `q [B, L, H, D]` against `k, v [B, n + L, H, D]` whose first n (< window) tokens precede
    the queries: a generation cache or a sequence-parallel halo (`heads_first`: all three
    `[B, H, ., D]`, and so is the result). Query t sees key j (numbered from query 0) when
    t - window < j <= t, j >= -n, and j >= t - pos[t] (its own document: `pos` `(L,)` is each
    query's position in it). The queries go in blocks of Q = min(window, L); block i's keys
    are its own Q and the window - 1 before (zeros where none exist, masked), so every block
    has the same banded mask: query a sees key b of its block's Q + window - 1 when
    a <= b <= a + window - 1, less the document and cache bounds. Where the blocks would
    score no fewer pairs than the whole (L, n + L) mask (decoding, L near the window), that
    mask instead."""
    if heads_first:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    B, L, H, D = q.shape
    n, halo = k.shape[1] - L, window - 1
    Q = min(window, L)
    nb = -(-L // Q)  # blocks
    if nb * Q * (Q + halo) >= L * (n + L):  # short (decoding, L <~ window): one masked SDPA
        keys = torch.arange(-n, L, device=q.device)
        mask = _document_causal_mask(pos, keys)
        mask &= keys[None, :] > torch.arange(L, device=q.device)[:, None] - window
        o = _sdpa(q, k, v, mask)
        return o.transpose(1, 2) if heads_first else o
    pad = nb * Q - L
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, nb, Q, H, D).permute(0, 3, 1, 2, 4)
    # keys: window - 1 slots before query 0 (the n given, zeros before them), the L, the pad
    k, v = (F.pad(x, (0, 0, 0, 0, halo - n, pad)) for x in (k, v))
    kb, vb = (x.unfold(1, Q + halo, Q).permute(0, 2, 1, 4, 3) for x in (k, v))  # (B,H,nb,S,D)
    a = torch.arange(Q, device=q.device)[:, None]  # query in its block
    b = torch.arange(Q + halo, device=q.device)[None, :]  # key in its block's keys
    first = (torch.arange(nb, device=q.device) * Q)[:, None, None]  # block i's query 0
    doc = F.pad(pos.to(q.device), (0, pad), value=L + halo).view(nb, Q, 1)  # pad: unbounded
    mask = (b >= a) & (b <= a + halo) & (b >= a + halo - doc) & (first + b >= halo - n)
    o = F.scaled_dot_product_attention(
        *(x.reshape(B * H, nb, -1, D) for x in (qb, kb, vb)), attn_mask=mask
    ).view(B, H, nb * Q, D)[:, :, :L]  # fmt: skip
    return o if heads_first else o.transpose(1, 2)


def _global_attention(shard):
    """Causal attention over the whole rows for the heads a rank holds after Ulysses'
    all-to-all, documents kept apart."""

    def attend(q, k, v, *args, **kwargs):  # (B, T, H / P, D) each
        if shard.global_cu_seqlens is None:
            return _sdpa(q, k, v, None)
        return document_attention(q, k, v, shard.global_positions(q.device))

    return attend
