"""The batch sources of a run: micro batches of packed rows from synthetic documents or from
MDS shards (mosaicml-streaming), for training and for validation.

Each source takes its own config section (`data`), the row shape and the seed, and the
`ParallelLayout`: replica d of D reads its own rows, and the P ranks of a sequence group read
the same rows (each keeps its slice later).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rnnscale.data.packing import PackedRows, collate
from rnnscale.data.synthetic import HELD_OUT, MarkovDocuments
from rnnscale.parallel.layout import ParallelLayout
from rnnscale.train.config import DataSection, RunConfig
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
    if layout.rank == 0:
        shutil.copyfile(data.tokenizer, Path(run_dir) / "tokenizer.model")
    return _packed_loader(data, shape, seed, data.streams, layout,
                          num_workers=data.num_workers)  # fmt: skip


def make_val_batches(data: DataSection, shape: RowShape, seed: int, count: int,
                     layout: ParallelLayout = ONE_RANK) -> list[dict]:  # fmt: skip
    """This rank's first `count` micro batches of the validation data: data.val_streams in
    order (mds), or held-out documents of the synthetic chain."""
    if data.source == "synthetic":
        held_out = SyntheticBatches(data, shape, seed, layout.data_rank,
                                    layout.data_parallel_size, first_index=HELD_OUT)  # fmt: skip
        return [next(held_out) for _ in range(count)]
    loader = _packed_loader(data, shape, seed, data.val_streams, layout, shuffle=False)
    batches = [next(loader) for _ in range(count)]
    loader.close()
    return batches


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
