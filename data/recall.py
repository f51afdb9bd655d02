"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023): the synthetic task that
measures how much a recurrent model can hold in its state, made on the fly from token ids.

A row is `BOS k_1 v_1 ... k_n v_n [gap] q_1 a_1 ... q_m a_m`: n key/value pairs (distinct keys,
values drawn with replacement), optionally a gap of filler tokens (the distance the pairs must be
held over), then m of the keys again in a random order, each followed by its value. Only the
answers a_j are scored (every other label is IGNORE = -100); a prediction is right when the most
likely token after q_j is a_j. Without the pairs the best a model can do is guess a value: loss
ln(num_values), accuracy 1 / num_values.

Ids: 0-2 the specials, keys from FIRST_KEY, then the values. The gap is filled with id 0 (the
unknown piece: never a key or a value), as Zoology fills its gaps with 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BOS = 1
IGNORE = -100
FIRST_KEY = 3


class AssociativeRecall:
    """`batch(index, rows)`: rows `[index * rows, (index + 1) * rows)` of the task, the same for
    the same seed and index. `length`: the row's tokens (inputs), filled by a gap after the
    pairs; 0: no gap, `seq_len` = 2 (pairs + queries)."""

    def __init__(self, num_keys: int, num_values: int, pairs: int, queries: int, seed: int,
                 length: int = 0):  # fmt: skip
        if not 0 < queries <= pairs <= num_keys or num_values < 1:
            raise ValueError(f"need 0 < queries <= pairs <= num_keys and num_values >= 1, got "
                             f"{queries}, {pairs}, {num_keys}, {num_values}")  # fmt: skip
        if length and length < 2 * (pairs + queries):
            raise ValueError(f"a row of {pairs} pairs and {queries} queries needs length >= "
                             f"{2 * (pairs + queries)}, got {length}")  # fmt: skip
        self.num_keys, self.num_values = num_keys, num_values
        self.pairs, self.queries, self.seed = pairs, queries, seed
        self.gap = length - 2 * (pairs + queries) if length else 0

    filler = 0

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.pairs + self.queries) + self.gap  # BOS + everything but a_m

    @property
    def memoryless_loss(self) -> float:
        """Cross-entropy of the best guess that ignores the pairs: uniform over the values."""
        return math.log(self.num_values)

    def batch(self, index: int, rows: int) -> dict:
        """input_ids and labels `[rows, seq_len]` (cu_seqlens None: one sequence per row)."""
        rng = np.random.default_rng([self.seed, index])
        first_value = FIRST_KEY + self.num_keys
        tokens, labels = [], []
        for _ in range(rows):
            keys = rng.permutation(self.num_keys)[: self.pairs] + FIRST_KEY
            values = rng.integers(0, self.num_values, self.pairs) + first_value
            asked = rng.permutation(self.pairs)[: self.queries]
            row = [BOS] + np.stack([keys, values], 1).ravel().tolist() + [self.filler] * self.gap
            row += np.stack([keys[asked], values[asked]], 1).ravel().tolist()
            label = [IGNORE] * (2 * self.pairs + self.gap + 1)  # targets up to the last filler
            for j in range(self.queries):
                label += [values[asked[j]], IGNORE]  # after q_j comes a_j; after a_j the next q
            tokens.append(row[:-1])
            labels.append(label[: len(row) - 1])
        return {"input_ids": torch.tensor(tokens), "labels": torch.tensor(labels),
                "cu_seqlens": None}  # fmt: skip
