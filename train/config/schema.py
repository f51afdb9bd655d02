"""The config schema: one tree of dataclasses, every field with its default, documentation and
allowed range in its metadata (`doc(...)`, train/config/fields.py), so the generic checker
enforces the ranges and the reference in docs/configs.md shows them. A section's `check()`
holds only rules that relate several fields. The `model` and `kernels` sections are in
train/config/architecture.py, `launch` in launch_section.py, `parallel` in
parallel_section.py. This module imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rnnscale.train.config.architecture import KernelsSection, ModelSection
from rnnscale.train.config.fields import doc, require, section
from rnnscale.train.config.launch_section import LaunchSection
from rnnscale.train.config.parallel_section import ParallelSection


@dataclass
class RunSection:
    name: str = doc(
        "run", "Name and wandb run id of the run. Where run.dir is set and run.name is not, at the "
        "same or a later level (the YAML file, then the overrides): run.dir's last component.",
        nonblank=True, forbid="/", why="a path goes in run.dir",
    )  # fmt: skip
    dir: str = doc("", "Run directory (config.yaml, metrics.jsonl). Empty: runs/<run.name>.")
    seed: int = doc(0, "Seed of the Python, NumPy and torch generators and of synthetic data.")


@dataclass
class StreamSection:
    path: str = doc(
        "", "A directory written by `rnnscale data prepare`: a local path or an s3:// gs:// URL.",
        nonblank=True, why="name a prepared directory",
    )  # fmt: skip
    proportion: float = doc(
        1.0, "Weight of this stream in the mixture (normalised over streams).", gt=0
    )


@dataclass
class DataSection:
    source: Literal["synthetic", "mds"] = doc(
        "synthetic",
        "Where tokens come from. synthetic: documents drawn from a fixed random Markov chain "
        "(seeded by run.seed), for tests and smoke runs. mds: the shards of data.streams.",
    )
    mean_doc_len: int = doc(
        48, "synthetic: mean document length in tokens (geometric).", ge=2,
        why="BOS and EOS",
    )  # fmt: skip
    pack_documents: bool = doc(
        True, "Pass document boundaries as cu_seqlens so recurrent state resets at each one."
    )
    streams: list[StreamSection] = doc(
        [], "mds: training streams, e.g. [{path: data/shards, proportion: 1.0}]."
    )
    val_streams: list[StreamSection] = doc(
        [],
        "mds: validation streams, read in order (no shuffle); train.eval_interval > 0 needs "
        "them. synthetic: held-out documents of the same chain are used instead.",
    )
    tokenizer: str = doc(
        "",
        "mds: the tokenizer.model the shards were made with; it is copied into the run directory "
        "(rnnscale generate reads it there).",
    )
    num_canonical_nodes: int = doc(
        1,
        "mds: streaming's canonical node count. The shuffle depends on it, not on the real "
        "node count: keep it fixed for a run and its resumes.",
        gt=0,
    )
    docs_per_batch: int = doc(
        16, "mds: documents per streaming batch (the unit of the shuffle).", gt=0
    )
    num_workers: int = doc(
        0,
        "mds: DataLoader worker processes reading ahead per rank (0: read in the training "
        "process). The document order, and so resume, does not depend on it.",
        ge=0,
        why="0: no workers",
    )

    def check(self, path: str) -> None:
        if self.source == "mds":
            require(len(self.streams) > 0, f"{path}.streams", "data.source=mds needs streams")
            require(self.tokenizer != "", f"{path}.tokenizer", "data.source=mds needs one")


@dataclass
class OptimSection:
    lr: float = doc(3e-4, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = doc(
        0.1, "Decoupled weight decay; norms, biases and embeddings get 0.", ge=0
    )
    betas: list[float] = doc([0.9, 0.95], "AdamW betas (beta1, beta2), each in [0, 1).")
    eps: float = doc(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = doc(
        1.0, "Clip the global gradient norm to this; 0 turns clipping off.", ge=0, why="0: off"
    )

    def check(self, path: str) -> None:
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{path}.betas",
            f"must be two numbers in [0, 1) (got {self.betas})",
        )


@dataclass
class ScheduleSection:
    kind: Literal["cosine", "linear", "wsd", "constant"] = doc(
        "cosine",
        "Learning-rate shape after warmup: cosine or linear decay to min_lr_ratio * lr, "
        "wsd (warmup-stable-decay: constant, then a linear decay over decay_fraction), constant.",
    )
    warmup_steps: int = doc(0, "Steps of linear warmup from 0 to optim.lr.", ge=0)
    min_lr_ratio: float = doc(0.1, "Final learning rate as a fraction of optim.lr.", ge=0, le=1)
    decay_fraction: float = doc(0.2, "wsd: fraction of train.max_steps spent decaying.", gt=0, le=1)


@dataclass
class TrainSection:
    seq_len: int = doc(
        64, "Tokens per row (the model sees seq_len inputs, predicts seq_len).", gt=0
    )
    micro_batch_size: int = doc(4, "Rows per forward/backward pass on one rank.", gt=0)
    global_batch_size: int = doc(
        8, "Rows per optimizer step over all ranks; the rest is gradient accumulation.", gt=0
    )
    max_steps: int = doc(20, "Optimizer steps to train.", gt=0)
    log_interval: int = doc(1, "Write metrics every this many steps.", gt=0)
    eval_interval: int = doc(
        0,
        "Evaluate (eval_loss, eval_ppl) on the validation data every this many steps and at "
        "the end; 0: never.",
        ge=0,
        why="0: never",
    )
    eval_suites: list[Literal["recall", "length"]] = doc(
        [],
        "Built-in suites run at every evaluation too, logged beside eval_loss (metrics.jsonl, "
        "TensorBoard, wandb): recall (eval_recall_acc: associative recall at train.seq_len, 4 "
        "to 32 pairs) and length (eval_loss_within_train_len, eval_loss_beyond_train_len over "
        "rows 4 x train.seq_len; eval_passkey_acc with a tokenizer). docs/evaluation.md.",
    )
    max_consecutive_skips: int = doc(
        5,
        "A step whose loss or gradient is not finite is skipped (no update) and counted; after "
        "this many in a row the run rolls back (train.max_rollbacks), or stops with an error.",
        gt=0,
    )
    max_rollbacks: int = doc(
        3,
        "After max_consecutive_skips non-finite steps in a row, go back to the newest "
        "checkpoint from before them and go on with the data after them (the batches in "
        "between are not trained on; logged as a rollback event), at most this many times in "
        "a run; then, or with no such checkpoint, the run stops. 0: always stop.",
        ge=0,
        why="0: stop",
    )
    peak_tflops: float = doc(
        0.0,
        "Peak TFLOP/s of one device, for MFU (e.g. 989.5 for an H100 in bf16). 0: the "
        "datasheet's dense peak in the training dtype on a GPU we know (H100, H200, A100), "
        "else a matmul in the training dtype measured at start on this device (CPU included).",
        ge=0,
        why="0: measure",
    )
    hang_timeout_s: float = doc(
        300.0,
        "A rank without progress for this long (after the first step; a step, evaluation or "
        "save must take less) ends with exit 124, naming the ranks behind, for the launcher to "
        "restart; collectives time out at twice it. 0: off (the backend's timeout).",
        ge=0,
        why="0: off",
    )
    eval_batches: int = doc(
        4,
        "Micro batches per rank in one evaluation, the same at every one: the first ones of the "
        "validation data (more than it holds: the whole set, with a notice). 0: the whole "
        "validation set, every document once (mds only).",
        ge=0,
        why="0: all",
    )
    profile_start: int = doc(
        0,
        "First step (1-based) to profile: a torch.profiler trace, and on CUDA a memory "
        "snapshot, under <run dir>/profile/ (docs/monitoring.md, Profiles). 0: off.",
        ge=0,
        why="0: off",
    )
    compile: bool = doc(
        False,
        "torch.compile every block in place, as torchtitan compiles each transformer block: "
        "inductor fuses the norms, gates, convolutions, attention and MLP; the recurrent scans "
        "run our kernels as they are. The first steps compile (seconds to minutes); the state "
        "dict and checkpoints are the same as without (docs/architecture.md).",
    )
    profile_steps: int = doc(1, "Steps profiled from train.profile_start on.", gt=0)
    profile_ranks: Literal["rank0", "all"] = doc(
        "rank0", "Which ranks write a profile: rank0, or all (one trace per rank)."
    )

    def check(self, path: str) -> None:
        last = self.profile_start + self.profile_steps - 1
        require(self.profile_start == 0 or last <= self.max_steps, f"{path}.profile_steps",
                f"steps {self.profile_start}-{last} to profile run past train.max_steps "
                f"({self.max_steps}): lower train.profile_start or "
                f"train.profile_steps")  # fmt: skip


@dataclass
class WandbSection:
    mode: Literal["offline", "online", "disabled"] = doc(
        "offline",
        "offline: write wandb/ in the run directory, upload later with `wandb sync`; online: "
        "stream to the server (needs WANDB_API_KEY or `wandb login`); disabled: no wandb. The "
        "environment variable WANDB_MODE=disabled also turns it off.",
    )
    project: str = doc("rnnscale", "wandb project the run is filed under.", nonblank=True,
                       forbid="/\\#?%:")  # fmt: skip
    entity: str = doc("", "wandb user or team; empty: the default entity of the API key.")


@dataclass
class CheckpointSection:
    interval: int = doc(
        0,
        "Save a checkpoint every this many steps, and at the last step; 0: never.",
        ge=0,
        why="0: never",
    )
    interval_minutes: float = doc(
        0.0,
        "Also save when this many minutes have passed since the last save (or the start), "
        "decided by rank 0's clock at a step's end; 0: no time-based saves.",
        ge=0,
        why="0: off",
    )
    async_save: bool = doc(
        False,
        "Write checkpoints in the background: at the save step each rank copies its state in "
        "memory (one more copy of the model and optimizer state in host RAM, for the length "
        "of the write), and training goes on; the checkpoint is committed (manifest) at the "
        "first step's end by which every rank's files are on disk, and always before the next "
        "save and at the end of the run.",
        key="async",
    )
    keep: int = doc(3, "Committed checkpoints kept (the newest is never deleted).", ge=1)
    max_failed_saves: int = doc(
        3,
        "Stop the run with an error after this many saves in a row failed (a full disk, an I/O "
        "error), rather than train on with nothing recent to resume from; every failure is "
        "reported, loudly while the run has no committed checkpoint at all. 0: never stop.",
        ge=0,
        why="0: never stop",
    )
    preempt_signal: Literal["SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "none"] = doc(
        "SIGUSR1",
        "A preemption notice besides SIGTERM (Slurm's --signal): at either, every rank ends "
        "the step it is in, a checkpoint of that step is committed and the process exits with "
        "75, to be run again (docs/checkpointing.md); none: SIGTERM only.",
    )
    preempt_grace_s: float = doc(
        60.0,
        "Seconds from a preemption notice to the committed checkpoint; past them the process "
        "exits with 75 at once and a resume starts from the newest committed checkpoint.",
        gt=0,
    )
    resume: str = doc(
        "auto",
        "auto: continue from the newest checkpoint that verifies, if any; none: start afresh; "
        "or the path of one checkpoint directory (it must verify).",
        nonblank=True,
        why="auto, none or a path",
    )
    dir: str = doc("", "Where checkpoints go; empty: <run dir>/checkpoints.")


@dataclass
class LogSection:
    progress_bar: bool = doc(True, "Show a console progress bar (step, loss, tokens/s, ETA).")
    tensorboard: bool = doc(
        True, "Write TensorBoard event files to tb/ in the run directory (`rnnscale dashboard`)."
    )
    wandb: WandbSection = section(WandbSection, "Weights & Biases logging (rank 0 only).")


@dataclass
class RunConfig:
    run: RunSection = section(RunSection, "Name, directory and seed of the run.")
    model: ModelSection = section(ModelSection, "Architecture of the language model.")
    kernels: KernelsSection = section(
        KernelsSection,
        "Speed settings of the scan kernels and the loss: they change how the math is done, "
        "not what it is, so a run may resume with other values.",
    )
    data: DataSection = section(DataSection, "Where training tokens come from.")
    optim: OptimSection = section(OptimSection, "Optimizer (AdamW) settings.")
    schedule: ScheduleSection = section(ScheduleSection, "Learning-rate schedule.")
    train: TrainSection = section(TrainSection, "Batch sizes, sequence length and run length.")
    parallel: ParallelSection = section(ParallelSection, "DeepSpeed: ZeRO, precision, memory.")
    checkpoint: CheckpointSection = section(CheckpointSection, "Saving and resuming.")
    log: LogSection = section(LogSection, "Console and metric logging.")
    launch: LaunchSection = section(LaunchSection, "Workers: how many, and where (Ray).")

    @property
    def run_dir(self) -> Path:
        """The run directory: `run.dir`, or runs/<run.name> when it is empty."""
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def check(self, path: str = "") -> None:
        t = self.train
        require(
            t.global_batch_size % t.micro_batch_size == 0,
            "train.global_batch_size",
            f"must be a multiple of train.micro_batch_size ({t.global_batch_size} rows per step "
            f"do not split into micro batches of {t.micro_batch_size})",
        )
        require(
            t.eval_interval == 0 or self.data.source != "mds" or len(self.data.val_streams) > 0,
            "data.val_streams",
            "train.eval_interval > 0 with data.source=mds needs validation streams "
            "(e.g. [{path: data/val-shards}]), or set train.eval_interval=0",
        )
        require(
            not t.eval_suites or t.eval_interval > 0,
            "train.eval_suites",
            "run at every evaluation: set train.eval_interval > 0 too, or leave them out",
        )
        require(
            not t.eval_suites or self.parallel.sequence_parallel_size == 1,
            "train.eval_suites",
            "score whole rows on every rank, which sequence parallelism is there to avoid: "
            "leave them out and run rnnscale eval --suite after training",
        )
