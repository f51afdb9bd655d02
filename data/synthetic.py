"""Synthetic documents from a fixed random Markov chain: deterministic, learnable, no files.

Every document is `BOS t_1 ... t_n EOS`. Token t_{i+1} is, with probability 0.9, one of four
successors fixed per token t_i, else uniform: a model learns it quickly, so a loss curve shows
whether training works. Document `i` depends only on (seed, i), never on what was drawn before.
Held-out documents (validation) come from the same chain at indices from `HELD_OUT` on.
"""

from __future__ import annotations

import numpy as np

BOS, EOS = 1, 2
FIRST_TOKEN = 3  # ids 0 (pad), 1 (BOS), 2 (EOS) are special
SUCCESSORS = 4
P_FOLLOW = 0.9
HELD_OUT = 1 << 40  # first index of the validation documents (training never gets this far)


class MarkovDocuments:
    """An endless, indexable sequence of synthetic documents (numpy int64 arrays)."""

    def __init__(self, vocab_size: int, mean_doc_len: int, seed: int, first_index: int = 0):
        if vocab_size <= FIRST_TOKEN:
            raise ValueError(f"synthetic data needs vocab_size > {FIRST_TOKEN}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.mean_doc_len = mean_doc_len
        self.seed, self.first_index = seed, first_index
        rng = np.random.default_rng([seed, 0])
        self.successors = rng.integers(FIRST_TOKEN, vocab_size, size=(vocab_size, SUCCESSORS))

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, self.first_index + index])
        n = int(rng.geometric(1.0 / max(self.mean_doc_len - 2, 1)))  # content tokens, >= 1
        follow = rng.random(n) < P_FOLLOW
        pick = rng.integers(0, SUCCESSORS, size=n)
        uniform = rng.integers(FIRST_TOKEN, self.vocab_size, size=n)
        doc = np.empty(n + 2, dtype=np.int64)
        doc[0], doc[-1] = BOS, EOS
        prev = int(uniform[0])
        doc[1] = prev
        for i in range(1, n):
            prev = int(self.successors[prev, pick[i]]) if follow[i] else int(uniform[i])
            doc[i + 1] = prev
        return doc
