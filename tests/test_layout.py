"""The rank layout and the run's progress record, as pure arithmetic: no processes."""

import pytest

from rnnscale.parallel.layout import ParallelLayout
from rnnscale.train.config import ConfigError, load_config
from rnnscale.train.preflight import plan
from rnnscale.train.progress import Progress


def test_ranks_are_replicas_of_consecutive_sequence_slices():
    layout = ParallelLayout(world_size=8, sequence_parallel_size=4, rank=6)
    assert (layout.data_parallel_size, layout.data_rank, layout.sequence_rank) == (2, 1, 2)
    assert layout.sequence_group(1) == [4, 5, 6, 7]
    assert layout.data_group(2) == [2, 6]
    every = [layout.for_rank(r) for r in range(8)]
    assert [layout.rank_of(lay.data_rank, lay.sequence_rank) for lay in every] == list(range(8))
    assert ParallelLayout(3).data_group(0) == [0, 1, 2]  # no sequence parallelism


@pytest.mark.parametrize(
    "args,message",
    [
        ((6, 4), r"parallel\.sequence_parallel_size = 4 must divide the job's 6 ranks"),
        ((4, 0), r"sequence_parallel_size = 0 must divide"),
        ((4, 2, 4), r"rank 4 is outside the job's 4 ranks"),
    ],
)
def test_a_layout_that_cannot_be_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(*args)


def test_plan_checks_the_layout_the_sequence_and_the_batch(repo_root):
    cfg = load_config(repo_root / "configs/debug_cpu.yaml", ["parallel.sequence_parallel_size=2"])
    layout, ds = plan(cfg, world=4, rank=3)
    assert (layout.data_rank, layout.sequence_rank) == (1, 1)
    assert ds["gradient_accumulation_steps"] == 8 // (4 * 2)  # rows per step / (micro x D)
    with pytest.raises(ConfigError, match=r"must divide train\.seq_len = 63"):
        plan(load_config(repo_root / "configs/debug_cpu.yaml",
                         ["parallel.sequence_parallel_size=2", "train.seq_len=63"]), 2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"global_batch_size: 8 rows per step do not split"):
        plan(cfg, world=8)  # 4 replicas x micro batches of 4


def test_progress_counts_skips_and_survives_a_rollback():
    p = Progress()
    for skipped in (False, True, True):
        p.after_step(tokens=10, skipped=skipped)
    assert (p.step, p.tokens_seen, p.skipped_steps, p.skips_in_a_row) == (3, 30, 2, 2)
    saved = Progress.from_dict({"step": 1, "tokens_seen": 10})  # an older checkpoint's counters
    back = p.rolled_back_to(saved)
    assert (back.step, back.tokens_seen, back.skipped_steps, back.skips_in_a_row) == (1, 10, 2, 0)
    assert back.rollbacks == 1 and Progress.from_dict(back.as_dict()) == back


def test_notices_are_said_once_and_rank_lines_carry_the_rank():
    """A line every rank would say is said by rank 0 only; `every_rank=True` lines carry the
    rank. Before the process group exists the rank is the launcher's RANK."""
    import subprocess
    import sys

    code = ("from rnnscale.train.notice import notice; notice('for all'); "
            "notice('mine', every_rank=True); notice('careful', warning=True)")  # fmt: skip
    for rank, out, err in [("0", "rnnscale: for all\nrnnscale [rank 0]: mine\n",
                            "rnnscale: careful\n"),
                           ("3", "rnnscale [rank 3]: mine\n", "")]:  # fmt: skip
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"RANK": rank, "PATH": ""}, timeout=60)  # fmt: skip
        assert (r.stdout, r.stderr) == (out, err)
