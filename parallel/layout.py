"""The job's rank layout: W ranks as D data-parallel replicas of P sequence-parallel ranks each.

Ranks r = d * P + s: the P consecutive ranks of replica d hold slices s = 0 .. P-1 of the same
rows (DESIGN.md section 5). This module is the only place that knows it; the pre-flight checks,
the DeepSpeed config, the process groups and the batch sources all take a `ParallelLayout`.
Pure arithmetic: no process group is needed to build or test one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """W = `world_size` ranks, P = `sequence_parallel_size`, and this process's `rank`.
    Construction validates (ValueError naming the config field): P >= 1, P divides W, and
    0 <= rank < W."""

    world_size: int
    sequence_parallel_size: int = 1
    rank: int = 0

    def __post_init__(self):
        W, P = self.world_size, self.sequence_parallel_size
        if W < 1:
            raise ValueError(f"a job needs at least one rank (got {W})")
        if P < 1 or W % P:
            raise ValueError(
                f"parallel.sequence_parallel_size = {P} must divide the job's {W} ranks: "
                f"change one of them"
            )
        if not 0 <= self.rank < W:
            raise ValueError(f"rank {self.rank} is outside the job's {W} ranks")

    @property
    def data_parallel_size(self) -> int:
        """D: the replicas that read different rows."""
        return self.world_size // self.sequence_parallel_size

    @property
    def data_rank(self) -> int:
        """d: this rank's replica."""
        return self.rank // self.sequence_parallel_size

    @property
    def sequence_rank(self) -> int:
        """s: this rank's slice of its replica's rows."""
        return self.rank % self.sequence_parallel_size

    def rank_of(self, data_rank: int, sequence_rank: int) -> int:
        return data_rank * self.sequence_parallel_size + sequence_rank

    def sequence_group(self, data_rank: int) -> list[int]:
        """The P ranks that share replica `data_rank`'s rows, slice by slice."""
        return [self.rank_of(data_rank, s) for s in range(self.sequence_parallel_size)]

    def data_group(self, sequence_rank: int) -> list[int]:
        """The D ranks holding slice `sequence_rank` of every replica (gradients average here)."""
        return [self.rank_of(d, sequence_rank) for d in range(self.data_parallel_size)]

    def for_rank(self, rank: int) -> ParallelLayout:
        return ParallelLayout(self.world_size, self.sequence_parallel_size, rank)

    def check_seq_len(self, seq_len: int) -> None:
        """Every slice of a row is whole: P divides train.seq_len (ValueError otherwise)."""
        P = self.sequence_parallel_size
        if seq_len % P:
            raise ValueError(
                f"parallel.sequence_parallel_size = {P} must divide train.seq_len = {seq_len}: "
                f"change one of them"
            )
