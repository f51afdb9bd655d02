"""The config schema: one tree of dataclasses, every field with its default, documentation and
allowed range in its metadata (`doc(...)`), so the generic checker enforces the ranges and the
reference in docs/configs.md shows them. A section's `check()` holds only rules that relate
several fields. This module imports no torch."""

from __future__ import annotations

import dataclasses
import operator
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rnnscale.train.mixers import REGISTRY

MixerName = Literal[tuple(REGISTRY)]  # type: ignore[valid-type]
"""Token mixers that `model.mixer_pattern` may name: the keys of the mixer registry."""

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the dotted path."""


def doc(default: Any, text: str, key: str | None = None, *, why: str = "", **bounds) -> Any:
    """A dataclass field with a default and its documentation (lists are copied per instance).
    `key`: its name in YAML when that cannot be a Python name (`checkpoint.async`); `gt`, `ge`,
    `lt`, `le`: the allowed range of a number (checked at load, shown in the reference), `why`:
    what a boundary value means ("0: never")."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"doc() takes bounds {sorted(_BOUNDS)}, not {sorted(unknown)}")
    metadata = {"doc": text, "bounds": bounds, "why": why}
    if key:
        metadata["key"] = key
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, text: str) -> Any:
    """A nested config section with its documentation."""
    return field(default_factory=cls, metadata={"doc": text})


def field_key(f: dataclasses.Field) -> str:
    """A field's name in YAML and in overrides."""
    return f.metadata.get("key", f.name)


def range_text(f: dataclasses.Field) -> str:
    """The allowed range of a field, as `> 0` or `>= 0, < 1`; empty when any value goes."""
    return ", ".join(f"{_BOUNDS[op]} {bound}" for op, bound in f.metadata.get("bounds", {}).items())


def require(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {what}")


@dataclass
class RunSection:
    name: str = doc("run", "Name of the run; also its directory name under runs/ by default.")
    dir: str = doc("", "Run directory (config.yaml, metrics.jsonl). Empty: runs/<run.name>.")
    seed: int = doc(0, "Seed of the Python, NumPy and torch generators and of synthetic data.")

    def check(self, path: str) -> None:
        require(self.name.strip() != "", f"{path}.name", "must not be empty")
        require("/" not in self.name, f"{path}.name", "must not contain '/' (use run.dir)")


@dataclass
class GLASection:
    expand_k: float = doc(
        0.5, "Key width per head as a fraction of the head width (GLA uses 0.5).", gt=0
    )
    expand_v: float = doc(1.0, "Value width per head as a fraction of the head width.", gt=0)
    gate_low_rank_dim: int = doc(
        16, "Rank of the low-rank projection that makes the forget gate.", gt=0
    )
    gate_logit_normalizer: float = doc(
        16.0,
        "Divides logsigmoid(gate logits): keeps the decay near 1 at init (GLA paper: 16).",
        gt=0,
    )


@dataclass
class AttnSection:
    rope_theta: float = doc(10000.0, "Base of the rotary position embedding.", gt=0)


@dataclass
class SWASection:
    window: int = doc(
        2048, "Tokens each query sees, itself included (Mistral/Griffin local attention).", gt=0
    )
    rope_theta: float = doc(10000.0, "Base of the rotary position embedding.", gt=0)


@dataclass
class RetNetSection:
    expand_k: float = doc(1.0, "Key width per head as a fraction of the head width.", gt=0)
    expand_v: float = doc(
        2.0, "Value width per head as a fraction of the head width (RetNet: 2).", gt=0
    )
    rope_theta: float = doc(
        10000.0, "Base of the rotary embedding of queries and keys (xPos).", gt=0
    )


@dataclass
class Mamba2Section:
    expand: int = doc(2, "Inner width d_inner = expand * d_model.", gt=0)
    head_dim: int = doc(
        64, "Channels per SSM head; heads = d_inner / head_dim (not num_heads).", gt=0
    )
    state_size: int = doc(128, "SSM state size N per head (the width of B and C).", gt=0)
    n_groups: int = doc(1, "Groups sharing B and C (heads per group = heads / n_groups).", gt=0)
    conv_size: int = doc(4, "Width of the causal depthwise convolution over x, B and C.", gt=0)
    dt_min: float = doc(1e-3, "Smallest initial step size dt (log-uniform init).", gt=0)
    dt_max: float = doc(0.1, "Largest initial step size dt.")
    a_init_max: float = doc(16.0, "A = -exp(A_log) starts uniform in [-a_init_max, -1].", ge=1)

    def check(self, path: str) -> None:
        require(self.dt_max >= self.dt_min, f"{path}.dt_max", "must be >= dt_min")


@dataclass
class HGRN2Section:
    expand_ratio: int = doc(
        128, "Key (forget-gate) width per head: the state is this x head_dim.", gt=0
    )


@dataclass
class GatedDeltaNetSection:
    head_dim: int = doc(0, "Key width per head; 0: d_model / num_heads.", ge=0,
                        why="0: d_model / num_heads")  # fmt: skip
    expand_v: float = doc(2.0, "Value width per head as a multiple of head_dim (paper: 2).", gt=0)
    use_forget_gate: bool = doc(True, "The decay exp(g) of Gated DeltaNet; false: plain DeltaNet.")
    allow_neg_eigval: bool = doc(
        False, "beta in (0, 2) instead of (0, 1): transitions with negative eigenvalues."
    )
    num_householder: int = doc(1, "Householder steps per token; > 1 is DeltaProduct.", gt=0)
    conv_size: int = doc(4, "Width of the short convolutions over q, k and v.", gt=0)


@dataclass
class MinRNNSection:
    expand: float = doc(2.0, "Hidden width of the recurrence as a multiple of d_model.", gt=0)
    conv_size: int = doc(
        4, "Width of a causal convolution before the recurrence; 0: none.", ge=0, why="0: none"
    )


@dataclass
class RGLRUSection:
    expand: float = doc(
        4 / 3, "Width of the recurrence as a multiple of d_model (Griffin: 4/3).", gt=0
    )
    conv_size: int = doc(4, "Width of the causal convolution before the RG-LRU.", gt=0)
    c: float = doc(8.0, "The constant c of a_t = a^(c r_t).", gt=0)
    a_min: float = doc(0.9, "a^c starts uniform in [a_min, a_max] (Griffin: 0.9, 0.999).", gt=0)
    a_max: float = doc(0.999, "See a_min.", lt=1)

    def check(self, path: str) -> None:
        require(self.a_min <= self.a_max, f"{path}.a_min", "need 0 < a_min <= a_max < 1")


@dataclass
class ModelSection:
    vocab_size: int = doc(512, "Vocabulary size (rows of the embedding and the output head).", gt=0)
    d_model: int = doc(64, "Width of the residual stream.", gt=0)
    num_layers: int = doc(2, "Number of blocks (mixer + MLP).", gt=0)
    num_heads: int = doc(2, "Heads of every token mixer; d_model must divide by it.", gt=0)
    mixer_pattern: list[MixerName] = doc(
        ["gla", "attn"], "Token mixers, tiled over num_layers: [gla, gla, gla, attn] is 3:1."
    )
    mlp_hidden: int = doc(
        0, "Hidden width of the SwiGLU MLP; 0: 8/3 d_model rounded up to 64.", ge=0,
        why="0: automatic",
    )  # fmt: skip
    tie_embeddings: bool = doc(True, "Share the input embedding with the output head.")
    norm_eps: float = doc(1e-6, "Epsilon of every RMSNorm.", gt=0)
    init_std: float = doc(
        0.02, "Standard deviation of the normal init of linear and embedding.", gt=0
    )
    gla: GLASection = section(GLASection, "Options of the gla mixer (Gated Linear Attention).")
    retnet: RetNetSection = section(RetNetSection, "Options of the retnet mixer (retention).")
    mamba2: Mamba2Section = section(Mamba2Section, "Options of the mamba2 mixer (SSD).")
    hgrn2: HGRN2Section = section(HGRN2Section, "Options of the hgrn2 mixer.")
    gated_deltanet: GatedDeltaNetSection = section(
        GatedDeltaNetSection, "Options of the gated_deltanet mixer (DeltaNet, DeltaProduct)."
    )
    mingru: MinRNNSection = section(MinRNNSection, "Options of the mingru mixer.")
    minlstm: MinRNNSection = section(MinRNNSection, "Options of the minlstm mixer.")
    rglru: RGLRUSection = section(RGLRUSection, "Options of the rglru mixer (Griffin/Hawk).")
    attn: AttnSection = section(AttnSection, "Options of the attn mixer (softmax attention).")
    swa: SWASection = section(SWASection, "Options of the swa mixer (sliding-window attention).")

    def check(self, path: str) -> None:
        require(
            self.d_model % self.num_heads == 0,
            f"{path}.d_model",
            f"must divide by model.num_heads={self.num_heads} (got {self.d_model})",
        )
        require(len(self.mixer_pattern) > 0, f"{path}.mixer_pattern", "must name a mixer")


@dataclass
class ChunkSizeSection:
    gla: int = doc(16, "The gla family (per-key decay): the gla and hgrn2 mixers.", gt=0)
    simple_gla: int = doc(
        64, "The simple_gla family (one decay per head): the retnet and mamba2 mixers.", gt=0
    )
    delta: int = doc(64, "The delta family: the gated_deltanet mixer.", gt=0)
    scan: int = doc(32, "The elementwise scan: the mingru, minlstm and rglru mixers.", gt=0)


@dataclass
class KernelsSection:
    backend: Literal["auto", "torch", "triton"] = doc(
        "auto",
        "Scan kernels: auto (Triton on CUDA tensors, the chunkwise PyTorch path otherwise), "
        "torch, or triton (CUDA only).",
    )
    chunk_size: ChunkSizeSection = section(
        ChunkSizeSection,
        "Chunk length C of each scan family's chunkwise kernels. A speed setting: a run may "
        "resume with other values. Powers of two >= 16 (what Triton's tl.dot needs) unless "
        "kernels.backend is torch.",
    )
    loss_chunk_tokens: int = doc(
        4096,
        "Tokens per chunk of the cross-entropy: the [tokens, vocab] logits are never held whole "
        "(train/model/loss.py).",
        gt=0,
    )

    def check(self, path: str) -> None:
        if self.backend == "torch":
            return
        for f in dataclasses.fields(self.chunk_size):
            C = getattr(self.chunk_size, f.name)
            require(
                C >= 16 and C & (C - 1) == 0,
                f"{path}.chunk_size.{f.name}",
                f"must be a power of two >= 16 for the Triton kernels (got {C}); other sizes "
                f"need kernels.backend=torch",
            )


@dataclass
class StreamSection:
    path: str = doc(
        "", "A directory written by `rnnscale data prepare`: a local path or an s3:// gs:// URL."
    )
    proportion: float = doc(
        1.0, "Weight of this stream in the mixture (normalised over streams).", gt=0
    )

    def check(self, path: str) -> None:
        require(self.path.strip() != "", f"{path}.path", "must name a prepared directory")


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
        "Peak TFLOP/s of one device, for MFU (e.g. 989 for an H100 in bf16). 0: measured at "
        "start with a matmul in the training dtype on this device.",
        ge=0,
        why="0: measure",
    )
    eval_batches: int = doc(
        4,
        "Micro batches per rank in one evaluation: the first ones of the validation data, the "
        "same at every evaluation (kept in memory).",
        gt=0,
    )


@dataclass
class WandbSection:
    mode: Literal["offline", "online", "disabled"] = doc(
        "offline",
        "offline: write wandb/ in the run directory, upload later with `wandb sync`; online: "
        "stream to the server (needs WANDB_API_KEY or `wandb login`); disabled: no wandb. The "
        "environment variable WANDB_MODE=disabled also turns it off.",
    )
    project: str = doc("rnnscale", "wandb project the run is filed under.")
    entity: str = doc("", "wandb user or team; empty: the default entity of the API key.")

    def check(self, path: str) -> None:
        require(self.project.strip() != "", f"{path}.project", "must not be empty")
        require(
            not any(c in self.project for c in "/\\#?%:"),
            f"{path}.project",
            f"must not contain any of / \\ # ? % : (got {self.project!r})",
        )


@dataclass
class ParallelSection:
    zero_stage: int = doc(
        0,
        "DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 also "
        "gradients, 3 also parameters.",
        ge=0,
        le=3,
    )
    dtype: Literal["fp32", "bf16"] = doc(
        "fp32", "Training precision: fp32, or bf16 with fp32 master weights (DeepSpeed bf16)."
    )
    activation_checkpointing: bool = doc(
        False, "Keep only each block's input and recompute the block in the backward."
    )
    reduce_bucket_size: int = doc(
        500_000_000, "ZeRO: elements per gradient reduce bucket (reduce_bucket_size).", gt=0
    )
    allgather_bucket_size: int = doc(
        500_000_000, "ZeRO 1-2: elements per parameter all-gather bucket.", gt=0
    )
    overlap_comm: bool = doc(False, "ZeRO: overlap gradient reduction with the backward.")
    sequence_parallel_size: int = doc(
        1,
        "Ranks that split each sequence: P consecutive ranks hold consecutive slices of the "
        "same rows and pass recurrent states (attention: DeepSpeed Ulysses or a key/value "
        "all-gather; convolutions and swa: a halo); the ranks divided by P are the data-"
        "parallel replicas. Must divide the ranks and train.seq_len. See docs/parallelism.md.",
        gt=0,
    )
    stage3_prefetch_bucket_size: int = doc(
        50_000_000, "ZeRO-3: elements of parameters fetched ahead of use.", gt=0
    )
    stage3_param_persistence_threshold: int = doc(
        100_000, "ZeRO-3: parameters smaller than this stay whole on every rank.", ge=0
    )
    stage3_max_live_parameters: int = doc(
        1_000_000_000, "ZeRO-3: most gathered parameter elements kept at once.", gt=0
    )


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
    resume: str = doc(
        "auto",
        "auto: continue from the newest checkpoint that verifies, if any; none: start afresh; "
        "or the path of one checkpoint directory (it must verify).",
    )
    dir: str = doc("", "Where checkpoints go; empty: <run dir>/checkpoints.")

    def check(self, path: str) -> None:
        require(self.resume.strip() != "", f"{path}.resume", "must be auto, none or a path")


@dataclass
class LaunchSection:
    num_workers: int = doc(
        1,
        "Training processes. 1: `rnnscale train` trains in its own process; more: it runs them "
        "as Ray Train workers (an embedded local Ray, or the cluster of launch.address).",
        gt=0,
    )
    address: str = doc(
        "",
        "Ray cluster to run the workers on ('auto', 'ray://HEAD:10001', 'HEAD:6379'); empty: "
        "the RAY_ADDRESS environment variable, else an embedded local Ray bound to localhost.",
    )
    cpus_per_worker: float = doc(1.0, "CPUs Ray reserves for each worker.", gt=0)
    gpus_per_worker: float = doc(0.0, "GPUs Ray reserves for each worker (0: train on CPU).", ge=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "PACK",
        "Ray placement of the workers: PACK fills nodes in turn; STRICT_SPREAD puts one worker "
        "on every node. Streaming data wants the same number of workers on every node.",
    )
    max_failures: int = doc(
        3,
        "Times Ray restarts the worker group after a worker or node dies (the run then resumes "
        "from its newest committed checkpoint by itself); -1: no limit.",
        ge=-1,
        why="-1: no limit",
    )
    storage_path: str = doc(
        "",
        "Where Ray Train keeps its own run state (every node must see it on a multi-node "
        "cluster); empty: <run dir>/ray.",
    )
    dashboard_port: int = doc(
        8265, "Port of the embedded Ray's dashboard (bound to 127.0.0.1 only).", gt=0
    )


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


def check_tree(node: Any, path: str) -> None:
    """Check every field's declared range, then every section's own `check(path)`, innermost
    sections first."""
    for f in dataclasses.fields(node):
        child, where = getattr(node, f.name), join(path, field_key(f))
        if dataclasses.is_dataclass(child):
            check_tree(child, where)
        elif isinstance(child, list):
            for i, item in enumerate(child):
                if dataclasses.is_dataclass(item):
                    check_tree(item, f"{where}[{i}]")
        _check_range(f, child, where)
    if hasattr(node, "check"):
        node.check(path)


def _check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    bounds = f.metadata.get("bounds", {})
    if bounds and not all(getattr(operator, op)(value, bound) for op, bound in bounds.items()):
        why = f.metadata.get("why")
        require(False, path, f"must be {range_text(f)}{f' ({why})' if why else ''}")


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
