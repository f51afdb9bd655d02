"""The training loader: documents from mosaicml-streaming MDS shards, packed into rows.

Legend: B rows per micro batch, T = seq_len, W ranks, D documents per streaming batch.

`StreamingDataset` over one or more `Stream`s (a prepared directory, local or remote, each with
a proportion) shuffles with a fixed seed and a fixed canonical node count, so the order of
documents a rank sees depends only on (seed, canonical nodes, world size, D). It is read D
documents at a time by `PackedRows` in the training process, which lays them end to end into rows
of T + 1 tokens; `collate` marks every document start inside a row in `cu_seqlens`.

Shards are checked before use (`integrity.check_stream`): every shard file of a local stream
at the size its index records, and at least one document; a damaged one is named, with what
to run, instead of failing inside streaming mid-run. A remote stream's cached shards are
checked the same way, and streaming checks each download against its recorded hash.

Worker processes (`num_workers`, a PyTorch DataLoader over the dataset, one streaming batch of
D documents per DataLoader batch) read and decode ahead of the step. Streaming partitions the
samples over canonical nodes, ranks and workers so that the batches, taken round-robin from the
workers, come in the same order for any worker count; so the packer, and its resume, do not
depend on it (tested: resume with another worker count continues with the same rows).

Exact resume. The packer's position is (documents pulled from the stream, the unused part of
the last ones). Ranks pull different numbers of documents (documents differ in length), but
streaming resumes all ranks at one global sample count. So `state_dict()` first makes every rank
pull up to the same count (the largest, in whole streaming batches), keeping the extra documents
in its buffer, and saves the buffer per rank; `load_state_dict()` resumes the stream there and
restores the buffer. The next rows are exactly those of the loader that never stopped.

Lock step. Streaming starts every epoch (and the stream after a resume) behind a barrier of all
ranks on a node (`StreamingDataset.__iter__`). Ranks use up documents at different rates, so a
rank that read the stream inside a step could wait at that barrier for a rank that waits for it
in the step's all-reduce: a deadlock (a resume from 1 rank to 2 hung so at its first step). So
the stream is read only in `line_up`, which the trainer calls before every step: each rank
reads until it holds the documents of the step's rows, and every rank reads as many stream
batches as the rank that needs the most (one all-reduce of one number per round, usually one
round). All ranks then cross into an epoch at the same call.

Validation sets are not packed here: `held_out_documents` reads a replica's part of them by
index, every document once over all replicas (train/batches.py makes the rows).

Another world size (`PackedLoader.reshard`). Streaming resumes at a global sample count for any
number of ranks (with the same canonical node count), so the stream continues where all old
ranks together stopped. What the old ranks had pulled but not yet packed (the rest of the
document they were in, and the documents lined up by `state_dict`) is dealt to the new ranks:
old rank j's to new rank j mod W. No document is dropped or read twice; the rows differ from
those of a run that always had the new world size (they would anyway: a rank packs only its own
documents).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rnnscale.data.integrity import HASH, check_cache, check_stream
from rnnscale.data.packing import PackedRows, collate


class _Documents:
    """Documents pulled from the stream, indexable by their running number (what PackedRows
    needs); keeps only the ones not yet fully packed."""

    def __init__(self, batches: Iterator[list[np.ndarray]]):
        self.batches = batches
        self.first = 0  # running number of buffer[0]
        self.buffer: list[np.ndarray] = []

    @property
    def pulled(self) -> int:
        return self.first + len(self.buffer)

    def pull(self) -> None:
        self.buffer.extend(next(self.batches))  # endless: the batches go epoch after epoch

    def __getitem__(self, index: int) -> np.ndarray:
        while index >= self.pulled:
            self.pull()
        if index > self.first:  # packed documents are never read again
            del self.buffer[: index - self.first]
            self.first = index
        return self.buffer[index - self.first]


class PackedLoader:
    """Micro batches `{input_ids, labels [B, T], cu_seqlens}` from MDS shards, resumable.

    streams: `[(path, proportion)]`; proportions are normalised (None for a single stream).
    replication: consecutive ranks that get the same samples (streaming's `replication`): the
        sequence-parallel size, whose ranks each keep their slice of the same rows.
    """

    def __init__(
        self,
        streams: list[tuple[str, float | None]],
        *,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_canonical_nodes: int = 1,
        docs_per_batch: int = 16,
        pack_documents: bool = True,
        num_workers: int = 0,
        replication: int = 1,
    ):
        from streaming import Stream, StreamingDataset

        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.pack_documents = pack_documents
        self.docs_per_batch, self.num_workers = docs_per_batch, num_workers
        self.replication = replication
        weighted = len(streams) > 1
        for path, _ in streams:
            if "://" not in path:
                check_stream(path)  # every shard file at its indexed size (data/integrity.py)
        stream_list = [_stream(Stream, path, p if weighted else None) for path, p in streams]
        self.dataset = StreamingDataset(
            streams=stream_list,
            shuffle=shuffle,
            shuffle_seed=seed,
            num_canonical_nodes=num_canonical_nodes,
            batch_size=docs_per_batch,
            replication=replication if replication > 1 else None,
        )
        for (path, _), stream in zip(streams, stream_list, strict=True):
            if "://" in path and check_cache(stream.local, path):
                stream.validate_hash = HASH  # streaming checks each shard it downloads
        self._restart(None)

    def _restart(self, buffer_state: dict | None) -> None:
        if hasattr(self, "docs"):
            self.docs.batches.close()  # stops the old epoch's worker processes
        self.docs = _Documents(self._batches())
        self.rows = PackedRows(self.docs, self.seq_len)
        self.stream_batches, self.stream_tokens = 0, 0  # read by _pull: tokens per batch
        self.epoch_start = 0  # running number of the first document of the current epoch
        self.sample_offset = 0  # samples of this epoch read before epoch_start (by all ranks)
        if buffer_state is not None:
            self.docs.first = buffer_state["first"]
            self.docs.buffer = [np.asarray(d, dtype=np.int64) for d in buffer_state["buffer"]]
            self.rows.load_state_dict(buffer_state["rows"])
            self.epoch_start = buffer_state["epoch_start"]
            self.sample_offset = buffer_state.get("sample_offset", 0)

    def _batches(self) -> Iterator[list[np.ndarray]]:
        """The rank's documents, D at a time, epoch after epoch (streaming reshuffles each)."""
        resumed = True  # the first epoch may be a resumed one: keep its recorded start
        while True:
            if not resumed:
                self.epoch_start, self.sample_offset = self.docs.pulled, 0
            resumed, seen = False, 0
            for batch in self._epoch():
                seen += len(batch)
                yield batch
            if seen == 0 and self.docs.pulled == self.epoch_start and not self.sample_offset:
                raise ValueError("the data streams hold no documents")

    def _epoch(self) -> torch.utils.data.DataLoader:
        """One epoch of the rank's documents, D per batch (the last one may be short)."""
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.docs_per_batch,
            num_workers=self.num_workers,
            collate_fn=_token_arrays,
        )

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop reading: the epoch's worker processes end; the loader is not used again."""
        self.docs.batches.close()

    def __next__(self) -> dict:
        picked = [self.rows.next_row() for _ in range(self.micro_batch_size)]
        return collate(picked, self.pack_documents)

    def line_up(self, rows: int) -> None:
        """Collective, before every step: this rank holds the documents of its next `rows` rows,
        read here, every rank the same number of stream batches (see the module docstring,
        "Lock step"), so that no rank reads the stream inside a step."""
        need = rows * (self.seq_len + 1)
        while True:
            unpacked = self.docs.buffer[self.rows.doc_index - self.docs.first :]
            short = need - (sum(len(d) for d in unpacked) - self.rows.offset)
            wanted = 0
            if short > 0:  # the batches this takes at the tokens per batch seen so far
                seen = self.stream_tokens / self.stream_batches if self.stream_batches else 0
                wanted = math.ceil(short / seen) if seen else 1
            batches = max_over_ranks(wanted)
            if batches == 0:
                return
            for _ in range(batches):
                self._pull()

    def _pull(self) -> None:
        before = self.docs.pulled
        self.docs.pull()
        self.stream_batches += 1
        self.stream_tokens += sum(len(d) for d in self.docs.buffer[before - self.docs.first :])

    def state_dict(self) -> dict:
        """This rank's position. Collective under torch.distributed: every rank calls it."""
        target = max_over_ranks(self.docs.pulled - self.epoch_start)
        while self.docs.pulled - self.epoch_start < target:  # one stream position for all
            self._pull()
        readers = _world_size() // self.replication  # ranks that read different samples
        in_epoch = self.sample_offset + (self.docs.pulled - self.epoch_start) * readers
        return {
            "stream": self.dataset.state_dict(num_samples=in_epoch, from_beginning=True),
            "epoch_start": self.epoch_start,
            "sample_offset": self.sample_offset,
            "first": self.docs.first,
            "buffer": [d.tolist() for d in self.docs.buffer],
            "rows": self.rows.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["stream"])
        self._restart(state)

    @staticmethod
    def reshard(states: list[dict], world: int) -> list[dict]:
        """The states for `world` ranks from the `state_dict()`s of all ranks of another world
        size (see the module docstring): the stream goes on at the old ranks' global position;
        old rank j's unpacked documents go to new rank j mod `world`, the one it was in the
        middle of from where it stopped."""
        leftovers = []
        for s in states:
            rest = s["buffer"][s["rows"]["doc_index"] - s["first"] :]
            if rest and s["rows"]["offset"]:
                rest = [rest[0][s["rows"]["offset"] :], *rest[1:]]
            leftovers.append(rest)
        stream = states[0]["stream"]
        out = []
        for rank in range(world):
            docs = [d for j in range(rank, len(states), world) for d in leftovers[j]]
            out.append({
                "stream": stream,
                "epoch_start": len(docs),  # the stream's next document is this rank's
                "sample_offset": stream["sample_in_epoch"],
                "first": 0,
                "buffer": docs,
                "rows": {"doc_index": 0, "offset": 0},
            })  # fmt: skip
        return out


def held_out_documents(paths: list[str], replica: int, replicas: int) -> Iterator[np.ndarray]:
    """The documents of the validation sets `paths`, each once and in order: the sets as
    listed, each in the order `data prepare` wrote it (streaming's global sample ids). Replica
    `replica` of `replicas` gets documents replica, replica + replicas, ...: disjoint parts
    that together are every document once, of about equal tokens. Read by index, not by
    iterating a StreamingDataset: streaming pads a partition with repeated samples, and an
    epoch starts behind a barrier of the node's ranks (see "Lock step")."""
    from streaming import Stream, StreamingDataset

    for path in paths:
        if "://" not in path:
            check_stream(path)
    streams = [_stream(Stream, path, None) for path in paths]
    dataset = StreamingDataset(streams=streams, shuffle=False, batch_size=1)
    for path, stream in zip(paths, streams, strict=True):
        if "://" in path and check_cache(stream.local, path):
            stream.validate_hash = HASH
    for i in range(replica, dataset.num_samples, replicas):
        yield dataset[i]["tokens"]  # (the shard's dtype: 2 bytes a token when it fits)


def _token_arrays(samples: list[dict]) -> list[np.ndarray]:
    return [s["tokens"].astype(np.int64) for s in samples]


def _stream(Stream, path: str, proportion: float | None):
    """A local directory is read in place; a remote one (s3://, gs://, ...) is cached under the
    system temp directory, one folder per URL."""
    if "://" not in path:
        return Stream(local=path, proportion=proportion)
    cache = (
        Path(tempfile.gettempdir())
        / "rnnscale-streams"
        / hashlib.sha1(path.encode()).hexdigest()[:16]
    )
    return Stream(remote=path, local=str(cache), proportion=proportion)


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks (collective under torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.long)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)
    return value


def _world_size() -> int:
    """The ranks that share the stream (streaming reads the same from the environment)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
