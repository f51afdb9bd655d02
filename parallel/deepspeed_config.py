"""The DeepSpeed config, derived from the run config by one function (DESIGN.md section 5).

`deepspeed_config(train, optim, parallel, layout)` takes the run config's `train`, `optim` and
`parallel` sections (this layer does not import the config's types) and the job's
`ParallelLayout`, and returns the dict for `deepspeed.initialize`. The optimizer (AdamW with its
parameter groups) and the LR schedule are built by the trainer and passed to
`deepspeed.initialize` as objects, so DeepSpeed steps and checkpoints them; they are not in this
dict.
"""

from __future__ import annotations

from rnnscale.parallel.layout import ParallelLayout


def batch_split(global_batch: int, micro_batch: int, data_parallel_size: int) -> int:
    """Gradient accumulation steps, or a ValueError with the numbers when they do not divide."""
    per_step = micro_batch * data_parallel_size
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch_size: {global_batch} rows per step do not split into micro "
            f"batches of {micro_batch} (train.micro_batch_size) on {data_parallel_size} "
            f"data-parallel ranks: use a multiple of {per_step}, e.g. "
            f"{max(per_step, global_batch // per_step * per_step)}"
        )
    return global_batch // per_step


def deepspeed_config(train, optim, parallel, layout: ParallelLayout) -> dict:
    """ValueError when the batch does not split over the layout's data-parallel replicas."""
    accum = batch_split(train.global_batch_size, train.micro_batch_size, layout.data_parallel_size)
    zero: dict = {
        "stage": parallel.zero_stage,
        "reduce_bucket_size": parallel.reduce_bucket_size,
        "allgather_bucket_size": parallel.allgather_bucket_size,
        "overlap_comm": parallel.overlap_comm,
        "contiguous_gradients": True,
    }
    if parallel.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=parallel.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=parallel.stage3_param_persistence_threshold,
            stage3_max_live_parameters=parallel.stage3_max_live_parameters,
            sub_group_size=parallel.sub_group_size,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    zero.update(offload_config(parallel))
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "bf16": {"enabled": parallel.dtype == "bf16"},
        # our AdamW (torch's, with our parameter groups) under ZeRO: DeepSpeed asks to be told
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer's Logger reports; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if parallel.offload_optimizer != "none":
        # our torch AdamW steps on the CPU partitions (DeepSpeedCPUAdam would be a C++ op to
        # build); DeepSpeed refuses a client optimizer under offload unless told
        config["zero_force_ds_cpu_optimizer"] = False
    if optim.grad_clip > 0:
        config["gradient_clipping"] = optim.grad_clip
    return config


def offload_config(parallel) -> dict:
    """ZeRO-Offload / ZeRO-Infinity: `offload_optimizer` and `offload_param` of DeepSpeed's
    `zero_optimization`, from parallel.offload_optimizer, offload_params (none, cpu, nvme) and
    offload_nvme_path (and, for parameters on NVMe, offload_params_max_in_cpu, _buffer_size and
    _buffer_count); empty when nothing is offloaded. Pinned host memory is off: it is
    locked per rank, and on CPU-only machines there is nothing to copy to."""
    zero = {}
    for key, how in (("offload_optimizer", parallel.offload_optimizer),
                     ("offload_param", parallel.offload_params)):  # fmt: skip
        if how == "none":
            continue
        zero[key] = {"device": how, "pin_memory": False}
        if how == "nvme":
            zero[key]["nvme_path"] = parallel.offload_nvme_path
    if parallel.offload_params == "nvme":
        zero["offload_param"].update(max_in_cpu=parallel.offload_params_max_in_cpu,
                                     buffer_size=parallel.offload_params_buffer_size,
                                     buffer_count=parallel.offload_params_buffer_count)  # fmt: skip
    return zero
