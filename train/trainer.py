"""`run(cfg)`: build model, data, optimizer and schedule from the config, train, log, clean up.

This is the one seam between launchers and training (DESIGN.md section 1): every way of
starting a job ends in this function, in the process that trains.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rnnscale.data.packing import PackedRows, collate
from rnnscale.data.synthetic import HELD_OUT, MarkovDocuments
from rnnscale.parallel.deepspeed_config import deepspeed_config
from rnnscale.train import checkpoint
from rnnscale.train.config import ConfigError, RunConfig, dump_yaml, to_dict
from rnnscale.train.export import export_model
from rnnscale.train.logger import Logger
from rnnscale.train.measure import measure_peak_flops, peak_memory_gb
from rnnscale.train.model import LanguageModel, build_model
from rnnscale.train.schedule import lr_multiplier


def run(cfg: RunConfig) -> dict:
    """Train the run described by `cfg` on this process's rank; returns a summary (run_dir,
    steps, final loss). Every rank of the job calls it (torchrun, DeepSpeed's launcher, Ray
    workers, or one process alone)."""
    import deepspeed

    # the process group then stays for the life of the process: DeepSpeed caches its groups,
    # so a second run in the same process (tests, notebooks) must reuse it, not make another
    init_distributed()
    return _train(cfg, deepspeed)


def _train(cfg: RunConfig, deepspeed) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = _device()  # first: NCCL's object collectives below run on this rank's GPU
    if world > 1:  # the node of every rank: Ray Train's NODE_RANK, torchrun's GROUP_RANK
        nodes = [""] * world
        env = os.environ
        here = env.get("NODE_RANK") or env.get("GROUP_RANK") or socket.gethostname()
        torch.distributed.all_gather_object(nodes, here)
        check_node_layout(nodes, uses_streaming=cfg.data.source != "synthetic")
    groups = sequence_groups(cfg, world)  # None without sequence parallelism
    P = cfg.parallel.sequence_parallel_size
    dp_rank, dp_world = rank // P, world // P  # the ranks that read different rows
    try:
        ds_config = deepspeed_config(cfg.train, cfg.optim, cfg.parallel, dp_world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_dir = cfg.run_dir
    resume_from = resolve_resume(cfg, rank)
    universal = resume_from is not None and universal_for_resume(resume_from, cfg, world)
    if universal:  # DeepSpeed reads the universal form only when configured to
        ds_config["checkpoint"] = {"load_universal": True}
    if rank == 0:
        prepare_run_dir(cfg, resuming=resume_from is not None)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        print(f"rnnscale: run directory {run_dir.resolve()} ({world} ranks)", flush=True)
        print(dump_yaml(cfg), end="", flush=True)
    torch.distributed.barrier()
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    with torch.device("meta"):  # counts from a copy that costs no memory
        shape = build_model(cfg.model)
    flops_per_token = shape.flops_per_token(cfg.train.seq_len)
    if rank == 0:
        print(f"layers: {shape.layer_types}\nparameters: {shape.num_params():,}", flush=True)
    # ZeRO-3 builds the model partitioned: no rank ever holds all of it
    stage3 = cfg.parallel.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config) if stage3 else contextlib.nullcontext():
        model = build_model(cfg.model)
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.schedule, cfg.train.max_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=groups,  # ZeRO over all ranks, gradients averaged over the data-parallel replicas
    )  # fmt: skip
    if cfg.parallel.zero_stage == 3:  # the loss uses the head's weight outside head.forward
        deepspeed.zero.register_external_parameter(engine.module, engine.module.head.weight)
    batches = make_batches(cfg, run_dir, dp_rank, dp_world, replication=P)
    val_batches = []
    if cfg.train.eval_interval > 0:
        val_batches = make_val_batches(cfg, dp_rank, dp_world, replication=P)
    peak = cfg.train.peak_tflops * 1e12 or measure_peak_flops(device, cfg.parallel.dtype)
    counters = {"step": 0, "tokens_seen": 0, "skipped_steps": 0, "skips_in_a_row": 0,
                "rollbacks": 0}  # fmt: skip
    load_s = time.perf_counter()
    if resume_from is not None:
        counters = _resume(engine, resume_from, cfg, batches, universal, counters)
    load_s = time.perf_counter() - load_s
    logger = Logger.for_rank(rank, cfg, run_dir, initial_step=counters["step"])
    logger.event("start", step=counters["step"], world_size=world,
                 resumed_from=str(resume_from) if resume_from else None,
                 load_s=round(load_s, 4), pid=os.getpid(),
                 host=socket.gethostname())  # fmt: skip
    metrics: dict = {}
    saves = Checkpointer(engine, cfg, batches, logger)
    try:
        while counters["step"] < cfg.train.max_steps:
            step = counters["step"] + 1
            metrics = train_step(engine, batches, device, cfg.parallel.zero_stage, groups)
            too_many = _count_skips(metrics, counters, step, cfg.train.max_consecutive_skips)
            counters["tokens_seen"] += metrics["tokens"]
            metrics["mfu"] = 3 * flops_per_token * metrics["tokens_per_s"] / (peak * world)
            metrics["peak_memory_gb"] = peak_memory_gb(device)
            last = step == cfg.train.max_steps
            if val_batches and (step % cfg.train.eval_interval == 0 or last):
                metrics.update(evaluate(engine, val_batches, device, groups))
                if groups is not None:  # sp_bytes count the training steps only
                    groups.stats.take()
            if step % cfg.train.log_interval == 0 or last or "eval_loss" in metrics:
                logger.log(step, {**metrics, "tokens_seen": counters["tokens_seen"],
                                  "skipped_steps": counters["skipped_steps"]})  # fmt: skip
            counters["step"] = step
            if too_many:  # go back to a checkpoint from before them, or stop
                saves.finish(step)
                counters = rollback(engine, cfg, counters, batches, logger)
                continue
            saves.after_step(counters, last)
        saves.finish(counters["step"])
    finally:
        logger.close()
    export(engine, cfg, rank)
    final = metrics.get("loss", float("nan"))
    if rank == 0:
        print(
            f"rnnscale: done: {cfg.train.max_steps} steps, final loss {final:.4f}\n"
            f"run directory: {run_dir.resolve()} (config.yaml, metrics.jsonl, tb/, "
            f"model.safetensors)\n"
            f"dashboard: rnnscale dashboard {run_dir}\n"
            f"sample from it: rnnscale generate {run_dir} {_prompt_hint(run_dir)}",
            flush=True,
        )
    return {"run_dir": str(run_dir), "steps": cfg.train.max_steps, "loss": metrics.get("loss"),
            "skipped_steps": counters["skipped_steps"]}  # fmt: skip


def resolve_resume(cfg: RunConfig, rank: int) -> Path | None:
    """The checkpoint to continue from (checkpoint.resume), the same on every rank: rank 0
    looks (verifying manifests) and tells the others."""
    choice = None
    if rank == 0:
        how = cfg.checkpoint.resume
        if how == "auto":
            choice = checkpoint.find_resume(cfg.checkpoint_dir)
        elif how != "none":
            choice = named_checkpoint(how)
    box = [str(choice) if choice else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def named_checkpoint(how: str) -> Path:
    """The checkpoint named by checkpoint.resume, verified against its manifest."""
    problem = checkpoint.verify(Path(how))
    if problem is not None:
        raise ConfigError(f"checkpoint.resume: {how} cannot be resumed: {problem}")
    return Path(how)


def universal_for_resume(path: Path, cfg: RunConfig, world: int) -> bool:
    """Whether resuming `path` goes through its universal form (another world size or ZeRO
    stage); if so rank 0 makes it (once) and every rank learns whether that worked."""
    try:
        if not checkpoint.needs_universal(path, world, cfg.parallel.zero_stage):
            return False
    except ValueError as e:
        raise ConfigError(f"checkpoint.resume: {e}") from None
    rank = torch.distributed.get_rank()
    saved = checkpoint.read_meta(path)
    if cfg.parallel.sequence_parallel_size > 1 or saved.get("sequence_parallel_size", 1) > 1:
        raise ConfigError(
            f"checkpoint.resume: {path.name} was saved by {saved['world_size']} ranks at ZeRO "
            f"stage {saved['zero_stage']}; resuming sequence-parallel runs on another number "
            "of ranks or stage is not supported: use the same ones"
        )
    box = [None]
    if rank == 0:
        print(
            f"rnnscale: {path.name} was saved by {saved['world_size']} ranks at ZeRO stage "
            f"{saved['zero_stage']}; this job has {world} at stage {cfg.parallel.zero_stage}: "
            f"resuming through its universal form",
            flush=True,
        )
        try:
            checkpoint.make_universal(path)
        except RuntimeError as e:
            box = [str(e)]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConfigError(f"checkpoint.resume: {box[0]}")
    return True


def _resume(engine, path: Path, cfg: RunConfig, batches, universal: bool, counters: dict) -> dict:
    """Restore engine, RNG, data position and counters from `path`; refuse a config whose model
    or tokenizer differs from the checkpoint's."""
    meta = checkpoint.read_meta(path)
    saved_P, P = meta.get("sequence_parallel_size", 1), cfg.parallel.sequence_parallel_size
    if saved_P != P:  # the ranks of a sequence group share a data position
        raise ConfigError(
            f"checkpoint {path} was saved with parallel.sequence_parallel_size={saved_P}; "
            f"this run has {P}: resume with {saved_P}"
        )
    now = {"model": to_dict(cfg)["model"], "tokenizer": _tokenizer_fingerprint(cfg)}
    for key in ("model", "tokenizer"):
        if meta[key] != now[key]:
            diff = _differences(meta[key], now[key])
            raise ConfigError(
                f"checkpoint {path} was trained with another {key} ({diff}): resuming it would "
                f"not continue the same run. Use the checkpoint's settings, or start afresh "
                f"with checkpoint.resume=none (or another run.dir)"
            )
    decay = [g["weight_decay"] for g in engine.optimizer.param_groups]
    state = checkpoint.load(engine, path, type(batches).reshard, universal)
    if universal:
        _repair_universal_load(engine, decay)
    checkpoint.set_rng_state(state["rng"])
    batches.load_state_dict(state["loader"])
    if torch.distributed.get_rank() == 0:
        print(f"rnnscale: resumed from {path} (step {state['counters']['step']})", flush=True)
    return {**counters, **state["counters"]}


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


class Checkpointer:
    """When the run saves (every checkpoint.interval steps, at the last step, every
    checkpoint.interval_minutes), and the save in flight when they are asynchronous. A save
    that fails is reported (stderr, a `checkpoint_failed` event) and training goes on; the
    next save tries again."""

    def __init__(self, engine, cfg: RunConfig, batches, logger):
        self.engine, self.cfg, self.batches, self.logger = engine, cfg, batches, logger
        self.rank = torch.distributed.get_rank()
        self.pending: checkpoint.PendingSave | None = None
        self.last_save = time.monotonic()
        self.blocked_s = 0.0  # the step loop's wait for the pending save's start

    def after_step(self, counters: dict, last: bool) -> None:
        """At every step's end (collective)."""
        step = counters["step"]
        if self.pending is not None and self.pending.ready():
            self.finish(step)
        if self._due(step, last):
            self.finish(step)  # one save in flight at most
            self._start(counters)
            if not self.cfg.checkpoint.async_save:
                self.finish(step)

    def _due(self, step: int, last: bool) -> bool:
        c = self.cfg.checkpoint
        if c.interval and step % c.interval == 0 or last and (c.interval or c.interval_minutes):
            return True
        if not c.interval_minutes:
            return False
        late = time.monotonic() - self.last_save >= c.interval_minutes * 60
        flag = torch.tensor([int(late) if self.rank == 0 else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # rank 0's clock
        return bool(flag)

    def _start(self, counters: dict) -> None:
        start = time.perf_counter()
        cfg, step = self.cfg, counters["step"]
        rank_state = {
            "rng": checkpoint.rng_state(),
            "loader": self.batches.state_dict(),  # collective for the streaming loader
            "counters": dict(counters),
        }
        meta = {
            "step": step,
            "world_size": torch.distributed.get_world_size(),
            "zero_stage": cfg.parallel.zero_stage,
            "sequence_parallel_size": cfg.parallel.sequence_parallel_size,
            "model": to_dict(cfg)["model"],
            "tokenizer": _tokenizer_fingerprint(cfg),
        }
        self.last_save = time.monotonic()
        try:
            self.pending = checkpoint.start_save(
                self.engine, cfg.checkpoint_dir, step, rank_state, meta, dump_yaml(cfg),
                cfg.checkpoint.keep, asynchronous=cfg.checkpoint.async_save,
            )  # fmt: skip
        except checkpoint.SaveFailed as e:
            self._failed(step, e)
        self.blocked_s = time.perf_counter() - start

    def finish(self, step: int) -> None:
        """Commit the save in flight, if any, waiting for its files (collective); `step`: the
        step training has done (logged as `committed_step`)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        start = time.perf_counter()
        try:
            path = pending.commit()
        except checkpoint.SaveFailed as e:
            self._failed(pending.step, e)
            return
        blocked = self.blocked_s + time.perf_counter() - start  # the step loop's wait
        self.logger.event("checkpoint", step=pending.step, path=str(path), committed_step=step,
                          blocked_s=round(blocked, 4))  # fmt: skip

    def _failed(self, step: int, error: Exception) -> None:
        if self.rank == 0:
            print(f"rnnscale: {error} Training goes on.", file=sys.stderr, flush=True)
        self.logger.event("checkpoint_failed", step=step, error=str(error))


def init_distributed() -> None:
    """Join the job's process group through DeepSpeed (gloo on CPU, NCCL on GPU) from the usual
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a process started alone (no
    WORLD_SIZE) is rank 0 of 1 on a free local port, without touching the environment (which
    processes it starts inherit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it (children ignore it alone)
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, verbose=False,
            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _count_skips(metrics: dict, counters: dict, step: int, limit: int) -> bool:
    """Count a skipped step; True when it makes `limit` in a row."""
    if not metrics.pop("skipped"):
        counters["skips_in_a_row"] = 0
        return False
    counters["skipped_steps"] += 1
    counters["skips_in_a_row"] += 1
    print(f"rnnscale: step {step} skipped: non-finite loss or gradient "
          f"({counters['skips_in_a_row']} in a row)", flush=True)  # fmt: skip
    return counters["skips_in_a_row"] >= limit


def rollback(engine, cfg: RunConfig, counters: dict, batches, logger) -> dict:
    """After train.max_consecutive_skips non-finite steps in a row ending at `step`: restore the
    newest checkpoint from before the first of them (model, optimizer, schedule, RNG, step and
    token counters) but keep the data loader where it is, so training goes on with the batches
    after the bad ones. Checkpoints after it (the abandoned steps) are removed. Stops the run
    (RuntimeError) after train.max_rollbacks, or when there is no such checkpoint. Returns the
    new counters."""
    step, limit = counters["step"], cfg.train.max_consecutive_skips
    first_bad = step - counters["skips_in_a_row"] + 1
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    stop = (
        f"{limit} steps in a row had a non-finite loss or gradient (steps {first_bad}-{step}, "
        f"train.max_consecutive_skips={limit}); the run stops"
    )
    advice = "Lower optim.lr, raise schedule.warmup_steps, or look at the data of these steps."
    if counters["rollbacks"] >= cfg.train.max_rollbacks:
        raise RuntimeError(
            f"{stop}: it rolled back {counters['rollbacks']} times already "
            f"(train.max_rollbacks={cfg.train.max_rollbacks}). {advice}"
        )
    box = [None]
    if rank == 0:
        target = checkpoint.rollback_target(cfg.checkpoint_dir, first_bad, world,
                                            cfg.parallel.zero_stage)  # fmt: skip
        if target is not None:
            checkpoint.remove_after(cfg.checkpoint_dir, target)
            box = [str(target)]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise RuntimeError(
            f"{stop}: there is no checkpoint from before step {first_bad} to roll back to "
            f"(checkpoint.interval={cfg.checkpoint.interval}). {advice}"
        )
    path = Path(box[0])
    state = checkpoint.load(engine, path, type(batches).reshard)  # the same world and stage
    checkpoint.set_rng_state(state["rng"])
    back = dict(state["counters"])
    back.update(skipped_steps=counters["skipped_steps"], skips_in_a_row=0,
                rollbacks=counters["rollbacks"] + 1)  # fmt: skip
    message = (
        f"rolled back to {path.name} after {limit} non-finite steps in a row ({first_bad}-"
        f"{step}); the batches of steps {back['step'] + 1}-{step} are not trained on, training "
        f"goes on from step {back['step'] + 1} with the batches after them "
        f"(rollback {back['rollbacks']} of at most {cfg.train.max_rollbacks})"
    )
    if rank == 0:
        print(f"rnnscale: {message}", file=sys.stderr, flush=True)
    logger.event("rollback", step=step, to_step=back["step"], path=str(path),
                 first_bad_step=first_bad, message=message)  # fmt: skip
    return back


def _prompt_hint(run_dir: Path) -> str:
    """Text when the run has a tokenizer, else token ids (BOS)."""
    return '--prompt "def "' if (run_dir / "tokenizer.model").exists() else "--prompt-ids 1"


def train_step(engine, batches: Iterator[dict], device, zero_stage: int, groups=None) -> dict:
    """One optimizer step: gradient_accumulation_steps micro batches through the DeepSpeed
    engine (forward, backward, step), then the step's metrics, averaged over ranks. Under
    sequence parallelism (`groups`) each rank runs its slice of the rows, and the metrics
    include the bytes this rank sent in SP collectives (`sp_bytes`, and per kind)."""
    P = 1 if groups is None else groups.size
    start = time.perf_counter()
    accum = engine.gradient_accumulation_steps()
    lr = engine.get_lr()[0]
    skipped_before = engine.skipped_steps
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens, wait, grad_norm = 0, 0.0, None
    for _ in range(accum):
        fetch = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - fetch
        loss = lm_loss(engine, batch, device, groups)
        engine.backward(loss)
        if zero_stage == 0 and engine.is_gradient_accumulation_boundary():
            grad_norm = _grad_norm(engine.module)  # reduced over ranks by now
            if not math.isfinite(grad_norm):
                engine.optimizer.skip_next_step()  # DeepSpeed skips these only under ZeRO
        engine.step()
        loss_sum += loss.detach().double().cpu()
        tokens += batch["input_ids"].numel() // P  # this rank's slice
    world = torch.distributed.get_world_size()
    totals = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64)])
    torch.distributed.all_reduce(totals)  # the one collective the metrics cost per step
    if grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
    skipped = engine.skipped_steps > skipped_before or not math.isfinite(grad_norm)
    seconds = time.perf_counter() - start
    global_tokens = int(totals[1])
    sp = {}
    if groups is not None:
        sent = groups.stats.take()
        sp = {"sp_bytes": sum(sent.values()), **{f"sp_bytes_{k}": v for k, v in sent.items()}}
    return {
        # each rank's loss is its slice's share of its rows' mean: the shares of the P ranks
        # of a sequence group add up to it
        "loss": (totals[0] / (accum * world / P)).item(),
        **sp,
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped": skipped,
        "tokens": global_tokens,
        "tokens_per_s": global_tokens / seconds,
        "tokens_per_s_per_rank": global_tokens / seconds / world,
        "step_time_s": seconds,
        "data_wait_share": wait / seconds,
    }


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()


def lm_loss(model, batch: dict, device, groups=None) -> torch.Tensor:
    """Mean next-token cross-entropy through `model` (the DeepSpeed engine or the module);
    packed batches run as one row with cu_seqlens. Under sequence parallelism (`groups`, a
    `rnnscale.parallel.sequence.ParallelGroups`) the rank runs its slice of the rows (of the
    one packed row) and returns its share of their mean."""
    input_ids = batch["input_ids"].to(device)  # (B, T)
    labels = batch["labels"].to(device)  # (B, T)
    cu_seqlens = batch["cu_seqlens"]
    if cu_seqlens is not None:
        input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)  # (1, B*T)
        cu_seqlens = cu_seqlens.to(device)
    if groups is None:
        return model(input_ids, labels=labels, cu_seqlens=cu_seqlens)
    shard = groups.shard(input_ids.shape[1], cu_seqlens, device=input_ids.device)
    return model(shard.local(input_ids), labels=shard.local(labels),
                 cu_seqlens=shard.cu_seqlens, shard=shard)  # fmt: skip


def _check_sequence_parallel_size(cfg: RunConfig, world: int) -> None:
    P = cfg.parallel.sequence_parallel_size
    if world % P or cfg.train.seq_len % P:
        raise ConfigError(
            f"parallel.sequence_parallel_size = {P} must divide the job's {world} ranks and "
            f"train.seq_len = {cfg.train.seq_len}: change one of them"
        )


def check_inputs(cfg: RunConfig, world: int, files: bool = True) -> None:
    """What a job of `world` ranks would refuse at its start, checked before any rank starts
    (the Ray launcher calls it, so that a bad config fails once instead of once per restart):
    the parallel sizes, the batch arithmetic and, with `files` (where this process sees the
    workers' files), the tokenizer against the model, the data streams, and an explicitly
    named checkpoint to resume. Raises ConfigError."""
    _check_sequence_parallel_size(cfg, world)
    try:
        deepspeed_config(cfg.train, cfg.optim, cfg.parallel,
                         world // cfg.parallel.sequence_parallel_size)  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not files:
        return
    if cfg.data.source != "synthetic":
        check_streams(cfg)
        check_tokenizer(cfg)
    if cfg.checkpoint.resume not in ("auto", "none"):
        named_checkpoint(cfg.checkpoint.resume)


def check_node_layout(nodes: list[str], uses_streaming: bool) -> None:
    """`nodes[r]` is the node of rank r. mosaicml-streaming (data.source: mds) takes ranks
    r*n .. r*n+n-1 to be one node's n ranks, the same n on every node; a placement that breaks
    that would read the wrong shards, so it is refused. Raises ConfigError."""
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


def sequence_groups(cfg: RunConfig, world: int):
    """The data x sequence parallel groups (`ParallelGroups`, DeepSpeed's mpu) for
    parallel.sequence_parallel_size > 1, else None."""
    P = cfg.parallel.sequence_parallel_size
    _check_sequence_parallel_size(cfg, world)
    if P == 1:
        return None
    from rnnscale.parallel.sequence import ParallelGroups

    return ParallelGroups(P)


def export(engine, cfg: RunConfig, rank: int) -> None:
    """model.safetensors (fp32) from rank 0. ZeRO-3 gathers the weights onto rank 0 only, layer
    by layer; other stages copy them (DeepSpeed's may be bf16 views into its flat buffers)."""
    if cfg.parallel.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full on rank 0
    else:
        state = engine.module.state_dict() if rank == 0 else {}
    if rank == 0:
        with torch.device("meta"):
            copy = build_model(cfg.model)
        copy.load_state_dict(
            {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()},
            assign=True,
        )
        if cfg.model.tie_embeddings:
            copy.head.weight = copy.embed.weight
        export_model(copy, cfg.run_dir)
    torch.distributed.barrier()


@torch.no_grad()
def evaluate(model: LanguageModel, val_batches: list[dict], device, groups=None) -> dict:
    """Token-weighted mean loss over the validation batches (summed over ranks when
    distributed), and its perplexity. Under sequence parallelism each rank holds a share of
    its rows' loss, and 1/P of their tokens."""
    P = 1 if groups is None else groups.size
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (loss * tokens, tokens)
    for batch in val_batches:
        n = batch["labels"].numel()
        loss = lm_loss(model, batch, device, groups).item()
        totals += torch.tensor([loss * n, n / P], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


def make_val_batches(
    cfg: RunConfig, rank: int = 0, world: int = 1, replication: int = 1
) -> list[dict]:
    """This rank's first train.eval_batches micro batches of the validation data:
    data.val_streams in order (mds), or held-out documents of the synthetic chain. rank and
    world count data-parallel replicas; `replication` consecutive ranks share rows."""
    n = cfg.train.eval_batches
    if cfg.data.source == "synthetic":
        held_out = SyntheticBatches(cfg, rank, world, first_index=HELD_OUT)
        return [next(held_out) for _ in range(n)]
    loader = _packed_loader(cfg, cfg.data.val_streams, shuffle=False, replication=replication)
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def make_batches(
    cfg: RunConfig, run_dir: Path, rank: int = 0, world: int = 1, replication: int = 1
) -> Iterator[dict]:
    """This rank's micro batches from data.source: synthetic documents, or MDS shards (whose
    tokenizer is copied into the run directory, after checking it fits the model's
    vocabulary; streaming gives every rank its own part). rank and world count data-parallel
    replicas; `replication` consecutive ranks (a sequence group) get the same rows."""
    if cfg.data.source == "synthetic":
        return SyntheticBatches(cfg, rank, world)
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # left by a killed earlier run; it would hang this one
    check_streams(cfg)
    check_tokenizer(cfg)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        shutil.copyfile(cfg.data.tokenizer, run_dir / "tokenizer.model")
    return _packed_loader(
        cfg, cfg.data.streams, num_workers=cfg.data.num_workers, replication=replication
    )


def check_streams(cfg: RunConfig) -> None:
    """Every local stream of data.streams and data.val_streams exists and, where its
    prepare.json says which tokenizer made it, was made with data.tokenizer (shards of another
    tokenizer would feed ids the model was not trained on, or past its vocabulary); raises
    ConfigError."""
    from rnnscale.data.tokenizer import fingerprint

    ours = None
    for key in ("streams", "val_streams"):
        for stream in getattr(cfg.data, key):
            if "://" in stream.path:
                continue
            if not Path(stream.path).exists():
                raise ConfigError(
                    f"data.{key}: {stream.path} does not exist: run `rnnscale data prepare` "
                    f"to make it, or fix the path"
                )
            record = Path(stream.path) / "prepare.json"
            try:
                made_with = json.loads(record.read_text()).get("tokenizer")
            except FileNotFoundError:
                made_with = None
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.{key}: {record} cannot be read ({e}): prepare the "
                                  f"shards again") from None  # fmt: skip
            if made_with is None or not Path(cfg.data.tokenizer).is_file():
                continue
            ours = ours or fingerprint(cfg.data.tokenizer)
            if made_with != ours:
                raise ConfigError(
                    f"data.{key}: {stream.path} was tokenized with another tokenizer "
                    f"(sha256 {made_with[:12]}...) than data.tokenizer {cfg.data.tokenizer} "
                    f"(sha256 {ours[:12]}...): use the tokenizer the shards were made with"
                )


def check_tokenizer(cfg: RunConfig) -> None:
    """data.tokenizer exists and its pieces fit model.vocab_size; raises ConfigError."""
    from rnnscale.data.tokenizer import load_tokenizer

    try:
        pieces = load_tokenizer(cfg.data.tokenizer).vocab_size()
    except FileNotFoundError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if pieces > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer {cfg.data.tokenizer} has {pieces} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}: raise model.vocab_size to at least {pieces}"
        )


def _packed_loader(cfg: RunConfig, streams, **options):
    """A PackedLoader over `streams` with the run's shapes, seed and streaming settings."""
    from rnnscale.data.loader import PackedLoader

    d = cfg.data
    return PackedLoader(
        [(s.path, s.proportion) for s in streams],
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        num_canonical_nodes=d.num_canonical_nodes,
        docs_per_batch=d.docs_per_batch,
        pack_documents=d.pack_documents,
        **options,
    )


class SyntheticBatches:
    """Micro batches of packed synthetic documents, the same for the same run.seed: one stream
    of micro batches, of which rank r takes numbers r, r + W, r + 2W, ... So a step sees the
    same rows on W ranks as on one rank with W times the accumulation. Resumable: the state is
    the packer's position and the stream's micro batch number."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, first_index: int = 0):
        docs = MarkovDocuments(cfg.model.vocab_size, cfg.data.mean_doc_len, cfg.run.seed,
                               first_index=first_index)  # fmt: skip
        self.rows = PackedRows(docs, cfg.train.seq_len)
        self.micro, self.pack = cfg.train.micro_batch_size, cfg.data.pack_documents
        self.rank, self.world, self.index = rank, world, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            picked = [self.rows.next_row() for _ in range(self.micro)]
            self.index += 1
            if (self.index - 1) % self.world == self.rank:
                return collate(picked, self.pack)

    def state_dict(self) -> dict:
        return {"rows": self.rows.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state["rows"])
        self.index = int(state["index"])

    @staticmethod
    def reshard(states: list[dict], world: int) -> list[dict]:
        """The states for `world` ranks from those of another world size. Every rank walks the
        one stream; the rank that took the step's last micro batch is furthest, and every rank
        of the new world continues from there."""
        furthest = max(states, key=lambda s: s["index"])
        return [furthest] * world


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only: no decay on norms, biases, embeddings,
    or parameters a mixer marks `_no_weight_decay` (decay rates, step sizes)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions keep the whole shape
        skip = ndim < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, cfg.optim.weight_decay), (no_decay, 0.0))
        if params  # DeepSpeed drops empty groups; the LR schedule must see the same ones
    ]
    o = cfg.optim
    return SkippableAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW that can be told to leave out its next step. Under ZeRO 1-3 DeepSpeed skips
    a step with non-finite gradients itself; plain data parallel (ZeRO 0) steps the optimizer
    directly, so the trainer checks the gradient norm and calls `skip_next_step()`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = False

    def skip_next_step(self) -> None:
        self._skip = True

    @torch.no_grad()
    def step(self, closure=None):
        if self._skip:
            self._skip = False
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return None
        return super().step(closure)


def prepare_run_dir(cfg: RunConfig, resuming: bool = False) -> Path:
    """Create the run directory and save the resolved config.yaml in it. A new run (nothing to
    resume) in a used directory keeps the old metrics.jsonl and events.jsonl beside as
    metrics.<time>.jsonl and events.<time>.jsonl (so its starts are not counted as this run's
    restarts); a resumed run appends to them (steps after the checkpoint are logged again: the
    last record of a step is the one that counts)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
    for name in ("metrics", "events"):
        old = run_dir / f"{name}.jsonl"
        if old.exists() and not resuming:
            kept = run_dir / f"{name}.{stamp}.jsonl"
            old.rename(kept)
            print(f"rnnscale: {run_dir} held an earlier run; its {name} are now in {kept.name}")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
