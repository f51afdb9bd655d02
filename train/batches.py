"""The batch sources of a run: micro batches of packed rows from synthetic documents or from
MDS shards (mosaicml-streaming), for training and for validation.

Each source takes its own config section (`data`), the row shape and the seed, and the
`ParallelLayout`: replica d of D reads its own rows, and the P ranks of a sequence group read
the same rows (each keeps its slice later).

Validation from shards (`HeldOutBatches`): replica d's documents (`held_out_documents`: every
D-th, each document of the sets once over all replicas) laid end to end into rows that overlap
by one token, row r holding tokens rT .. rT + T, so every token is a label at most once; the
labels at document starts (BOS) and past the end are IGNORE_INDEX. The whole set is then
exactly its tokens minus its documents of labels (`eval_tokens`). Every rank runs as many micro
batches (the most any replica has): ZeRO-3 gathers parameters in every forward and sequence
parallelism runs collectives in it, so a replica with fewer is padded with micro batches of
ignored labels only, which count no token.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnnscale.data.packing import PackedRows, collate
from rnnscale.data.synthetic import HELD_OUT, MarkovDocuments
from rnnscale.parallel.layout import ParallelLayout
from rnnscale.train.config import ConfigError, DataSection, RunConfig
from rnnscale.train.model.loss import IGNORE_INDEX
from rnnscale.train.notice import notice
from rnnscale.train.preflight import check_streams, check_tokenizer

ONE_RANK = ParallelLayout(1)


@dataclass(frozen=True)
class RowShape:
    """What every micro batch looks like: `micro_batch_size` rows of `seq_len` tokens below
    `vocab_size`."""

    seq_len: int
    micro_batch_size: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: RunConfig) -> RowShape:
        return cls(cfg.train.seq_len, cfg.train.micro_batch_size, cfg.model.vocab_size)


def make_batches(data: DataSection, shape: RowShape, seed: int, run_dir: Path,
                 layout: ParallelLayout = ONE_RANK) -> Iterator[dict]:  # fmt: skip
    """This rank's training micro batches from data.source: synthetic documents, or MDS shards
    (whose tokenizer is copied into the run directory after checking that it fits the model's
    vocabulary; streaming gives every replica its own part)."""
    if data.source == "synthetic":
        return SyntheticBatches(data, shape, seed, layout.data_rank, layout.data_parallel_size)
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # left by a killed earlier run; it would hang this one
    check_streams(data)
    check_tokenizer(data, shape.vocab_size)
    if layout.rank == 0:  # whole or not at all: generation or an export may read it any time
        out = Path(run_dir) / "tokenizer.model"
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.copyfile(data.tokenizer, tmp)
        os.replace(tmp, out)
    return _packed_loader(data, shape, seed, data.streams, layout,
                          num_workers=data.num_workers)  # fmt: skip


def make_val_batches(data: DataSection, shape: RowShape, seed: int, count: int,
                     layout: ParallelLayout = ONE_RANK) -> Sequence[dict]:  # fmt: skip
    """This rank's validation micro batches, the same at every evaluation: the first `count`,
    or with `count` 0 the whole validation set. mds: data.val_streams (`HeldOutBatches`; a
    `count` beyond the set is capped to it, with a notice; collective under torch.distributed);
    synthetic: held-out documents of the chain (endless, so `count` must be > 0)."""
    if data.source == "synthetic":
        if count == 0:
            raise ConfigError(
                "train.eval_batches: 0 (the whole validation set) needs data.source=mds: the "
                "synthetic held-out documents never end; give a number of micro batches"
            )
        held_out = SyntheticBatches(data, shape, seed, layout.data_rank,
                                    layout.data_parallel_size, first_index=HELD_OUT)  # fmt: skip
        return [next(held_out) for _ in range(count)]
    from rnnscale.data.loader import held_out_documents

    docs = held_out_documents([s.path for s in data.val_streams], layout.data_rank,
                              layout.data_parallel_size)  # fmt: skip
    return even_out(HeldOutBatches(docs, shape, data.pack_documents, count or None), count)


def even_out(batches: HeldOutBatches, count: int) -> HeldOutBatches:
    """Collective: every rank gets as many micro batches as the replica with the most (the
    others padded, see the module docstring); a `count` beyond what any replica holds is
    capped to the whole set, with a notice, instead of read again from the start."""
    from rnnscale.data.loader import max_over_ranks

    most = max_over_ranks(batches.real)
    if count > most:
        notice(f"train.eval_batches={count} asks for more micro batches than the validation "
               f"set holds ({most} per rank): each evaluation reads the whole set once "
               f"(train.eval_batches=0 says so)", warning=True)  # fmt: skip
    batches.count = most
    return batches


class HeldOutBatches(Sequence):
    """Micro batches [B, T] of one replica's validation documents in rows that overlap by one
    token (see the module docstring), built when read from the tokens kept compact (their
    shard dtype); `count` of them, those past the documents all padding (PAD inputs,
    IGNORE_INDEX labels). `limit`: read only the documents of the first `limit` micro
    batches."""

    PAD = 0  # any id of the vocabulary: every label next to it is ignored

    def __init__(self, documents: Iterator[np.ndarray], shape: RowShape, pack_documents: bool,
                 limit: int | None = None):  # fmt: skip
        T, B = shape.seq_len, shape.micro_batch_size
        enough = math.inf if limit is None else limit * B * T + 1
        parts, starts, n = [], [], 0
        for doc in documents:
            parts.append(doc)
            starts.append(n)
            n += len(doc)
            if n >= enough:
                break
        self.tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)  # (N,)
        self.starts = np.array(starts, dtype=np.int64)  # where each document begins
        self.T, self.B, self.pack = T, B, pack_documents
        rows = math.ceil(max(n - 1, 0) / T)
        self.real = math.ceil(rows / B) if limit is None else min(math.ceil(rows / B), limit)
        self.count = self.real

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(index)
        T, B = self.T, self.B
        inputs = torch.full((B, T + 1), self.PAD, dtype=torch.int64)  # (B, T + 1)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
        offsets = [b * T for b in range(B)]  # every row starts afresh, as in training
        for b in range(B if index < self.real else 0):
            first = (index * B + b) * T  # the row's first token in the replica's stream
            take = torch.from_numpy(self.tokens[first : first + T + 1].astype(np.int64))
            if len(take) < 2:
                continue  # past the last token: padding
            inputs[b, : len(take)] = take
            labels[b, : len(take) - 1] = take[1:]
            inside = self.starts[(self.starts > first) & (self.starts < first + len(take))]
            inside -= first  # document starts in the row, as positions 1 .. T
            labels[b, torch.from_numpy(inside - 1)] = IGNORE_INDEX  # no BOS is predicted
            offsets += [b * T + int(p) for p in inside if p < T]
        cu_seqlens = None
        if self.pack:
            cu_seqlens = torch.tensor(sorted(offsets) + [B * T], dtype=torch.int32)
        return {"input_ids": inputs[:, :-1], "labels": labels, "cu_seqlens": cu_seqlens}


def _packed_loader(data: DataSection, shape: RowShape, seed: int, streams,
                   layout: ParallelLayout, **options):  # fmt: skip
    """A PackedLoader over `streams`; the P ranks of a sequence group replicate one part."""
    from rnnscale.data.loader import PackedLoader

    return PackedLoader(
        [(s.path, s.proportion) for s in streams],
        seq_len=shape.seq_len,
        micro_batch_size=shape.micro_batch_size,
        seed=seed,
        num_canonical_nodes=data.num_canonical_nodes,
        docs_per_batch=data.docs_per_batch,
        pack_documents=data.pack_documents,
        replication=layout.sequence_parallel_size,
        **options,
    )


class SyntheticBatches:
    """Micro batches of packed synthetic documents, the same for the same seed: one stream of
    micro batches, of which replica r takes numbers r, r + W, r + 2W, ... So a step sees the
    same rows on W replicas as on one with W times the accumulation. Resumable: the state is
    the packer's position and the stream's micro batch number."""

    def __init__(self, data: DataSection, shape: RowShape, seed: int, rank: int = 0,
                 world: int = 1, first_index: int = 0):  # fmt: skip
        docs = MarkovDocuments(shape.vocab_size, data.mean_doc_len, seed,
                               first_index=first_index)  # fmt: skip
        self.rows = PackedRows(docs, shape.seq_len)
        self.micro, self.pack = shape.micro_batch_size, data.pack_documents
        self.rank, self.world, self.index = rank, world, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            picked = [self.rows.next_row() for _ in range(self.micro)]
            self.index += 1
            if (self.index - 1) % self.world == self.rank:
                return collate(picked, self.pack)

    def line_up(self, rows: int) -> None:
        """Nothing to read ahead: the rows are drawn, not read (PackedLoader.line_up)."""

    def state_dict(self) -> dict:
        return {"rows": self.rows.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state["rows"])
        self.index = int(state["index"])

    @staticmethod
    def reshard(states: list[dict], world: int) -> list[dict]:
        """The states for `world` ranks from those of another world size. Every rank walks the
        one stream; the rank that took the step's last micro batch is furthest, and every rank
        of the new world continues from there."""
        furthest = max(states, key=lambda s: s["index"])
        return [furthest] * world
