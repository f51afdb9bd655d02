"""Sequence parallelism (SP): the process groups, the slice of the sequence each rank holds, and
the collectives between the ranks of a sequence group, each counting the bytes it moves
(DESIGN.md section 5, docs/scans.md section 5, docs/parallelism.md).

Legend: W world size, P sequence-parallel size, D = W / P data-parallel replicas, B rows,
T tokens of a whole row, L = T / P tokens of a slice.

The ranks of sequence group d hold slices s = 0 .. P-1 of the same rows, in order
(`rnnscale.parallel.layout.ParallelLayout` places them). A packed batch (one row with
`cu_seqlens`) is cut the same way; documents that cross a slice boundary continue on the next
rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rnnscale.parallel.layout import ParallelLayout
from rnnscale.parallel.p2p import exchange, message_tag

# ---------------------------------------------------------------------------------------------
# process groups


class ParallelGroups:
    """The data x sequence parallel groups of the job, and the `mpu` DeepSpeed reads
    (`deepspeed.initialize(mpu=...)`, deepspeed/utils/groups.py).

    DeepSpeed partitions ZeRO states and reduces gradients over its "sequence data parallel"
    group, here all W ranks, and divides the summed gradients by D (not W): each rank's loss is
    therefore its slice's share of its rows' mean (the slice's summed token losses over the
    token count of the whole rows), and the P shares add up to the rows' loss.

    Model parallelism has size 1. DeepSpeed's own `runtime/sequence_parallel/parallel_state_sp`
    aliases model parallelism to the sequence group, which makes ZeRO 1-2 count only the
    gradient partitions of each group's first rank in the gradient norm
    (`stage_1_and_2.get_grad_norm_direct`); clipping would then use a wrong norm.
    """

    def __init__(self, layout: ParallelLayout, state_exchange: str = "scan", scan_blocks: int = 4):
        self.layout = layout
        self.state_exchange, self.scan_blocks = state_exchange, scan_blocks
        P, world, rank = layout.sequence_parallel_size, layout.world_size, layout.rank
        self.size, self.world, self.rank = P, world, rank
        self.sequence_rank, self.data_parallel_rank = layout.sequence_rank, layout.data_rank
        self.data_parallel_size = layout.data_parallel_size
        self.sequence_group = self.data_group = self.model_group = None
        for d in range(self.data_parallel_size):  # every rank takes part in creating every group
            group = dist.new_group(layout.sequence_group(d))
            if d == self.data_parallel_rank:
                self.sequence_group = group
        for s in range(P):
            group = dist.new_group(layout.data_group(s))
            if s == self.sequence_rank:
                self.data_group = group
        for r in range(world):
            group = dist.new_group([r])
            if r == rank:
                self.model_group = group
        self.world_group = dist.new_group(list(range(world)))
        self.stats = CommStats()

    # the mpu interface (deepspeed.utils.groups)
    def get_sequence_parallel_group(self):
        return self.sequence_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.size

    def get_sequence_parallel_rank(self) -> int:
        return self.sequence_rank

    def get_sequence_data_parallel_group(self):
        return self.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.layout.data_group(self.sequence_rank)

    def get_model_parallel_group(self):
        return self.model_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def shard(self, length: int, cu_seqlens: torch.Tensor | None = None, device=None) -> Shard:
        """This rank's slice of rows `length` tokens long (`cu_seqlens`: one packed row), its
        tensors on `device` (default: cu_seqlens', or the CPU)."""
        shard = Shard.of(self.sequence_group, self.sequence_rank, self.size, length, cu_seqlens,
                         self.stats, device)  # fmt: skip
        shard.state_exchange, shard.scan_blocks = self.state_exchange, self.scan_blocks
        return shard


# ---------------------------------------------------------------------------------------------
# communication accounting: the same formulas count what runs and predict any scale


@dataclass
class CommStats:
    """Bytes each rank sent, per kind of SP collective, since the last `take()`."""

    sent: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    def take(self) -> dict[str, int]:
        sent, self.sent = self.sent, {}
        return sent


def all_gather_bytes(nbytes: int, P: int) -> int:
    """Bytes one rank sends in an all-gather of `nbytes` per rank (ring: P - 1 pieces)."""
    return (P - 1) * nbytes


def all_to_all_bytes(nbytes: int, P: int) -> int:
    """Bytes one rank sends in an all-to-all of its `nbytes` (all but its own 1/P)."""
    return nbytes * (P - 1) // P


def state_passing_bytes(P: int, transition_numel: int, state_numel: int) -> int:
    """One recurrent layer, forward and backward: an all-gather of (transition, state) in fp32
    and its mirror in the backward. Independent of the sequence length."""
    return 2 * all_gather_bytes(4 * (transition_numel + state_numel), P)


def ulysses_bytes(P: int, B: int, T: int, H: int, D: int, itemsize: int) -> int:
    """One attention layer under DeepSpeed Ulysses, forward and backward: all-to-alls of the
    slice's q, k, v and output (B x L x H x D each) forward, and the same four backward."""
    return 8 * all_to_all_bytes(B * (T // P) * H * D * itemsize, P)


def kv_gather_bytes(P: int, B: int, T: int, H: int, D: int, itemsize: int) -> int:
    """One attention layer that all-gathers keys and values, forward and backward (the
    backward reduce-scatters their gradients: the same volume)."""
    return 2 * 2 * all_gather_bytes(B * (T // P) * H * D * itemsize, P)


# ---------------------------------------------------------------------------------------------
# the slice a rank holds


@dataclass
class Shard:
    """One rank's slice `[start, start + length)` of rows `total` tokens long.

    cu_seqlens: the slice's own packed documents (the global boundaries inside it, 0 and
        length), or None for plain rows.
    continues: the slice's first token continues a sequence from the previous rank (rows: every
        rank but the first; packed: unless a document starts exactly there).
    positions: `[length]` every token's position inside its own document (or row).
    first_length: tokens of the slice's first sequence (a host int: no device sync per layer).
    state_exchange, scan_blocks: how recurrent states pass between the ranks
        (`rnnscale.parallel.state_exchange`; parallel.sp_state_exchange, sp_scan_blocks).
    """

    group: object
    rank: int
    size: int
    start: int
    length: int
    total: int
    cu_seqlens: torch.Tensor | None
    global_cu_seqlens: torch.Tensor | None
    continues: bool
    positions: torch.Tensor
    stats: CommStats
    first_length: int = 0
    exchanges: int = 0  # point-to-point exchanges so far: each one's messages carry own tags
    state_exchange: str = "scan"
    scan_blocks: int = 4

    @classmethod
    def of(cls, group, rank, size, total, global_cu_seqlens=None, stats=None,
           device=None) -> Shard:  # fmt: skip
        if total % size:
            raise ValueError(
                f"a sequence of {total} tokens does not split into {size} equal slices "
                "(parallel.sequence_parallel_size): make train.seq_len (times the micro batch "
                "for packed data) a multiple of it"
            )
        length = total // size
        start = rank * length
        if device is None:
            device = global_cu_seqlens.device if global_cu_seqlens is not None else "cpu"
        stats = stats or CommStats()
        index = torch.arange(start, start + length)  # the arithmetic runs on the host, once
        if global_cu_seqlens is None:
            return cls(group, rank, size, start, length, total, None, None, rank > 0,
                       index.to(device), stats, length)  # fmt: skip
        bounds = global_cu_seqlens.to("cpu", torch.long)
        if int(bounds[0]) != 0 or int(bounds[-1]) != total:
            raise ValueError(f"cu_seqlens must run from 0 to {total}, got {bounds.tolist()}")
        doc = torch.searchsorted(bounds, index, right=True) - 1  # (L,)
        positions = index - bounds[doc]
        inner = torch.unique(bounds[(bounds > start) & (bounds < start + length)]) - start
        local = torch.cat([bounds.new_zeros(1), inner, bounds.new_full((1,), length)])
        return cls(group, rank, size, start, length, total,
                   local.to(device, global_cu_seqlens.dtype), global_cu_seqlens.to(device),
                   bool(positions[0] > 0), positions.to(device), stats,
                   int(local[1]))  # fmt: skip

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a whole-row tensor along `dim`."""
        return x.narrow(dim, self.start, self.length)

    def global_positions(self, device) -> torch.Tensor:
        """`[T]` every token's position inside its document over the whole rows."""
        index = torch.arange(self.total, device=device)
        if self.global_cu_seqlens is None:
            return index
        bounds = self.global_cu_seqlens.to(device=device, dtype=torch.long)
        return index - bounds[torch.searchsorted(bounds, index, right=True) - 1]


# ---------------------------------------------------------------------------------------------
# collectives (autograd functions: the backward is the mirrored collective)


class _GatherStates(torch.autograd.Function):
    """All-gather of one flat fp32 tensor per rank -> `[P, n]`; the backward sums every rank's
    gradient for piece r onto rank r (an all-to-all, which gloo has, then a sum)."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x.contiguous(), group=shard.group)
        shard.stats.record("state", all_gather_bytes(x.numel() * x.element_size(), shard.size))
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        shard = ctx.shard
        received = [torch.empty_like(grad[0]) for _ in range(shard.size)]
        dist.all_to_all(received, list(grad.contiguous().unbind(0)), group=shard.group)
        shard.stats.record("state", all_gather_bytes(grad[0].numel() * grad.element_size(),
                                                     shard.size))  # fmt: skip
        return torch.stack(received).sum(0), None


def gather_states(shard: Shard, x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape everywhere) stacked in rank order, `[P, *x.shape]`."""
    return _GatherStates.apply(x.reshape(-1), shard).view(shard.size, *x.shape)


class _Halo(torch.autograd.Function):
    """The previous rank's `tail` (zeros on the first rank); the backward sends the gradient of
    what a rank received back to the rank it came from."""

    @staticmethod
    def forward(ctx, tail, shard):
        ctx.shard, ctx.tag = shard, message_tag(shard)  # the backward answers with tag + 1
        received = torch.zeros_like(tail)
        exchange(shard, tail.contiguous(), received, ctx.tag, forward=True)
        shard.stats.record(
            "halo", tail.numel() * tail.element_size() * (shard.rank < shard.size - 1)
        )
        return received

    @staticmethod
    def backward(ctx, grad):
        shard = ctx.shard
        back = torch.zeros_like(grad)
        exchange(shard, grad.contiguous(), back, ctx.tag + 1, forward=False)
        shard.stats.record("halo", grad.numel() * grad.element_size() * (shard.rank > 0))
        return back, None


def previous_tokens(shard: Shard, x: torch.Tensor, n: int) -> torch.Tensor:
    """The previous rank's last `n` tokens of `x [B, L, ...]`, `[B, n, ...]` oldest first, with
    the ones that belong to another document than this slice's first token (and all of them
    on the first rank) set to zero."""
    if n > shard.length:
        raise ValueError(
            f"a halo of {n} tokens is longer than the {shard.length}-token slice each rank "
            "holds: lower the window or convolution size, or parallel.sequence_parallel_size"
        )
    halo = _Halo.apply(x[:, x.shape[1] - n :], shard)
    back = torch.arange(n, 0, -1, device=x.device)  # how far before the slice start
    keep = back <= shard.positions[0].to(x.device)  # still inside the first token's document
    return halo * keep.view(1, n, *([1] * (x.dim() - 2))).to(halo.dtype)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence: `[B, L, ...]` -> `[B, T, ...]`; the backward hands every
    rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x.contiguous(), group=shard.group)
        shard.stats.record("kv_gather", all_gather_bytes(x.numel() * x.element_size(), shard.size))
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        shard = ctx.shard
        pieces = [p.contiguous() for p in grad.chunk(shard.size, dim=1)]
        received = [torch.empty_like(pieces[0]) for _ in range(shard.size)]
        dist.all_to_all(received, pieces, group=shard.group)
        nbytes = pieces[0].numel() * pieces[0].element_size()
        shard.stats.record("kv_gather", all_gather_bytes(nbytes, shard.size))
        return torch.stack(received).float().sum(0).to(grad.dtype), None  # summed in fp32


def gather_sequence(shard: Shard, x: torch.Tensor) -> torch.Tensor:
    """The whole rows of `x [B, L, ...]` from every rank's slice, `[B, T, ...]`."""
    return _GatherSequence.apply(x, shard)


def halo_state(shard: Shard, x: torch.Tensor, n: int, cu_seqlens) -> torch.Tensor:
    """A causal convolution's initial state `[N, D, n]` (oldest first) for this slice of
    `x [B, L, D]`: the previous rank's last n inputs for the sequences that continue from it
    (every row, or the first packed document), zeros for the others."""
    halo = previous_tokens(shard, x, n).transpose(1, 2)  # (B, D, n)
    if cu_seqlens is None:
        return halo
    return torch.cat([halo, halo.new_zeros(len(cu_seqlens) - 2, *halo.shape[1:])])


def ulysses_attention(shard: Shard, q, k, v, attend) -> torch.Tensor:
    """DeepSpeed Ulysses (`deepspeed.sequence.layer.DistributedAttention`): all-to-alls turn
    this rank's slice of every head, `[B, L, H, D]`, into the whole rows of H / P heads,
    `attend(q, k, v)` runs on those, and one more all-to-all brings the output back to
    `[B, L, H, D]`. Counts 4 all-to-alls forward and 4 backward."""
    from deepspeed.sequence.layer import DistributedAttention

    attention = DistributedAttention(attend, shard.group, scatter_idx=2, gather_idx=1)
    nbytes = all_to_all_bytes(q.numel() * q.element_size(), shard.size)
    shard.stats.record("ulysses", 4 * nbytes)
    o = attention(q, k, v, 0)
    if o.requires_grad:
        o.register_hook(lambda grad: shard.stats.record("ulysses", 4 * nbytes))
    return o


def group_sum(shard: Shard, x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the sequence group (no gradient: counts, not activations)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=shard.group)
    return x
