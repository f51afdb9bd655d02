"""`run(cfg)`: set up a rank, train, log, export. The loop and one step of it live here; the
parts it composes each have their own module:

- `preflight`: the layout, the DeepSpeed config and the checks a job refuses at its start;
- `distributed`: the process group, this rank's device and node, seeds;
- `batches`: the synthetic and streaming batch sources;
- `optim`: the optimizer and schedule; `resume` and `checkpointer`: which checkpoint to
  continue from and when to save; `progress`: where the run stands;
- `run_dir`, `logger`, `notice`: what the run writes and says.

This is the one seam between launchers and training (DESIGN.md section 1): every way of
starting a job ends in `run`, in the process that trains.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rnnscale.train.batches import RowShape, make_batches, make_val_batches
from rnnscale.train.checkpointer import Checkpointer
from rnnscale.train.config import RunConfig
from rnnscale.train.console import (
    LibraryNotices,
    StartFacts,
    end_summary,
    eval_line,
    first_ids,
    prompt_hint,
    quiet_shared_memory_tracker,
    start_banner,
)
from rnnscale.train.distributed import (
    from_rank0,
    init_distributed,
    node_of_every_rank,
    rank_device,
    seed_everything,
    set_threads,
)
from rnnscale.train.export import export_from_engine
from rnnscale.train.logger import Logger, append_event
from rnnscale.train.measure import peak_flops, peak_memory_gb
from rnnscale.train.model import LanguageModel, build_model
from rnnscale.train.notice import notice
from rnnscale.train.optim import build_optimizer, build_scheduler
from rnnscale.train.preemption import Preempted, Preemption
from rnnscale.train.preflight import check_node_layout, plan
from rnnscale.train.profiling import StepProfiler
from rnnscale.train.progress import Progress
from rnnscale.train.resume import resolve_resume, restore, rollback, universal_for_resume
from rnnscale.train.room import check_room_at_start, what_is_kept
from rnnscale.train.run_dir import finished_message, last_logged_loss, prepare_run_dir
from rnnscale.train.run_lock import job_lock
from rnnscale.train.watchdog import Watchdog


def run(cfg: RunConfig) -> dict:
    """Train the run described by `cfg` on this process's rank; returns a summary (run_dir,
    steps, final loss). Every rank of the job calls it (torchrun, DeepSpeed's launcher, Ray
    workers, or one process alone)."""
    quiet = LibraryNotices.start()  # DeepSpeed speaks when it is imported, below
    quiet_shared_memory_tracker()
    try:
        return _run(cfg, quiet)
    finally:
        quiet.stop()


def _run(cfg: RunConfig, quiet: LibraryNotices) -> dict:
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # DeepSpeed prints at its start
        init_distributed(cfg.train.hang_timeout_s)
    quiet.keep_printed("DeepSpeed", printed.getvalue())
    threads = set_threads(cfg.launch.threads_per_rank)
    rank = torch.distributed.get_rank()
    device = rank_device()  # first: NCCL's object collectives below run on this rank's GPU
    finished = from_rank0(lambda: finished_message(cfg))
    if finished:  # touches nothing: no lock, no log line, no export
        notice(finished)
        return {"run_dir": str(cfg.run_dir), "steps": cfg.train.max_steps, "finished": True,
                "loss": last_logged_loss(cfg.run_dir), "skipped_steps": 0}  # fmt: skip
    with job_lock(cfg.run_dir, rank):
        quiet.to_file(cfg.run_dir, rank)
        return _train(cfg, device, threads)


def _train(cfg: RunConfig, device, threads: tuple[int, str]) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    resume_from, started = resolve_resume(cfg), time.perf_counter()
    check_node_layout(node_of_every_rank(), uses_streaming=cfg.data.source != "synthetic")
    layout, ds_config = plan(cfg, world, rank)
    universal = resume_from is not None and universal_for_resume(resume_from, cfg, world)
    if universal:  # DeepSpeed reads the universal form only when configured to
        ds_config["checkpoint"] = {"load_universal": True}
    if rank == 0:
        prepare_run_dir(cfg, resuming=resume_from is not None)
        (cfg.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    torch.distributed.barrier()
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    with torch.device("meta"):  # counts from a copy that costs no memory
        shape_model = build_model(cfg.model, cfg.kernels)
    parameters = shape_model.num_params()
    facts = StartFacts(shape_model.layer_types, parameters, world,
                       layout.sequence_parallel_size, *threads, resume_from)  # fmt: skip
    notice(start_banner(cfg, facts))
    check_room_at_start(cfg, parameters)
    engine, groups = _engine(cfg, ds_config, layout, device, fresh=resume_from is None)
    shape = RowShape.of(cfg)
    batches = make_batches(cfg.data, shape, cfg.run.seed, cfg.run_dir, layout)
    val_batches = []
    if cfg.train.eval_interval > 0:
        val_batches = make_val_batches(cfg.data, shape, cfg.run.seed, cfg.train.eval_batches,
                                       layout)  # fmt: skip
    # before the resume restores the RNG: the measurement draws random numbers
    peak = cfg.train.peak_tflops * 1e12 or peak_flops(device, cfg.parallel.dtype)[0]
    job = _Job(engine, groups, batches, val_batches, device,
               shape_model.flops_per_token(cfg.train.seq_len), peak)  # fmt: skip
    progress, start = Progress(), time.perf_counter()
    if resume_from is not None:
        progress = restore(engine, resume_from, cfg, batches, universal)
    load_s = time.perf_counter() - start
    job.logger = Logger.for_rank(rank, cfg, cfg.run_dir, initial_step=progress.step)
    job.logger.event("start", step=progress.step, world_size=world,
                     resumed_from=str(resume_from) if resume_from else None,
                     load_s=round(load_s, 4), pid=os.getpid(),
                     parameters=parameters,
                     host=socket.gethostname())  # fmt: skip
    if cfg.train.eval_suites and cfg.train.eval_interval > 0:
        from rnnscale.train.suites import TrainingSuites

        job.suites = TrainingSuites(cfg, device, val_batches)
    job.preemption = Preemption.for_run(cfg)
    job.watchdog = Watchdog(cfg.train.hang_timeout_s, job.logger).start()
    try:
        progress, metrics = _loop(job, cfg, progress)
    finally:
        job.watchdog.stop()
        job.preemption.uninstall()
        job.logger.close()
    export_from_engine(engine, cfg)
    return _finish(cfg, rank, progress, metrics, time.perf_counter() - started, job.val_batches)


def _finish(cfg: RunConfig, rank: int, progress: Progress, metrics: dict, seconds: float,
            val_batches: list[dict]) -> dict:  # fmt: skip
    """The run's summary; rank 0 logs `done` and prints the end summary."""
    if not metrics:  # resumed at train.max_steps: no step ran; the loss the run ended with
        metrics = {"loss": last_logged_loss(cfg.run_dir)}
    summary = {"run_dir": str(cfg.run_dir), "steps": cfg.train.max_steps, "loss": metrics["loss"],
               "skipped_steps": progress.skipped_steps, "tokens_seen": progress.tokens_seen,
               "seconds": seconds}  # fmt: skip
    if rank == 0:
        append_event(cfg.run_dir / "events.jsonl", "done", step=progress.step)
        hint = prompt_hint(cfg.run_dir / "tokenizer.model", first_ids(cfg, val_batches))
        notice(end_summary(cfg, summary, hint))
    return summary


@dataclass
class _Job:
    """What the loop works with, built once by `_train`."""

    engine: object  # deepspeed.DeepSpeedEngine
    groups: object  # rnnscale.parallel.sequence.ParallelGroups, or None at P = 1
    batches: Iterator[dict]
    val_batches: list[dict]
    device: torch.device
    flops_per_token: float
    peak_flops: float  # of one device, for MFU
    logger: Logger | None = None
    preemption: Preemption | None = None
    watchdog: Watchdog | None = None
    suites: object = None  # rnnscale.train.suites.TrainingSuites (train.eval_suites), or None


def _engine(cfg: RunConfig, ds_config: dict, layout, device, fresh: bool):
    """The model (built partitioned under ZeRO-3: no rank ever holds all of it; a `fresh` run
    with model.init_from takes those weights), optimizer and schedule inside the DeepSpeed
    engine; and the sequence-parallel groups (None at P = 1)."""
    import deepspeed

    groups = None
    if layout.sequence_parallel_size > 1:
        from rnnscale.parallel.sequence import ParallelGroups

        groups = ParallelGroups(layout, cfg.parallel.sp_state_exchange, cfg.parallel.sp_scan_blocks)
    stage3 = cfg.parallel.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config) if stage3 else contextlib.nullcontext():
        model = build_model(cfg.model, cfg.kernels)
    if fresh and cfg.model.init_from:
        from rnnscale.train.hf.load import load_initial_weights

        load_initial_weights(model, cfg)
        notice(f"weights from model.init_from={cfg.model.init_from}")
    model.activation_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.train.compile:
        model.compile_blocks()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=groups,  # ZeRO over all ranks, gradients averaged over the data-parallel replicas
    )  # fmt: skip
    if stage3:  # the loss uses the head's weight outside head.forward
        deepspeed.zero.register_external_parameter(engine.module, engine.module.head.weight)
    return engine, groups


def _loop(job: _Job, cfg: RunConfig, progress: Progress) -> tuple[Progress, dict]:
    """Steps until train.max_steps: train, count, evaluate, log, save; a rollback after too
    many non-finite steps in a row. Returns where the run stands and the last step's metrics."""
    world, peak = torch.distributed.get_world_size(), job.peak_flops
    saves, metrics = Checkpointer(job.engine, cfg, job.batches, job.logger), {}
    preemption, beat = job.preemption, job.watchdog.beat
    rows = cfg.train.micro_batch_size * job.engine.gradient_accumulation_steps()
    profile = StepProfiler.for_run(cfg, torch.distributed.get_rank(), job.device)
    while progress.step < cfg.train.max_steps:
        profile.step_begins(progress.step + 1)
        job.batches.line_up(rows)  # collective: the stream is read here only
        metrics, skipped = train_step(job.engine, job.batches, job.device,
                                      cfg.parallel.zero_stage, job.groups)  # fmt: skip
        progress.after_step(metrics["tokens"], skipped)
        step, last = progress.step, progress.step == cfg.train.max_steps
        beat(step, "the evaluation, logging and checkpoint after it")
        if skipped:
            notice(f"step {step} skipped: non-finite loss or gradient "
                   f"({progress.skips_in_a_row} in a row)")  # fmt: skip
        metrics["mfu"] = 3 * job.flops_per_token * metrics["tokens_per_s"] / (peak * world)
        metrics["peak_memory_gb"] = peak_memory_gb(job.device)
        if job.val_batches and (step % cfg.train.eval_interval == 0 or last):
            metrics.update(evaluate(job.engine, job.val_batches, job.device, job.groups))
            if job.suites is not None:
                metrics.update(job.suites.metrics(job.engine))
            notice(eval_line(step, metrics))
            if job.groups is not None:  # sp_bytes count the training steps only
                job.groups.stats.take()
        if step % cfg.train.log_interval == 0 or last or "eval_loss" in metrics:
            job.logger.log(step, {**metrics, "tokens_seen": progress.tokens_seen,
                                  "skipped_steps": progress.skipped_steps})  # fmt: skip
        if progress.skips_in_a_row >= cfg.train.max_consecutive_skips:
            saves.finish(step)  # go back to a checkpoint from before them, or stop
            progress = rollback(job.engine, cfg, progress, job.batches, job.logger)
            continue
        saves.after_step(progress, last)
        if not last and preemption.agreed():  # collective: every rank stops after this step
            _stop_preempted(saves, progress, preemption, job.logger)
        beat(step, f"step {step + 1}")
    profile.close()
    saves.finish(progress.step)
    return progress, metrics


def _stop_preempted(saves: Checkpointer, progress: Progress, preemption: Preemption, logger):
    """Commit this step's checkpoint, log the `preempted` event, raise Preempted."""
    path, step = saves.save_now(progress), progress.step
    preemption.stopped()
    logger.event("preempted", step=step, notice=preemption.received,
                 checkpoint=str(path) if path else None)  # fmt: skip
    kept = f"checkpoint {path} committed"
    if path is None:
        kept = (
            f"the checkpoint of step {step} was not saved; {what_is_kept(saves.cfg.checkpoint_dir)}"
        )
    raise Preempted(f"preempted ({preemption.received}) after step {step}: {kept}; run the same "
                    f"command again to resume")  # fmt: skip


def train_step(
    engine, batches: Iterator[dict], device, zero_stage: int, groups=None
) -> tuple[dict, bool]:
    """One optimizer step: gradient_accumulation_steps micro batches through the DeepSpeed
    engine (forward, backward, step), then the step's metrics, averaged over ranks, and whether
    the step was skipped (a non-finite loss or gradient). Under
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
    if grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
    skipped = engine.skipped_steps > skipped_before or not math.isfinite(grad_norm)
    metrics = _step_metrics(loss_sum, tokens, accum, groups, start, wait)
    return {**metrics, "lr": lr, "grad_norm": grad_norm}, skipped


def _step_metrics(loss_sum, tokens: int, accum: int, groups, start: float, wait: float) -> dict:
    """The step's loss and tokens summed over ranks (the one collective the metrics cost per
    step), its speed since `start`, and the bytes this rank sent in sequence-parallel
    collectives."""
    P, world = 1 if groups is None else groups.size, torch.distributed.get_world_size()
    totals = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64)])
    torch.distributed.all_reduce(totals)
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


@torch.no_grad()
def evaluate(model: LanguageModel, val_batches: list[dict], device, groups=None) -> dict:
    """Token-weighted mean loss over the validation batches (a list, or `make_val_batches`'s
    `HeldOutBatches`), summed over ranks when distributed, its perplexity, and the tokens it
    covers (`eval_tokens`: labels that are not IGNORE_INDEX; a padding batch counts none).
    Under sequence parallelism each rank holds a share of its rows' loss, and 1/P of their
    tokens."""
    from rnnscale.train.model.loss import IGNORE_INDEX

    P = 1 if groups is None else groups.size
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (loss * tokens, tokens)
    for batch in val_batches:
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        loss = lm_loss(model, batch, device, groups).item()  # every rank runs every batch
        totals += torch.tensor([loss * n, n / P], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_tokens": round(totals[1].item())}  # fmt: skip
