"""Pack a stream of documents into rows of `seq_len + 1` tokens and batch them with cu_seqlens.

A row's first seq_len tokens are inputs and its last seq_len are labels. Documents are laid end
to end; one that does not fit goes on in the next row. `cu_seqlens` of a batch are the offsets,
in the batch flattened to one row, of every row start and every document start inside a row:
the recurrent state resets at each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class PackedRows:
    """Cuts rows from `documents[0], documents[1], ...`; resumable through `state_dict()`."""

    def __init__(self, documents: Sequence[np.ndarray], seq_len: int):
        self.documents = documents
        self.seq_len = seq_len
        self.doc_index = 0  # the document the next row starts in
        self.offset = 0  # tokens of it already used

    def next_row(self) -> tuple[np.ndarray, list[int]]:
        """(tokens [seq_len + 1], input positions where a document starts; 0 always included)."""
        need = self.seq_len + 1
        parts, starts, filled = [], [0], 0
        while filled < need:
            doc = self.documents[self.doc_index]
            if self.offset == 0 and 0 < filled < self.seq_len:
                starts.append(filled)
            take = min(len(doc) - self.offset, need - filled)
            parts.append(doc[self.offset : self.offset + take])
            filled += take
            self.offset += take
            if self.offset == len(doc):
                self.doc_index, self.offset = self.doc_index + 1, 0
        return np.concatenate(parts), starts

    def state_dict(self) -> dict:
        return {"doc_index": self.doc_index, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.doc_index, self.offset = int(state["doc_index"]), int(state["offset"])


def collate(rows: list[tuple[np.ndarray, list[int]]], pack_documents: bool) -> dict:
    """Batch rows: input_ids and labels `[B, seq_len]`, and cu_seqlens (int32) or None.

    With pack_documents the batch is meant to be run flattened, `input_ids.view(1, -1)`, with
    cu_seqlens marking every row and document start; without, rows are plain sequences.
    """
    tokens = torch.from_numpy(np.stack([r for r, _ in rows]))  # (B, seq_len + 1)
    B, T = tokens.shape[0], tokens.shape[1] - 1
    cu_seqlens = None
    if pack_documents:
        offsets = [b * T + s for b, (_, starts) in enumerate(rows) for s in starts] + [B * T]
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "cu_seqlens": cu_seqlens}
