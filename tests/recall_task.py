"""Associative recall (multi-query, as in Zoology's MQAR): a synthetic task that needs memory.

A row is `BOS k_1 v_1 ... k_n v_n q_1 a_1 ... q_m a_m`: n key/value pairs (distinct keys, values
drawn with replacement), then m of the keys again, each followed by its value. Only the answers
a_j are scored (every other label is IGNORE = -100). Without remembering the pairs the best a
model can do is guess a value uniformly: loss ln(num_values). A model below that bound carries
information from the pairs to the queries, through its state.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BOS = 1
IGNORE = -100
FIRST_KEY = 3


class AssociativeRecall:
    def __init__(self, num_keys: int, num_values: int, pairs: int, queries: int, seed: int):
        if pairs > num_keys or queries > pairs:
            raise ValueError(
                f"need queries <= pairs <= num_keys, got {queries}, {pairs}, {num_keys}"
            )
        self.num_keys, self.num_values = num_keys, num_values
        self.pairs, self.queries, self.seed = pairs, queries, seed

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.pairs + self.queries)  # inputs per row (BOS + everything but a_m)

    @property
    def memoryless_loss(self) -> float:
        """Cross-entropy of the best guess that ignores the pairs: uniform over the values."""
        return math.log(self.num_values)

    def batch(self, index: int, rows: int) -> dict:
        """Rows `[index * rows, (index + 1) * rows)`: input_ids and labels `[rows, seq_len]`."""
        rng = np.random.default_rng([self.seed, index])
        first_value = FIRST_KEY + self.num_keys
        tokens, labels = [], []
        for _ in range(rows):
            keys = rng.permutation(self.num_keys)[: self.pairs] + FIRST_KEY
            values = rng.integers(0, self.num_values, self.pairs) + first_value
            asked = rng.permutation(self.pairs)[: self.queries]
            row = [BOS] + np.stack([keys, values], 1).ravel().tolist()
            row += np.stack([keys[asked], values[asked]], 1).ravel().tolist()
            label = [IGNORE] * (2 * self.pairs + 1)  # targets of BOS, k_1, v_1, ..., v_n
            for j in range(self.queries):
                label += [values[asked[j]], IGNORE]  # after q_j comes a_j; after a_j the next q
            tokens.append(row[:-1])
            labels.append(label[: len(row) - 1])
        return {
            "input_ids": torch.tensor(tokens),
            "labels": torch.tensor(labels),
            "cu_seqlens": None,
        }
