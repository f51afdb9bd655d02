"""Which checkpoint a run continues from, and how: the newest committed one or a named one,
through DeepSpeed's universal form on another number of ranks or ZeRO stage, refused when the
architecture or tokenizer changed; and the rollback to an earlier one after non-finite steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnnscale.train import checkpoint, universal
from rnnscale.train.config import ConfigError, RunConfig, model_architecture, to_dict
from rnnscale.train.distributed import from_rank0
from rnnscale.train.notice import notice
from rnnscale.train.preflight import named_checkpoint
from rnnscale.train.progress import Progress


def checkpoint_meta(cfg: RunConfig) -> dict:
    """What a checkpoint records of the run beside its step and world size: what a resume must
    keep (the architecture, i.e. the `model` section less `init_from`, where the weights
    started; the tokenizer; the sequence-parallel size) and the ZeRO stage. The `kernels`
    section is not in it: a run may resume with other chunk sizes or another backend."""
    return {
        "zero_stage": cfg.parallel.zero_stage,
        "sequence_parallel_size": cfg.parallel.sequence_parallel_size,
        "model": {k: v for k, v in to_dict(cfg)["model"].items() if k != "init_from"},
        "tokenizer": _tokenizer_fingerprint(cfg),
    }


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to continue from (checkpoint.resume), the same on every rank: rank 0
    looks (verifying manifests) and tells the others."""

    def look() -> str | None:
        how = cfg.checkpoint.resume
        if how == "none":
            return None
        choice = (
            checkpoint.find_resume(cfg.checkpoint_dir) if how == "auto" else named_checkpoint(how)
        )
        return str(choice) if choice else None

    found = from_rank0(look)
    return Path(found) if found else None


def universal_for_resume(path: Path, cfg: RunConfig, world: int) -> bool:
    """Whether resuming `path` goes through its universal form (another world size or ZeRO
    stage); if so rank 0 makes it (once) and every rank learns whether that worked."""
    try:
        if not universal.needs_universal(path, world, cfg.parallel.zero_stage):
            return False
    except ValueError as e:
        raise ConfigError(f"checkpoint.resume: {e}") from None
    saved = checkpoint.read_meta(path)
    if cfg.parallel.sequence_parallel_size > 1 or saved.get("sequence_parallel_size", 1) > 1:
        raise ConfigError(
            f"checkpoint.resume: {path.name} was saved by {saved['world_size']} ranks at ZeRO "
            f"stage {saved['zero_stage']}; resuming sequence-parallel runs on another number "
            "of ranks or stage is not supported: use the same ones"
        )
    notice(f"{path.name} was saved by {saved['world_size']} ranks at ZeRO stage "
           f"{saved['zero_stage']}; this job has {world} at stage {cfg.parallel.zero_stage}: "
           f"resuming through its universal form")  # fmt: skip
    box = [None]
    if torch.distributed.get_rank() == 0:
        try:
            universal.make_universal(path)
        except RuntimeError as e:
            box = [str(e)]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConfigError(f"checkpoint.resume: {box[0]}")
    return True


def restore(engine, path: Path, cfg: RunConfig, batches, universal: bool) -> Progress:
    """Restore engine, RNG, data position and progress from `path`; refuse a run whose
    sequence-parallel size, architecture or tokenizer differs from the checkpoint's."""
    meta = checkpoint.read_meta(path)
    saved_P, P = meta.get("sequence_parallel_size", 1), cfg.parallel.sequence_parallel_size
    if saved_P != P:  # the ranks of a sequence group share a data position
        raise ConfigError(
            f"checkpoint {path} was saved with parallel.sequence_parallel_size={saved_P}; "
            f"this run has {P}: resume with {saved_P}"
        )
    now = checkpoint_meta(cfg)
    # checkpoints from before the kernels section kept chunk sizes in model: not architecture
    meta = {**meta, "model": model_architecture(meta["model"])}
    for key in ("model", "tokenizer"):
        if meta[key] != now[key]:
            raise ConfigError(
                f"checkpoint {path} was trained with another {key} "
                f"({_differences(meta[key], now[key])}): resuming it would not continue the "
                f"same run. Use the checkpoint's settings, or start afresh with "
                f"checkpoint.resume=none (or another run.dir)"
            )
    decay = [g["weight_decay"] for g in engine.optimizer.param_groups]
    state = checkpoint.load(engine, path, type(batches).reshard, universal)
    if universal:
        _repair_universal_load(engine, decay)
    checkpoint.set_rng_state(state["rng"])
    batches.load_state_dict(state["loader"])
    notice(f"resumed from {path} (step {state['counters']['step']})")
    return Progress.from_dict(state["counters"])


def _repair_universal_load(engine, weight_decay: list[float]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (deepspeed 0.19, stage3.py
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`): it gives every parameter group the
    first group's settings (the no-decay group would get weight decay), and one Adam `step`
    tensor to every group (each group's step would advance it: wrong bias correction). Both
    are harmless where they do not apply (ZeRO 1-2 keep their groups and steps)."""
    for group, wd in zip(engine.optimizer.param_groups, weight_decay, strict=True):
        group["weight_decay"] = wd
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _differences(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [_differences(old.get(k), new.get(k), f"{prefix}{k}.")
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]  # fmt: skip
        return "; ".join(parts)
    return f"{prefix.rstrip('.') or 'value'}: {old!r} then, {new!r} now"


def _tokenizer_fingerprint(cfg: RunConfig) -> str | None:
    if cfg.data.source != "mds":
        return None
    from rnnscale.data.tokenizer import fingerprint

    return fingerprint(cfg.data.tokenizer)


def rollback(engine, cfg: RunConfig, progress: Progress, batches, logger) -> Progress:
    """After train.max_consecutive_skips non-finite steps in a row: restore the newest
    checkpoint from before the first of them (model, optimizer, schedule, RNG, step and token
    counts) but keep the data loader where it is, so training goes on with the batches after
    the bad ones. Checkpoints after it (the abandoned steps) are removed. Stops the run
    (RuntimeError) after train.max_rollbacks, or when there is no such checkpoint."""
    step, limit = progress.step, cfg.train.max_consecutive_skips
    first_bad = step - progress.skips_in_a_row + 1
    stop = (
        f"{limit} steps in a row had a non-finite loss or gradient (steps {first_bad}-{step}, "
        f"train.max_consecutive_skips={limit}); the run stops"
    )
    advice = "Lower optim.lr, raise schedule.warmup_steps, or look at the data of these steps."
    if progress.rollbacks >= cfg.train.max_rollbacks:
        raise RuntimeError(
            f"{stop}: it rolled back {progress.rollbacks} times already "
            f"(train.max_rollbacks={cfg.train.max_rollbacks}). {advice}"
        )
    path = _rollback_target(cfg, first_bad)
    if path is None:
        raise RuntimeError(
            f"{stop}: there is no checkpoint from before step {first_bad} to roll back to "
            f"(checkpoint.interval={cfg.checkpoint.interval}). {advice}"
        )
    state = checkpoint.load(engine, path, type(batches).reshard)  # the same world and stage
    checkpoint.set_rng_state(state["rng"])
    back = progress.rolled_back_to(Progress.from_dict(state["counters"]))
    message = (
        f"rolled back to {path.name} after {limit} non-finite steps in a row ({first_bad}-"
        f"{step}); the batches of steps {back.step + 1}-{step} are not trained on, training "
        f"goes on from step {back.step + 1} with the batches after them "
        f"(rollback {back.rollbacks} of at most {cfg.train.max_rollbacks})"
    )
    notice(message, warning=True)
    logger.event("rollback", step=step, to_step=back.step, path=str(path),
                 first_bad_step=first_bad, message=message)  # fmt: skip
    return back


def _rollback_target(cfg: RunConfig, first_bad: int) -> Path | None:
    """Rank 0 picks the newest checkpoint before `first_bad` and removes those after it; every
    rank learns which (collective)."""
    box = [None]
    if torch.distributed.get_rank() == 0:
        target = checkpoint.rollback_target(cfg.checkpoint_dir, first_bad,
                                            torch.distributed.get_world_size(),
                                            cfg.parallel.zero_stage)  # fmt: skip
        if target is not None:
            checkpoint.remove_after(cfg.checkpoint_dir, target)
            box = [str(target)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None
