"""Where a run stands: its step, tokens, and the non-finite steps it skipped or rolled back.

Saved in every checkpoint (as the plain dict of `as_dict`, the `counters` of the rank files) and
restored by a resume or a rollback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # in the whole run
    skips_in_a_row: int = 0  # ending at `step`
    rollbacks: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Progress:
        """From a checkpoint's counters; fields it lacks (older checkpoints) start at 0."""
        return cls(**{f.name: int(saved[f.name]) for f in fields(cls) if f.name in saved})

    def after_step(self, tokens: int, skipped: bool) -> None:
        self.step += 1
        self.tokens_seen += tokens
        if skipped:
            self.skipped_steps += 1
            self.skips_in_a_row += 1
        else:
            self.skips_in_a_row = 0

    def rolled_back_to(self, saved: Progress) -> Progress:
        """The progress after a rollback to `saved`: its step and tokens, this run's counts of
        skipped steps and rollbacks."""
        return replace(saved, skipped_steps=self.skipped_steps, skips_in_a_row=0,
                       rollbacks=self.rollbacks + 1)  # fmt: skip
