"""`python -m rnnscale.train CONFIG [key=value ...]`: train in this process.

This is what torchrun, DeepSpeed's launcher and Ray workers start; `rnnscale train` is the
command for people.
"""

from __future__ import annotations

import sys

from rnnscale.train import run
from rnnscale.train.config import ConfigError, load_config
from rnnscale.train.distributed import exit_process, leave_distributed_at_exit
from rnnscale.train.preemption import EXIT_PREEMPTED, Preempted
from rnnscale.train.room import RunStopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # DeepSpeed's launcher passes --local_rank=N (LOCAL_RANK is in the environment as well)
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m rnnscale.train CONFIG [key=value ...]")
        return 0 if argv else 2
    leave_distributed_at_exit()  # gloo's threads must not outlive the interpreter
    try:
        run(load_config(argv[0], argv[1:]))
    except ConfigError as e:  # also what the run finds at its start (world size, tokenizer)
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # saves fail again and again, the model cannot be written
        print(f"rnnscale: {e}", file=sys.stderr)
        return 1
    except Preempted as e:  # a checkpoint of the last step is committed: run it again
        print(f"rnnscale: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    exit_process(main())
