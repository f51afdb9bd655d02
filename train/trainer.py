"""`run(cfg)`: build model, data, optimizer and schedule from the config, train, log, clean up.

This is the one seam between launchers and training (DESIGN.md section 1): every way of
starting a job ends in this function, in the process that trains.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rnnscale.data.packing import PackedRows, collate
from rnnscale.data.synthetic import HELD_OUT, MarkovDocuments
from rnnscale.train.config import ConfigError, RunConfig, dump_yaml
from rnnscale.train.export import export_model
from rnnscale.train.logger import Logger
from rnnscale.train.model import LanguageModel, build_model
from rnnscale.train.schedule import lr_multiplier


def run(cfg: RunConfig) -> dict:
    """Train the run described by `cfg`; returns a summary (run_dir, steps, final loss)."""
    run_dir = prepare_run_dir(cfg)
    print(f"rnnscale: run directory {run_dir.resolve()}", flush=True)
    print(dump_yaml(cfg), end="", flush=True)
    seed_everything(cfg.run.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model).to(device)
    print(f"layers: {model.layer_types}\nparameters: {model.num_params():,}", flush=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.schedule, cfg.train.max_steps)
    )
    batches = make_batches(cfg, run_dir)
    val_batches = make_val_batches(cfg) if cfg.train.eval_interval > 0 else []
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    logger = Logger.for_rank(0, run_dir, cfg.train.max_steps, cfg.log.progress_bar)
    tokens_seen = 0
    metrics: dict = {}
    try:
        for step in range(1, cfg.train.max_steps + 1):
            metrics = train_step(model, optimizer, batches, accum, cfg.optim.grad_clip, device)
            scheduler.step()
            tokens_seen += metrics["tokens"]
            last = step == cfg.train.max_steps
            if val_batches and (step % cfg.train.eval_interval == 0 or last):
                metrics.update(evaluate(model, val_batches, device))
            if step % cfg.train.log_interval == 0 or last or "eval_loss" in metrics:
                logger.log(step, {**metrics, "tokens_seen": tokens_seen})
    finally:
        logger.close()
    export_model(model, run_dir)
    final = metrics.get("loss", float("nan"))
    print(
        f"rnnscale: done: {cfg.train.max_steps} steps, final loss {final:.4f}\n"
        f"run directory: {run_dir.resolve()} (config.yaml, metrics.jsonl, model.safetensors)\n"
        f"sample from it: rnnscale generate {run_dir} {_prompt_hint(run_dir)}",
        flush=True,
    )
    return {"run_dir": str(run_dir), "steps": cfg.train.max_steps, "loss": metrics.get("loss")}


def _prompt_hint(run_dir: Path) -> str:
    """Text when the run has a tokenizer, else token ids (BOS)."""
    return '--prompt "def "' if (run_dir / "tokenizer.model").exists() else "--prompt-ids 1"


def train_step(model, optimizer, batches: Iterator[dict], accum: int, grad_clip: float, device):
    """One optimizer step over `accum` micro batches: fetch, forward, backward, step, metrics."""
    start = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    loss_sum, tokens = 0.0, 0
    for _ in range(accum):
        batch = next(batches)
        loss = lm_loss(model, batch, device)
        (loss / accum).backward()
        loss_sum += loss.item()
        tokens += batch["input_ids"].numel()
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum / accum,
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_time_s": seconds,
    }


def lm_loss(model: LanguageModel, batch: dict, device) -> torch.Tensor:
    """Mean next-token cross-entropy; packed batches run as one row with cu_seqlens."""
    input_ids = batch["input_ids"].to(device)  # (B, T)
    labels = batch["labels"].to(device)  # (B, T)
    cu_seqlens = batch["cu_seqlens"]
    if cu_seqlens is not None:
        input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)  # (1, B*T)
        cu_seqlens = cu_seqlens.to(device)
    return model.loss(input_ids, labels, cu_seqlens=cu_seqlens)


@torch.no_grad()
def evaluate(model: LanguageModel, val_batches: list[dict], device) -> dict:
    """Token-weighted mean loss over the validation batches (summed over ranks when
    distributed), and its perplexity."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # (loss * tokens, tokens)
    for batch in val_batches:
        n = batch["labels"].numel()
        totals += torch.tensor([lm_loss(model, batch, device).item() * n, n], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


def make_val_batches(cfg: RunConfig) -> list[dict]:
    """The first train.eval_batches micro batches of the validation data: data.val_streams in
    order (mds), or held-out documents of the synthetic chain."""
    n = cfg.train.eval_batches
    if cfg.data.source == "synthetic":
        docs = MarkovDocuments(cfg.model.vocab_size, cfg.data.mean_doc_len, cfg.run.seed,
                               first_index=HELD_OUT)  # fmt: skip
        rows = PackedRows(docs, cfg.train.seq_len)
        mb = cfg.train.micro_batch_size
        return [collate([rows.next_row() for _ in range(mb)], cfg.data.pack_documents)
                for _ in range(n)]  # fmt: skip
    from rnnscale.data.loader import PackedLoader

    d = cfg.data
    loader = PackedLoader(
        [(s.path, s.proportion) for s in d.val_streams],
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        shuffle=False,
        num_canonical_nodes=d.num_canonical_nodes,
        docs_per_batch=d.docs_per_batch,
        pack_documents=d.pack_documents,
    )
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def make_batches(cfg: RunConfig, run_dir: Path) -> Iterator[dict]:
    """Micro batches from data.source: synthetic documents, or MDS shards (whose tokenizer is
    copied into the run directory, after checking it fits the model's vocabulary)."""
    if cfg.data.source == "synthetic":
        return synthetic_batches(cfg)
    from streaming.base.util import clean_stale_shared_memory

    from rnnscale.data.loader import PackedLoader
    from rnnscale.data.tokenizer import load_tokenizer

    clean_stale_shared_memory()  # left by a killed earlier run; it would hang this one
    try:
        pieces = load_tokenizer(cfg.data.tokenizer).vocab_size()
    except FileNotFoundError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if pieces > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer {cfg.data.tokenizer} has {pieces} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}: raise model.vocab_size to at least {pieces}"
        )
    shutil.copyfile(cfg.data.tokenizer, run_dir / "tokenizer.model")
    d = cfg.data
    return PackedLoader(
        [(s.path, s.proportion) for s in d.streams],
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        num_canonical_nodes=d.num_canonical_nodes,
        docs_per_batch=d.docs_per_batch,
        pack_documents=d.pack_documents,
        num_workers=d.num_workers,
    )


def synthetic_batches(cfg: RunConfig) -> Iterator[dict]:
    """Micro batches of packed synthetic documents, the same for the same run.seed."""
    docs = MarkovDocuments(cfg.model.vocab_size, cfg.data.mean_doc_len, cfg.run.seed)
    rows = PackedRows(docs, cfg.train.seq_len)
    while True:
        picked = [rows.next_row() for _ in range(cfg.train.micro_batch_size)]
        yield collate(picked, cfg.data.pack_documents)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only: no decay on norms, biases, embeddings,
    or parameters a mixer marks `_no_weight_decay` (decay rates, step sizes)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory and save the resolved config.yaml in it.

    Until runs can resume (checkpoints), a new run in a used directory starts afresh: the old
    metrics.jsonl is kept beside as metrics.<time>.jsonl, never overwritten.
    """
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    old = run_dir / "metrics.jsonl"
    if old.exists():
        kept = run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.jsonl"
        old.rename(kept)
        print(f"rnnscale: {run_dir} held an earlier run; its metrics are now in {kept.name}")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
