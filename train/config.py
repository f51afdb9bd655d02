"""The run configuration: one tree of dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/debug_cpu.yaml", ["optim.lr=3e-4", "train.max_steps=50"])

Every field carries its documentation in `field(metadata={"doc": ...})` (see `doc()`), so the
reference in docs/ can be generated from the code. Loading checks every key and value against the
dataclasses before anything starts: an unknown key, a wrong type or a value out of range raises
`ConfigError` naming the dotted path and what is allowed. This module imports no torch, so the
CLI can reject a bad config at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MixerName = Literal[
    "gla",
    "retnet",
    "mamba2",
    "hgrn2",
    "gated_deltanet",
    "mingru",
    "minlstm",
    "rglru",
    "attn",
    "swa",
]
"""Token mixers that `model.mixer_pattern` may name (the keys of `rnnscale.train.model.MIXERS`)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; read it as a number, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the dotted path."""


def doc(default: Any, text: str, key: str | None = None) -> Any:
    """A dataclass field with a default and its documentation (lists are copied per instance);
    `key`: its name in YAML when that cannot be a Python name (`checkpoint.async`)."""
    metadata = {"doc": text, "key": key} if key else {"doc": text}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _key(f: dataclasses.Field) -> str:
    """A field's name in YAML and in overrides."""
    return f.metadata.get("key", f.name)


def section(cls: type, text: str) -> Any:
    """A nested config section with its documentation."""
    return field(default_factory=cls, metadata={"doc": text})


@dataclass
class RunSection:
    name: str = doc("run", "Name of the run; also its directory name under runs/ by default.")
    dir: str = doc("", "Run directory (config.yaml, metrics.jsonl). Empty: runs/<run.name>.")
    seed: int = doc(0, "Seed of the Python, NumPy and torch generators and of synthetic data.")

    def check(self, path: str) -> None:
        _require(self.name.strip() != "", f"{path}.name", "must not be empty")
        _require("/" not in self.name, f"{path}.name", "must not contain '/' (use run.dir)")


@dataclass
class GLASection:
    expand_k: float = doc(0.5, "Key width per head as a fraction of the head width (GLA uses 0.5).")
    expand_v: float = doc(1.0, "Value width per head as a fraction of the head width.")
    gate_low_rank_dim: int = doc(16, "Rank of the low-rank projection that makes the forget gate.")
    gate_logit_normalizer: float = doc(
        16.0, "Divides logsigmoid(gate logits): keeps the decay near 1 at init (GLA paper: 16)."
    )
    chunk_size: int = doc(16, "Chunk length C of the chunkwise scan (the PyTorch path).")

    def check(self, path: str) -> None:
        _require(self.expand_k > 0, f"{path}.expand_k", "must be > 0")
        _require(self.expand_v > 0, f"{path}.expand_v", "must be > 0")
        _require(self.gate_low_rank_dim > 0, f"{path}.gate_low_rank_dim", "must be > 0")
        _require(self.gate_logit_normalizer > 0, f"{path}.gate_logit_normalizer", "must be > 0")
        _require(self.chunk_size > 0, f"{path}.chunk_size", "must be > 0")


def _positive(node: Any, path: str, *names: str) -> None:
    for name in names:
        _require(getattr(node, name) > 0, f"{path}.{name}", "must be > 0")


@dataclass
class AttnSection:
    rope_theta: float = doc(10000.0, "Base of the rotary position embedding.")

    def check(self, path: str) -> None:
        _positive(self, path, "rope_theta")


@dataclass
class SWASection:
    window: int = doc(
        2048, "Tokens each query sees, itself included (Mistral/Griffin local attention)."
    )
    rope_theta: float = doc(10000.0, "Base of the rotary position embedding.")

    def check(self, path: str) -> None:
        _positive(self, path, "window", "rope_theta")


@dataclass
class RetNetSection:
    expand_k: float = doc(1.0, "Key width per head as a fraction of the head width.")
    expand_v: float = doc(2.0, "Value width per head as a fraction of the head width (RetNet: 2).")
    rope_theta: float = doc(10000.0, "Base of the rotary embedding of queries and keys (xPos).")
    chunk_size: int = doc(64, "Chunk length C of the chunkwise scan.")

    def check(self, path: str) -> None:
        _positive(self, path, "expand_k", "expand_v", "rope_theta", "chunk_size")


@dataclass
class Mamba2Section:
    expand: int = doc(2, "Inner width d_inner = expand * d_model.")
    head_dim: int = doc(64, "Channels per SSM head; heads = d_inner / head_dim (not num_heads).")
    state_size: int = doc(128, "SSM state size N per head (the width of B and C).")
    n_groups: int = doc(1, "Groups sharing B and C (heads per group = heads / n_groups).")
    conv_size: int = doc(4, "Width of the causal depthwise convolution over x, B and C.")
    dt_min: float = doc(1e-3, "Smallest initial step size dt (log-uniform init).")
    dt_max: float = doc(0.1, "Largest initial step size dt.")
    a_init_max: float = doc(16.0, "A = -exp(A_log) starts uniform in [-a_init_max, -1].")
    chunk_size: int = doc(64, "Chunk length C of the chunkwise scan.")

    def check(self, path: str) -> None:
        _positive(self, path, "expand", "head_dim", "state_size", "n_groups", "conv_size")
        _positive(self, path, "dt_min", "chunk_size")
        _require(self.dt_max >= self.dt_min, f"{path}.dt_max", "must be >= dt_min")
        _require(self.a_init_max >= 1, f"{path}.a_init_max", "must be >= 1")


@dataclass
class HGRN2Section:
    expand_ratio: int = doc(128, "Key (forget-gate) width per head: the state is this x head_dim.")
    chunk_size: int = doc(64, "Chunk length C of the chunkwise scan.")

    def check(self, path: str) -> None:
        _positive(self, path, "expand_ratio", "chunk_size")


@dataclass
class GatedDeltaNetSection:
    head_dim: int = doc(0, "Key width per head; 0: d_model / num_heads.")
    expand_v: float = doc(2.0, "Value width per head as a multiple of head_dim (paper: 2).")
    use_forget_gate: bool = doc(True, "The decay exp(g) of Gated DeltaNet; false: plain DeltaNet.")
    allow_neg_eigval: bool = doc(
        False, "beta in (0, 2) instead of (0, 1): transitions with negative eigenvalues."
    )
    num_householder: int = doc(1, "Householder steps per token; > 1 is DeltaProduct.")
    conv_size: int = doc(4, "Width of the short convolutions over q, k and v.")
    chunk_size: int = doc(64, "Chunk length C of the chunkwise scan.")

    def check(self, path: str) -> None:
        _positive(self, path, "expand_v", "num_householder", "conv_size", "chunk_size")
        _require(self.head_dim >= 0, f"{path}.head_dim", "must be >= 0 (0: d_model / num_heads)")


@dataclass
class MinRNNSection:
    expand: float = doc(2.0, "Hidden width of the recurrence as a multiple of d_model.")
    conv_size: int = doc(4, "Width of a causal convolution before the recurrence; 0: none.")
    chunk_size: int = doc(32, "Chunk length C of the chunkwise scan.")

    def check(self, path: str) -> None:
        _positive(self, path, "expand", "chunk_size")
        _require(self.conv_size >= 0, f"{path}.conv_size", "must be >= 0 (0: none)")


@dataclass
class RGLRUSection:
    expand: float = doc(4 / 3, "Width of the recurrence as a multiple of d_model (Griffin: 4/3).")
    conv_size: int = doc(4, "Width of the causal convolution before the RG-LRU.")
    c: float = doc(8.0, "The constant c of a_t = a^(c r_t).")
    a_min: float = doc(0.9, "a^c starts uniform in [a_min, a_max] (Griffin: 0.9, 0.999).")
    a_max: float = doc(0.999, "See a_min.")
    chunk_size: int = doc(32, "Chunk length C of the chunkwise scan.")

    def check(self, path: str) -> None:
        _positive(self, path, "expand", "conv_size", "c", "chunk_size")
        _require(0 < self.a_min <= self.a_max < 1, f"{path}.a_min", "need 0 < a_min <= a_max < 1")


@dataclass
class ModelSection:
    vocab_size: int = doc(512, "Vocabulary size (rows of the embedding and the output head).")
    d_model: int = doc(64, "Width of the residual stream.")
    num_layers: int = doc(2, "Number of blocks (mixer + MLP).")
    num_heads: int = doc(2, "Heads of every token mixer; d_model must divide by it.")
    mixer_pattern: list[MixerName] = doc(
        ["gla", "attn"], "Token mixers, tiled over num_layers: [gla, gla, gla, attn] is 3:1."
    )
    mlp_hidden: int = doc(0, "Hidden width of the SwiGLU MLP; 0: 8/3 d_model rounded up to 64.")
    tie_embeddings: bool = doc(True, "Share the input embedding with the output head.")
    norm_eps: float = doc(1e-6, "Epsilon of every RMSNorm.")
    init_std: float = doc(0.02, "Standard deviation of the normal init of linear and embedding.")
    loss_chunk_tokens: int = doc(
        4096,
        "Tokens per chunk of the cross-entropy: the [tokens, vocab] logits are never held whole "
        "(train/model/loss.py).",
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
        for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
            _require(getattr(self, name) > 0, f"{path}.{name}", "must be > 0")
        _require(
            self.d_model % self.num_heads == 0,
            f"{path}.d_model",
            f"must divide by model.num_heads={self.num_heads} (got {self.d_model})",
        )
        _require(len(self.mixer_pattern) > 0, f"{path}.mixer_pattern", "must name a mixer")
        _require(self.mlp_hidden >= 0, f"{path}.mlp_hidden", "must be >= 0 (0: automatic)")
        _require(self.norm_eps > 0, f"{path}.norm_eps", "must be > 0")
        _require(self.init_std > 0, f"{path}.init_std", "must be > 0")
        _require(self.loss_chunk_tokens > 0, f"{path}.loss_chunk_tokens", "must be > 0")


@dataclass
class StreamSection:
    path: str = doc(
        "", "A directory written by `rnnscale data prepare`: a local path or an s3:// gs:// URL."
    )
    proportion: float = doc(1.0, "Weight of this stream in the mixture (normalised over streams).")

    def check(self, path: str) -> None:
        _require(self.path.strip() != "", f"{path}.path", "must name a prepared directory")
        _require(self.proportion > 0, f"{path}.proportion", "must be > 0")


@dataclass
class DataSection:
    source: Literal["synthetic", "mds"] = doc(
        "synthetic",
        "Where tokens come from. synthetic: documents drawn from a fixed random Markov chain "
        "(seeded by run.seed), for tests and smoke runs. mds: the shards of data.streams.",
    )
    mean_doc_len: int = doc(48, "synthetic: mean document length in tokens (geometric).")
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
    )
    docs_per_batch: int = doc(16, "mds: documents per streaming batch (the unit of the shuffle).")
    num_workers: int = doc(
        0,
        "mds: DataLoader worker processes reading ahead per rank (0: read in the training "
        "process). The document order, and so resume, does not depend on it.",
    )

    def check(self, path: str) -> None:
        _require(self.mean_doc_len >= 2, f"{path}.mean_doc_len", "must be >= 2 (BOS and EOS)")
        if self.source == "mds":
            _require(len(self.streams) > 0, f"{path}.streams", "data.source=mds needs streams")
            _require(self.tokenizer != "", f"{path}.tokenizer", "data.source=mds needs one")
        _positive(self, path, "num_canonical_nodes", "docs_per_batch")
        _require(self.num_workers >= 0, f"{path}.num_workers", "must be >= 0 (0: no workers)")


@dataclass
class OptimSection:
    lr: float = doc(3e-4, "Peak learning rate (AdamW).")
    weight_decay: float = doc(0.1, "Decoupled weight decay; norms, biases and embeddings get 0.")
    betas: list[float] = doc([0.9, 0.95], "AdamW betas (beta1, beta2).")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 turns clipping off.")

    def check(self, path: str) -> None:
        _require(self.lr > 0, f"{path}.lr", "must be > 0")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{path}.betas",
            f"must be two numbers in [0, 1) (got {self.betas})",
        )
        _require(self.eps > 0, f"{path}.eps", "must be > 0")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0 (0: off)")


@dataclass
class ScheduleSection:
    kind: Literal["cosine", "linear", "wsd", "constant"] = doc(
        "cosine",
        "Learning-rate shape after warmup: cosine or linear decay to min_lr_ratio * lr, "
        "wsd (warmup-stable-decay: constant, then a linear decay over decay_fraction), constant.",
    )
    warmup_steps: int = doc(0, "Steps of linear warmup from 0 to optim.lr.")
    min_lr_ratio: float = doc(0.1, "Final learning rate as a fraction of optim.lr.")
    decay_fraction: float = doc(0.2, "wsd: fraction of train.max_steps spent decaying.")

    def check(self, path: str) -> None:
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", "must be in [0, 1]")
        _require(0 < self.decay_fraction <= 1, f"{path}.decay_fraction", "must be in (0, 1]")


@dataclass
class TrainSection:
    seq_len: int = doc(64, "Tokens per row (the model sees seq_len inputs, predicts seq_len).")
    micro_batch_size: int = doc(4, "Rows per forward/backward pass on one rank.")
    global_batch_size: int = doc(
        8, "Rows per optimizer step over all ranks; the rest is gradient accumulation."
    )
    max_steps: int = doc(20, "Optimizer steps to train.")
    log_interval: int = doc(1, "Write metrics every this many steps.")
    eval_interval: int = doc(
        0,
        "Evaluate (eval_loss, eval_ppl) on the validation data every this many steps and at "
        "the end; 0: never.",
    )
    max_consecutive_skips: int = doc(
        5,
        "A step whose loss or gradient is not finite is skipped (no update) and counted; after "
        "this many in a row the run rolls back (train.max_rollbacks), or stops with an error.",
    )
    max_rollbacks: int = doc(
        3,
        "After max_consecutive_skips non-finite steps in a row, go back to the newest "
        "checkpoint from before them and go on with the data after them (the batches in "
        "between are not trained on; logged as a rollback event), at most this many times in "
        "a run; then, or with no such checkpoint, the run stops. 0: always stop.",
    )
    peak_tflops: float = doc(
        0.0,
        "Peak TFLOP/s of one device, for MFU (e.g. 989 for an H100 in bf16). 0: measured at "
        "start with a matmul in the training dtype on this device.",
    )
    eval_batches: int = doc(
        4,
        "Micro batches per rank in one evaluation: the first ones of the validation data, the "
        "same at every evaluation (kept in memory).",
    )

    def check(self, path: str) -> None:
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_steps"):
            _require(getattr(self, name) > 0, f"{path}.{name}", "must be > 0")
        _require(self.log_interval > 0, f"{path}.log_interval", "must be > 0")
        _require(self.eval_interval >= 0, f"{path}.eval_interval", "must be >= 0 (0: never)")
        _require(self.max_consecutive_skips > 0, f"{path}.max_consecutive_skips", "must be > 0")
        _require(self.max_rollbacks >= 0, f"{path}.max_rollbacks", "must be >= 0 (0: stop)")
        _require(self.peak_tflops >= 0, f"{path}.peak_tflops", "must be >= 0 (0: measure)")
        _require(self.eval_batches > 0, f"{path}.eval_batches", "must be > 0")


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
        _require(self.project.strip() != "", f"{path}.project", "must not be empty")
        _require(
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
    )
    dtype: Literal["fp32", "bf16"] = doc(
        "fp32", "Training precision: fp32, or bf16 with fp32 master weights (DeepSpeed bf16)."
    )
    activation_checkpointing: bool = doc(
        False, "Keep only each block's input and recompute the block in the backward."
    )
    reduce_bucket_size: int = doc(
        500_000_000, "ZeRO: elements per gradient reduce bucket (reduce_bucket_size)."
    )
    allgather_bucket_size: int = doc(
        500_000_000, "ZeRO 1-2: elements per parameter all-gather bucket."
    )
    overlap_comm: bool = doc(False, "ZeRO: overlap gradient reduction with the backward.")
    sequence_parallel_size: int = doc(
        1,
        "Ranks that split each sequence: P consecutive ranks hold consecutive slices of the "
        "same rows and pass recurrent states (attention: DeepSpeed Ulysses or a key/value "
        "all-gather; convolutions and swa: a halo); the ranks divided by P are the data-"
        "parallel replicas. Must divide the ranks and train.seq_len. See docs/parallelism.md.",
    )
    stage3_prefetch_bucket_size: int = doc(
        50_000_000, "ZeRO-3: elements of parameters fetched ahead of use."
    )
    stage3_param_persistence_threshold: int = doc(
        100_000, "ZeRO-3: parameters smaller than this stay whole on every rank."
    )
    stage3_max_live_parameters: int = doc(
        1_000_000_000, "ZeRO-3: most gathered parameter elements kept at once."
    )

    def check(self, path: str) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"{path}.zero_stage", "must be 0, 1, 2 or 3")
        _positive(self, path, "reduce_bucket_size", "allgather_bucket_size",
                  "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                  "sequence_parallel_size")  # fmt: skip
        _require(self.stage3_param_persistence_threshold >= 0,
                 f"{path}.stage3_param_persistence_threshold", "must be >= 0")  # fmt: skip


@dataclass
class CheckpointSection:
    interval: int = doc(
        0, "Save a checkpoint every this many steps, and at the last step; 0: never."
    )
    interval_minutes: float = doc(
        0.0,
        "Also save when this many minutes have passed since the last save (or the start), "
        "decided by rank 0's clock at a step's end; 0: no time-based saves.",
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
    keep: int = doc(3, "Committed checkpoints kept (the newest is never deleted).")
    resume: str = doc(
        "auto",
        "auto: continue from the newest checkpoint that verifies, if any; none: start afresh; "
        "or the path of one checkpoint directory (it must verify).",
    )
    dir: str = doc("", "Where checkpoints go; empty: <run dir>/checkpoints.")

    def check(self, path: str) -> None:
        _require(self.interval >= 0, f"{path}.interval", "must be >= 0 (0: never)")
        _require(self.interval_minutes >= 0, f"{path}.interval_minutes", "must be >= 0 (0: off)")
        _require(self.keep >= 1, f"{path}.keep", "must be >= 1")
        _require(self.resume.strip() != "", f"{path}.resume", "must be auto, none or a path")


@dataclass
class LaunchSection:
    num_workers: int = doc(
        1,
        "Training processes. 1: `rnnscale train` trains in its own process; more: it runs them "
        "as Ray Train workers (an embedded local Ray, or the cluster of launch.address).",
    )
    address: str = doc(
        "",
        "Ray cluster to run the workers on ('auto', 'ray://HEAD:10001', 'HEAD:6379'); empty: "
        "the RAY_ADDRESS environment variable, else an embedded local Ray bound to localhost.",
    )
    cpus_per_worker: float = doc(1.0, "CPUs Ray reserves for each worker.")
    gpus_per_worker: float = doc(0.0, "GPUs Ray reserves for each worker (0: train on CPU).")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "PACK",
        "Ray placement of the workers: PACK fills nodes in turn; STRICT_SPREAD puts one worker "
        "on every node. Streaming data wants the same number of workers on every node.",
    )
    max_failures: int = doc(
        3,
        "Times Ray restarts the worker group after a worker or node dies (the run then resumes "
        "from its newest committed checkpoint by itself); -1: no limit.",
    )
    storage_path: str = doc(
        "",
        "Where Ray Train keeps its own run state (every node must see it on a multi-node "
        "cluster); empty: <run dir>/ray.",
    )
    dashboard_port: int = doc(
        8265, "Port of the embedded Ray's dashboard (bound to 127.0.0.1 only)."
    )

    def check(self, path: str) -> None:
        _positive(self, path, "num_workers", "cpus_per_worker", "dashboard_port")
        _require(self.gpus_per_worker >= 0, f"{path}.gpus_per_worker", "must be >= 0")
        _require(self.max_failures >= -1, f"{path}.max_failures", "must be >= -1")


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
        _require(
            t.global_batch_size % t.micro_batch_size == 0,
            "train.global_batch_size",
            f"must be a multiple of train.micro_batch_size ({t.global_batch_size} rows per step "
            f"do not split into micro batches of {t.micro_batch_size})",
        )
        _require(
            t.eval_interval == 0 or self.data.source != "mds" or len(self.data.val_streams) > 0,
            "data.val_streams",
            "train.eval_interval > 0 with data.source=mds needs validation streams "
            "(e.g. [{path: data/val-shards}]), or set train.eval_interval=0",
        )


def _check_tree(node: Any, path: str) -> None:
    """Run every section's own `check(path)`, innermost sections first."""
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _check_tree(child, _join(path, _key(f)))
        elif isinstance(child, list):
            for i, item in enumerate(child):
                if dataclasses.is_dataclass(item):
                    _check_tree(item, f"{_join(path, _key(f))}[{i}]")
    if hasattr(node, "check"):
        node.check(path)


def _require(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {what}")


# ---- loading -------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply `key.sub=value` overrides, check everything, return the tree."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs/ holds the shipped ones)")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, source=str(path))


def from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Build and check a RunConfig from plain dicts (as YAML gives them)."""
    try:
        cfg = _build(RunConfig, raw, "")
        _check_tree(cfg, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML: 3e-4, true, [a, b]) in place."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = _yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def to_dict(cfg: Any) -> dict:
    """The config tree as plain dicts and lists (for YAML and for checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'top level'}: expected a mapping, got {_show(raw)}")
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key(_join(path, str(key)), str(key), list(fields)))
    kwargs = {}
    for key, value in raw.items():
        name = fields[key].name
        kwargs[name] = _convert(hints[name], value, _join(path, key))
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            options = ", ".join(map(str, allowed))
            raise ConfigError(f"{path}: {_show(value)} is not one of: {options}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list like [a, b], got {_show(value)}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")


def _unknown_key(path: str, key: str, valid: list[str]) -> str:
    parent = path.rpartition(".")[0]
    msg = f"{path}: unknown key; valid keys{' under ' + parent if parent else ''}: "
    msg += ", ".join(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        msg += f" (did you mean {_join(parent, close[0])}?)"
    return msg


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# ---- reference -----------------------------------------------------------------------------


def reference_markdown() -> str:
    """docs/configs.md: every section and field with its type, default and documentation."""
    lines = [
        "# Config reference",
        "",
        "Generated from the dataclasses in `train/config.py` (tests/test_config.py checks it is",
        "current; regenerate with `RNNSCALE_UPDATE_DOCS=1 .venv/bin/python -m pytest",
        "tests/test_config.py`). Set any field from the command line as a dotted override:",
        "`rnnscale train CONFIG optim.lr=3e-4 model.mixer_pattern=[gla,attn]`.",
    ]
    _reference(RunConfig, "", lines)
    return "\n".join(lines) + "\n"


def _reference(cls: type, path: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], _join(path, _key(f))
        if dataclasses.is_dataclass(tp):
            nested.append((tp, name, f.metadata["doc"]))
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{name}` | {_type_name(tp)} | `{default!r}` | {f.metadata['doc']} |")
    if rows:
        lines += ["", "| key | type | default | meaning |", "|---|---|---|---|", *rows]
    for tp, name, text in nested:
        lines += ["", f"{'#' * min(name.count('.') + 2, 4)} `{name}`", "", text]
        _reference(tp, name, lines)
    for f in dataclasses.fields(cls):  # the fields of each item of a list of sections
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            name = _join(path, _key(f)) + "[]"
            lines += ["", f"{'#' * min(name.count('.') + 2, 4)} `{name}`", "",
                      f"Each item of `{_join(path, _key(f))}`."]  # fmt: skip
            _reference(item, name, lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__
