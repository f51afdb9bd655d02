"""rnnscale.train: the config, the model zoo, and `run(cfg)`, the loop every worker runs.

`import rnnscale.train` stays light (no torch) so that the CLI can check a config at once;
`run` imports the trainer when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rnnscale.train.config import RunConfig


def run(cfg: RunConfig) -> dict:
    """Train the run described by `cfg` in this process (see rnnscale.train.trainer.run)."""
    from rnnscale.train.trainer import run as _run

    return _run(cfg)


__all__ = ["run"]
