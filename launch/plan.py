"""What a run needs per GPU, printed before anything is submitted.

    rnnscale plan configs/recipes/gla-1.3b.yaml --gpus 8 [--gpus-per-node 8] [--gpu-memory-gb 80]
    rnnscale plan configs/debug_cpu.yaml --match-params 20M [key=value ...]   # the width for it

The model is built on the meta device (shapes only, nothing allocated) to count parameters and
FLOPs. Memory for model states (parameters, gradients, optimizer states) per GPU, per ZeRO stage,
in DeepSpeed's accounting for bf16 training with fp32 Adam, in bytes per parameter:

    2 bf16 params + 2 bf16 grads + 4 fp32 grads + 4 fp32 master params + 8 Adam moments = 20

(the ZeRO paper counts 16; DeepSpeed's estimator adds the fp32 gradient copy). Stages 2 and 3
are DeepSpeed's own numbers, the ones `estimate_zero2_model_states_mem_needs_all_cold` and
`estimate_zero3_model_states_mem_needs_all_cold` print for no offload (those two print and
return None, so the functions behind them are called). DeepSpeed has no estimator for stages 0
and 1; they use the same byte counts, sharded as each stage shards them:

    stage 0   20 P                     nothing sharded
    stage 1    4 P + 16 P / N          fp32 grads, master params and Adam moments sharded
    stage 2    2 P + 18 P / N          and the bf16 grads (DeepSpeed)
    stage 3   18 P / N + 4 x largest   and the bf16 params, one layer gathered (DeepSpeed)

Activation memory is not estimated: what a block keeps for backward depends on each mixer's
kernel, which is not modelled here. With `parallel.activation_checkpointing` only the block
inputs stay, and those are counted (a lower bound). The config's `parallel` section is read
where the config has one, and not required: the stage it picks is marked, and an fp32 `dtype`
gets a warning, since these are mixed-precision numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass

import torch

from rnnscale.train.model import build_model

GIB = 2**30


@dataclass(frozen=True)
class ModelCounts:
    """What the memory and FLOP arithmetic needs from the model, counted on the meta device."""

    params: int  # every parameter once (a tied head is the embedding)
    embedding: int  # the input embedding
    head: int  # the output head, 0 when tied to the embedding
    largest_layer: int  # the most parameters one module owns directly (DeepSpeed's rule)
    forward_flops_per_token: int


def count_model(model_cfg, seq_len: int, kernels=None) -> ModelCounts:
    """Parameter and FLOP counts of the model of `model_cfg` (model FLOPs, which do not depend
    on the kernels: train/model/flops.py), built on the meta device with `kernels` (default:
    the defaults)."""
    with torch.device("meta"):
        model = build_model(model_cfg, kernels)
    embedding = model.embed.weight.numel()
    head = 0 if model.head.weight is model.embed.weight else model.head.weight.numel()
    # DeepSpeed's rule (stage3.model_to_params), which cannot take a meta model: it
    # deduplicates parameters by data_ptr, 0 for every meta tensor.
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelCounts(model.num_params(), embedding, head, largest, model.flops_per_token(seq_len))


def nodes(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for `gpus` ranks: fewer than a node's worth run on one node."""
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError(f"need --gpus >= 1 and --gpus-per-node >= 1, got {gpus}, {gpus_per_node}")
    if gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node:
        raise ValueError(
            f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}: "
            f"use a multiple of {gpus_per_node}"
        )
    return gpus // gpus_per_node, gpus_per_node


def model_state_bytes(
    params: int, largest_layer: int, gpus: int, gpus_per_node: int
) -> dict[int, int]:
    """Bytes per GPU of params + grads + optimizer states for ZeRO stages 0-3 (no offload).

    Stages 2 and 3 are DeepSpeed's estimators; 0 and 1 use the byte counts of DeepSpeed's
    stage-2 estimator (module docstring), rounded down as it rounds."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    num_nodes, per_node = nodes(gpus, gpus_per_node)
    _, zero2 = estimate_zero2_model_states_mem_needs(
        total_params=params, num_gpus_per_node=per_node, num_nodes=num_nodes, cpu_offload=False
    )
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        total_params=params,
        largest_layer_params=largest_layer,
        num_gpus_per_node=per_node,
        num_nodes=num_nodes,
        cpu_offload=False,
        cpu_offload_params=False,
    )
    return {0: 20 * params, 1: 4 * params + int(16 * params / gpus), 2: zero2, 3: zero3}


STAGE_SOURCE = {
    0: "formula: 20 B/param, nothing sharded",
    1: "formula: 4 B/param + 16 B/param / GPUs",
    2: "DeepSpeed estimate_zero2 (offload none)",
    3: "DeepSpeed estimate_zero3 (offload none)",
}


def parallel_settings(cfg) -> tuple[int | None, str, bool]:
    """(zero_stage, dtype, activation_checkpointing) of the config's `parallel` section, or
    (None, "bf16", False) for a config without one."""
    parallel = getattr(cfg, "parallel", None)
    return (
        getattr(parallel, "zero_stage", None),
        getattr(parallel, "dtype", "bf16"),
        bool(getattr(parallel, "activation_checkpointing", False)),
    )


def activation_checkpointed_bytes(cfg) -> int | None:
    """Bytes per GPU of the block inputs kept for one micro batch with activation
    checkpointing (in the training dtype), or None when it is off."""
    _, dtype, checkpointing = parallel_settings(cfg)
    if not checkpointing:
        return None
    t, m = cfg.train, cfg.model
    return t.micro_batch_size * t.seq_len * m.d_model * m.num_layers * _dtype_bytes(dtype)


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def plan_report(cfg, gpus: int, gpus_per_node: int, gpu_memory_gb: float) -> str:
    """The plan as text: parameters, FLOPs per token and step, how the batch splits over `gpus`,
    model-state memory per GPU for ZeRO stages 0-3 against `gpu_memory_gb` (GiB, 2^30 bytes,
    DeepSpeed's "GB"), and activations where they can be counted."""
    if gpu_memory_gb <= 0:
        raise ValueError(f"need --gpu-memory-gb > 0, got {gpu_memory_gb}")
    num_nodes, per_node = nodes(gpus, gpus_per_node)
    t = cfg.train
    c = count_model(cfg.model, t.seq_len, cfg.kernels)
    zero_stage, dtype, _ = parallel_settings(cfg)
    per_stage = model_state_bytes(c.params, c.largest_layer, gpus, gpus_per_node)
    train_flops = 3 * c.forward_flops_per_token
    tokens = t.global_batch_size * t.seq_len
    head = "(untied)" if c.head else "(tied: the embedding's weight)"
    lines = [
        f"{cfg.run.name}: {gpus} GPUs ({num_nodes} x {per_node}), {gpu_memory_gb:g} GiB each",
        "",
        f"parameters        {c.params:>15,}  ({_si(c.params)})",
        f"  embedding       {c.embedding:>15,}",
        f"  output head     {c.head:>15,}  {head}",
        f"  largest layer   {c.largest_layer:>15,}",
        f"FLOPs per token   {_si(train_flops, 'FLOP'):>15}  training: 3 x "
        f"{_si(c.forward_flops_per_token, 'FLOP')} forward at seq_len {t.seq_len}",
        f"FLOPs per step    {_si(train_flops * tokens, 'FLOP'):>15}  "
        f"{t.global_batch_size} rows x {t.seq_len} tokens",
        _batch_line(t.global_batch_size, t.micro_batch_size, gpus),
        "",
        "Model states per GPU (bf16 params and grads, fp32 Adam, no offload; 1 GiB = 2^30 B):",
        *_stage_table(per_stage, gpu_memory_gb, zero_stage),
        "  bytes per parameter, as DeepSpeed's stage-2 estimator counts them: 2 bf16 params",
        "  + 2 bf16 grads + 4 fp32 grads + 4 fp32 master params + 8 Adam moments = 20;",
        f"  stage 3 adds 4 B x the largest layer ({c.largest_layer:,}) gathered for compute.",
        "  'fits' compares model states alone; activations, communication buffers and the",
        "  CUDA context need the rest.",
        *_precision_lines(dtype),
        "",
        *_activation_lines(cfg, dtype),
    ]
    return "\n".join(lines) + "\n"


def _si(x: float, unit: str = "") -> str:
    """`x` with an SI prefix and three significant digits: 1.3 G, 7.53 GFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(b: float) -> str:
    """Binary units, as DeepSpeed prints them (its "GB" is 2^30 bytes)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _batch_line(global_batch: int, micro_batch: int, gpus: int) -> str:
    per_pass = micro_batch * gpus
    if global_batch % per_pass:
        return (
            f"batch             {global_batch} rows per step do not split into {micro_batch} rows "
            f"x {gpus} GPUs x whole accumulation steps"
        )
    steps = global_batch // per_pass
    return (
        f"batch             {global_batch} rows per step = {micro_batch} rows x {gpus} GPUs x "
        f"{steps} accumulation step{'s' if steps > 1 else ''}"
    )


def _stage_table(
    per_stage: dict[int, int], gpu_memory_gb: float, configured: int | None
) -> list[str]:
    header = ("ZeRO stage", "params+grads+optimizer per GPU", f"fits {gpu_memory_gb:g} GiB")
    rows = [
        (str(stage), _bytes(b), "yes" if b <= gpu_memory_gb * GIB else "no")
        for stage, b in per_stage.items()
    ]
    notes = ["source"] + [
        STAGE_SOURCE[stage] + ("  <- parallel.zero_stage" if stage == configured else "")
        for stage in per_stage
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(3)]
    return [
        f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {note}"
        for r, note in zip((header, *rows), notes)
    ]


def _precision_lines(dtype: str) -> list[str]:
    if dtype == "bf16":
        return []
    return [
        f"  This config trains in {dtype} (parallel.dtype), which these mixed-precision numbers",
        "  do not describe: set parallel.dtype=bf16 for the run they describe.",
    ]


def _activation_lines(cfg, dtype: str) -> list[str]:
    kept = activation_checkpointed_bytes(cfg)
    if kept is None:
        return [
            "Activations per GPU: not estimated. What a block keeps for backward depends on",
            "each mixer's kernel (the Triton chunk kernels keep per-chunk states, the PyTorch",
            "path other tensors), which this command does not model; measure one micro batch",
            "on a GPU (torch.cuda.max_memory_allocated).",
        ]
    t, m = cfg.train, cfg.model
    return [
        f"Activations per GPU, estimate: at least {_bytes(kept)} for one micro batch with",
        "parallel.activation_checkpointing: the block inputs kept for the backward,",
        f"micro_batch_size x seq_len x d_model x num_layers x {_dtype_bytes(dtype)} B ({dtype}) = "
        f"{t.micro_batch_size} x {t.seq_len} x {m.d_model} x {m.num_layers} x "
        f"{_dtype_bytes(dtype)},",
        "plus one block's activations while it is recomputed, which are not estimated.",
    ]


def plan_command(cfg, args) -> int:
    """`rnnscale plan`: the width for --match-params, the memory table for --gpus, or both (the
    table then of the matched width); 2 with one line on stderr for what cannot be done."""
    try:
        if args.match_params is None and args.gpus is None:
            raise ValueError("plan needs --gpus N (memory per GPU) or --match-params N (the "
                             "d_model for N parameters)")  # fmt: skip
        if args.match_params is not None:
            text, cfg = match_report(cfg, parse_count(args.match_params))
            print(text, end="\n" if args.gpus is not None else "")  # a blank line between
        if args.gpus is not None:
            print(plan_report(cfg, args.gpus, args.gpus_per_node, args.gpu_memory_gb), end="")
    except ValueError as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    return 0


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """A parameter count as people write it: 125000000, 350M, 1.3B (k, M, B or G, T)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmbgt]?)\s*", text.replace("_", ""), re.I)
    count = round(float(m[1]) * _SUFFIX[m[2].lower()]) if m else 0
    if count < 1:
        raise ValueError(f"--match-params {text!r}: write a parameter count like 350M, 1.3B or "
                         f"125000000")  # fmt: skip
    return count


MAX_WIDTH = 65536  # the widest d_model searched


def match_width(model_cfg, target: int) -> dict[int, int]:
    """{d_model: parameters} of the width whose count is closest to `target` and of the accepted
    widths either side of it (first key: the closest), everything else as configured (pattern,
    layers, num_heads, each mixer's expansion). Widths are the multiples of lcm(64, num_heads)
    up to MAX_WIDTH that every mixer accepts (a mixer refuses one with a ValueError, e.g.
    mamba2's head_dim not dividing expand x d_model). Parameters grow with the width, so a
    bisection finds it in about log2(MAX_WIDTH / step) meta-device models."""
    step = math.lcm(64, model_cfg.num_heads)
    counted: dict[int, int | None] = {}

    def params(k: int) -> int | None:  # at d_model = k x step; None: a mixer refuses it
        if k not in counted:
            counted[k] = _params(dataclasses.replace(model_cfg, d_model=k * step))
        return counted[k]

    def near(k: int, toward: int) -> int | None:  # the first accepted k, k + toward, ...
        stop = MAX_WIDTH // step + 1 if toward > 0 else 0
        return next((j for j in range(k, stop, toward) if params(j) is not None), None)

    lo, hi = near(1, 1), near(MAX_WIDTH // step, -1)
    if lo is None:
        raise ValueError(f"no d_model up to {MAX_WIDTH} that every mixer of "
                         f"{model_cfg.mixer_pattern} accepts: check their options")  # fmt: skip
    for k, beyond, end in ((lo, params(lo) > target, "least"), (hi, params(hi) < target, "most")):
        if beyond:
            raise ValueError(
                f"--match-params {_si(target)}: out of reach; the {end} this search reaches, "
                f"d_model={k * step}, has {_si(params(k))} parameters with "
                f"{model_cfg.num_layers} layers of [{', '.join(model_cfg.mixer_pattern)}] and "
                f"vocab_size {model_cfg.vocab_size}: change model.num_layers or the target"
            )
    while hi - lo > 1:  # params(lo) <= target <= params(hi)
        mid = near((lo + hi) // 2, 1)
        if mid == hi:  # no accepted width between them
            break
        lo, hi = (mid, hi) if params(mid) <= target else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(params(k) - target))
    sides = [near(best - 1, -1), near(best + 1, 1)] if best > 1 else [near(best + 1, 1)]
    return {k * step: params(k) for k in (best, *sides) if k is not None}


def _params(model_cfg) -> int | None:
    """The parameters of the model of `model_cfg`, None where a mixer refuses its width; from a
    meta model of one block per distinct mixer (a block's count depends on its mixer and the
    widths alone), num_layers / len(kinds) times faster than building every block."""
    kinds = list(dict.fromkeys(model_cfg.mixer_pattern))
    try:
        with torch.device("meta"):
            model = build_model(dataclasses.replace(model_cfg, mixer_pattern=kinds,
                                                    num_layers=len(kinds)))  # fmt: skip
    except ValueError:
        return None
    block = {k: sum(p.numel() for p in b.parameters()) for k, b in zip(kinds, model.blocks)}
    layers = model_cfg.layer_types()
    return model.num_params() - sum(block.values()) + sum(block[k] for k in layers)


def match_report(cfg, target: int):
    """(text, the config at the matched width): the d_model whose parameter count is closest
    to `target` beside the widths either side, with counts and distances, and its override."""
    m = cfg.model
    counts = match_width(m, target)
    best = next(iter(counts))
    step = math.lcm(64, m.num_heads)
    lines = [
        f"{cfg.run.name}: the d_model of [{', '.join(m.mixer_pattern)}] x {m.num_layers} layers "
        f"closest to {_si(target)} parameters",
        f"  (num_heads {m.num_heads}, vocab_size {m.vocab_size} and the mixers' options as "
        f"configured; d_model in steps of {step}{'' if step == 64 else ', lcm(64, num_heads)'})",
        f"  d_model  {'parameters':>15}  {'vs ' + _si(target):>9}",
        *[f"  {w:>7}  {n:>15,}  {_off(n, target):>9}" + ("  <- closest" if w == best else "")
          for w, n in sorted(counts.items())],
        f"override: model.d_model={best}",
    ]  # fmt: skip
    matched = dataclasses.replace(cfg, model=dataclasses.replace(m, d_model=best))
    return "\n".join(lines) + "\n", matched


def _off(params: int, target: int) -> str:
    return f"{100 * (params - target) / target:+.2f}%"
