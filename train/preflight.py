"""What a job refuses before it trains: the parallel layout and batch split, the node
placement, the data streams and tokenizer, a named checkpoint, room for a checkpoint.
`launch/` calls `check_inputs` before any worker starts (a bad config then fails once instead
of once per restart); every rank calls `plan` at its start. Every check raises ConfigError
with one line to act on."""

from __future__ import annotations

import json
from pathlib import Path

from rnnscale.parallel.deepspeed_config import deepspeed_config
from rnnscale.parallel.layout import ParallelLayout
from rnnscale.train import checkpoint
from rnnscale.train.config import ConfigError, DataSection, RunConfig


def plan(cfg: RunConfig, world: int, rank: int = 0) -> tuple[ParallelLayout, dict]:
    """The job's rank layout and its DeepSpeed config, checked: P divides the ranks and
    train.seq_len, and the global batch splits over the data-parallel replicas."""
    try:
        layout = ParallelLayout(world, cfg.parallel.sequence_parallel_size, rank)
        layout.check_seq_len(cfg.train.seq_len)
        config = deepspeed_config(cfg.train, cfg.optim, cfg.parallel, layout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_nvme_offload(cfg.parallel)
    return layout, config


def check_nvme_offload(parallel) -> None:
    """Offload to NVMe runs on DeepSpeed's async_io op, which builds only against libaio: say
    so before any rank starts, rather than fail inside DeepSpeed at the first step."""
    keys = [k for k in ("offload_optimizer", "offload_params") if getattr(parallel, k) == "nvme"]
    if keys and not _async_io_compatible():
        raise ConfigError(
            f"parallel.{keys[0]}=nvme needs DeepSpeed's async_io op, which needs libaio, and "
            f"libaio is not installed on this machine: install it (`apt-get install "
            f"libaio-dev` on Debian/Ubuntu, `yum install libaio-devel` on RHEL), or offload "
            f"to cpu"
        )


def _async_io_compatible() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible()


def check_inputs(cfg: RunConfig, world: int, files: bool = True) -> None:
    """What a job of `world` ranks would refuse at its start: the parallel sizes, the batch
    arithmetic and, with `files` (where this process sees the workers' files), the tokenizer
    against the model, the data streams, an explicitly named checkpoint to resume, the weights
    of model.init_from (their architecture and tokenizer), and room
    under checkpoint.dir for one checkpoint."""
    plan(cfg, world)
    if not files:
        return
    if cfg.data.source != "synthetic":
        check_streams(cfg.data)
        check_tokenizer(cfg.data, cfg.model.vocab_size)
    if cfg.checkpoint.resume not in ("auto", "none"):
        named_checkpoint(cfg.checkpoint.resume)
    if cfg.model.init_from:
        from rnnscale.train.hf.load import check_source

        check_source(cfg)
    check_checkpoint_room(cfg)


def check_checkpoint_room(cfg: RunConfig) -> None:
    """checkpoint.dir holds at least one checkpoint of this model (its parameters counted on
    the meta device, at no memory cost); the rank-0 check at the run's start is the same."""
    import torch

    from rnnscale.train.model import build_model
    from rnnscale.train.room import room_problem

    with torch.device("meta"):
        num_params = build_model(cfg.model, cfg.kernels).num_params()
    problem, _ = room_problem(cfg, num_params)
    if problem:
        raise ConfigError(problem)


def named_checkpoint(how: str) -> Path:
    """The checkpoint named by checkpoint.resume, verified against its manifest."""
    problem = checkpoint.verify(Path(how))
    if problem is not None:
        raise ConfigError(f"checkpoint.resume: {how} cannot be resumed: {problem}")
    return Path(how)


def check_node_layout(nodes: list[str], uses_streaming: bool) -> None:
    """`nodes[r]` is the node of rank r. mosaicml-streaming (data.source: mds) takes ranks
    r*n .. r*n+n-1 to be one node's n ranks, the same n on every node; a placement that breaks
    that would read the wrong shards, so it is refused."""
    if not uses_streaming or len(set(nodes)) <= 1:
        return
    counts = {node: nodes.count(node) for node in dict.fromkeys(nodes)}
    n = len(nodes) // len(counts)
    contiguous = all(nodes[r] == nodes[(r // n) * n] for r in range(len(nodes)))
    if len(set(counts.values())) > 1 or not contiguous:
        layout = ", ".join(f"{node}: {c}" for node, c in counts.items())
        problem = (
            f"sit unevenly on its nodes ({layout})"
            if len(set(counts.values())) > 1
            else f"are not grouped by node in rank order (nodes by rank: {', '.join(nodes)})"
        )
        raise ConfigError(
            f"the job's {len(nodes)} ranks {problem}; streaming "
            f"data (data.source: mds) needs the same number of ranks on every node, in rank "
            f"order: set launch.placement to STRICT_SPREAD (one worker per node) or "
            f"STRICT_PACK (one node), or size launch.num_workers and the CPUs/GPUs per worker "
            f"so that every node takes the same number"
        )


def check_streams(data: DataSection) -> None:
    """Every local stream of data.streams and data.val_streams exists, has every shard file at
    the size its index records (data/integrity.py: a stat per file, cheap on any corpus) and,
    where its prepare.json says which tokenizer made it, was made with data.tokenizer (shards of
    another tokenizer would feed ids the model was not trained on, or past its vocabulary)."""
    from rnnscale.data.integrity import DamagedShards, check_stream
    from rnnscale.data.tokenizer import fingerprint

    ours = None
    for key in ("streams", "val_streams"):
        for stream in getattr(data, key):
            if "://" in stream.path:
                continue
            made_with = _made_with(key, Path(stream.path))
            try:
                check_stream(stream.path)
            except DamagedShards as e:
                raise ConfigError(f"data.{key}: {e}") from None
            if made_with is None or not Path(data.tokenizer).is_file():
                continue
            ours = ours or fingerprint(data.tokenizer)
            if made_with != ours:
                raise ConfigError(
                    f"data.{key}: {stream.path} was tokenized with another tokenizer "
                    f"(sha256 {made_with[:12]}...) than data.tokenizer {data.tokenizer} "
                    f"(sha256 {ours[:12]}...): use the tokenizer the shards were made with"
                )


def _made_with(key: str, path: Path) -> str | None:
    """The tokenizer fingerprint a stream's prepare.json records (None: not recorded)."""
    if not path.exists():
        raise ConfigError(
            f"data.{key}: {path} does not exist: run `rnnscale data prepare` to make it, or "
            f"fix the path"
        )
    record = path / "prepare.json"
    try:
        return json.loads(record.read_text()).get("tokenizer")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.{key}: {record} cannot be read ({e}): prepare the "
                          f"shards again") from None  # fmt: skip


def check_tokenizer(data: DataSection, vocab_size: int) -> None:
    """data.tokenizer exists and its pieces fit model.vocab_size."""
    from rnnscale.data.tokenizer import load_tokenizer

    try:
        pieces = load_tokenizer(data.tokenizer).vocab_size()
    except FileNotFoundError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if pieces > vocab_size:
        raise ConfigError(
            f"data.tokenizer {data.tokenizer} has {pieces} pieces but model.vocab_size is "
            f"{vocab_size}: raise model.vocab_size to at least {pieces}"
        )
