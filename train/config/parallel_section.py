"""The `parallel` section of the config: DeepSpeed's ZeRO stage, precision, buckets, offload,
and the sequence-parallel degree. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rnnscale.train.config.fields import doc, require


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
    sp_state_exchange: Literal["scan", "allgather"] = doc(
        "scan",
        "How the ranks of a sequence group pass recurrent states: scan (each rank receives one "
        "state from the previous rank and sends one on, a chain; the backward mirrors it: "
        "|S| bytes each way per layer at any P) or allgather (every rank gathers every rank's "
        "transition and state: (P - 1) x (|A| + |S|)). Same values; see docs/parallelism.md.",
    )
    sp_scan_blocks: int = doc(
        4,
        "scan: the most pieces each state travels in (along rows x heads; none under 256 KiB; "
        "one at P = 2), "
        "each forwarded as soon as it arrives, so the last rank waits P - 1 piece hops plus "
        "one state, not P - 1 states.",
        ge=1,
        le=64,
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
    sub_group_size: int = doc(
        1_000_000_000,
        "ZeRO-3: parameter elements per optimizer sub-group (sub_group_size), the unit in which "
        "an offloaded optimizer is stepped and swapped; with offload_optimizer=nvme each rank "
        "holds 4 buffers of one sub-group's fp32 state: lower it when host memory is short.",
        gt=0,
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = doc(
        "none",
        "ZeRO-Offload: keep the optimizer states in host memory (cpu) or on an NVMe drive "
        "(nvme, under offload_nvme_path) and step the optimizer on the CPU; needs "
        "zero_stage >= 1. See docs/parallelism.md, Offload.",
    )
    offload_params: Literal["none", "cpu", "nvme"] = doc(
        "none",
        "ZeRO-Infinity: keep the parameters in host memory (cpu) or on NVMe (nvme) and fetch "
        "them for each layer's use; needs zero_stage 3.",
    )
    offload_nvme_path: str = doc(
        "", "A directory on a fast local NVMe drive, for offload to nvme (one per node)."
    )
    offload_params_max_in_cpu: int = doc(
        1_000_000_000,
        "offload_params=nvme: parameter elements a rank keeps in host memory (max_in_cpu); the "
        "rest live on NVMe only. 0: all on NVMe.",
        ge=0,
    )
    offload_params_buffer_size: int = doc(
        100_000_000,
        "offload_params=nvme: elements of each host buffer parameters are read into "
        "(buffer_size); at least the largest parameter's shard.",
        gt=0,
    )
    offload_params_buffer_count: int = doc(
        5,
        "offload_params=nvme: host buffers for parameters read from NVMe (buffer_count); at "
        "least the parameters in use and prefetched at once (DeepSpeed stops with 'Not enough "
        "buffers' otherwise).",
        gt=0,
    )

    def check(self, path: str) -> None:
        stage = self.zero_stage
        require(self.offload_optimizer == "none" or stage >= 1, f"{path}.offload_optimizer",
                f"offloading the optimizer needs parallel.zero_stage >= 1 (got {stage}): set "
                f"parallel.zero_stage=1, 2 or 3, or offload_optimizer=none")  # fmt: skip
        require(self.offload_params == "none" or stage == 3, f"{path}.offload_params",
                f"offloading parameters needs parallel.zero_stage=3 (got {stage}): set "
                f"parallel.zero_stage=3, or offload_params=none")  # fmt: skip
        for key in ("offload_optimizer", "offload_params"):
            require(getattr(self, key) != "nvme" or self.offload_nvme_path.strip() != "",
                    f"{path}.offload_nvme_path",
                    f"parallel.{key}=nvme needs a directory on an NVMe drive here, e.g. "
                    f"parallel.offload_nvme_path=/local_nvme")  # fmt: skip
