"""Which ranks a firing watchdog names (train/watchdog.py `_behind`), from the beats in the
store: the multi-process behaviour is tests/test_ray.py's hung-worker test."""

import time

from rnnscale.train.watchdog import Watchdog


class Store:
    def __init__(self, beats: dict[int, tuple[str, float]]):
        now = time.time()
        self.values = {f"rnnscale/beat/{r}": f"{where}|{now - ago}".encode()
                       for r, (where, ago) in beats.items()}  # fmt: skip

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key]


def named(beats: dict[int, tuple[str, float]], world: int = 3) -> str:
    dog = object.__new__(Watchdog)
    dog.store, dog.world, dog.timeout_s = Store(beats), world, 8.0  # beats every 2 s
    return dog._behind()


def test_the_ranks_behind_by_step_by_phase_or_silent_are_named():
    by_step = named({0: ("7 step 8", 1), 1: ("6 step 7", 1), 2: ("7 step 8", 0)})
    assert by_step == "; ranks behind: rank 1 (step 6, in step 7, 1 s ago)", by_step
    after = "7 the evaluation, logging and checkpoint after it"
    by_phase = named({0: ("7 step 8", 1), 1: (after, 1), 2: ("7 step 8", 0)})
    assert by_phase.startswith("; ranks behind: rank 1 (step 7, in the evaluation"), by_phase
    # the same step and phase, but rank 2 stopped publishing (a stopped process)
    silent = named({0: ("7 step 8", 1), 1: ("7 step 8", 1), 2: ("7 step 8", 9)})
    assert silent == "; ranks behind: rank 2 (step 7, in step 8, 9 s ago)", silent
    assert named({0: ("7 step 8", 1), 1: ("7 step 8", 1)}, world=2) == "; ranks behind: none found"
    assert named({0: ("7 step 8", 1)}, world=2) == "; ranks behind: rank 1 (no beat published)"
