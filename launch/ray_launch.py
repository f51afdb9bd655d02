"""`rnnscale train` with launch.num_workers > 1: the workers run under Ray Train (DESIGN.md
section 7, docs/cluster.md).

An embedded local Ray (`ray.init` bound to 127.0.0.1, its dashboard too), or the cluster of
launch.address / RAY_ADDRESS. Ray Train V2's `TorchTrainer` starts launch.num_workers workers,
sets up their gloo or NCCL process group and the torchrun-style environment (RANK, WORLD_SIZE,
LOCAL_RANK, ...), and each worker calls `rnnscale.train.run(cfg)`: nothing else. When a worker
or its node dies, Ray restarts the whole group (`FailureConfig(max_failures)`) and `run` resumes
from the newest committed checkpoint by itself (checkpoint.resume: auto).
"""

from __future__ import annotations

import os
from pathlib import Path

from rnnscale.train.config import RunConfig, from_dict, to_dict


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with its run, checkpoint, data and tokenizer paths made absolute from here, so
    that workers whose working directory differs (Ray's) read and write the same places."""
    data = to_dict(cfg)
    data["run"]["dir"] = str(cfg.run_dir.resolve())
    if cfg.checkpoint.dir:
        data["checkpoint"]["dir"] = str(Path(cfg.checkpoint.dir).resolve())
    for key in ("streams", "val_streams"):
        for stream in data["data"][key]:
            if "://" not in stream["path"]:
                stream["path"] = str(Path(stream["path"]).resolve())
    if cfg.data.tokenizer and "://" not in cfg.data.tokenizer:
        data["data"]["tokenizer"] = str(Path(cfg.data.tokenizer).resolve())
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        data["checkpoint"]["resume"] = str(Path(resume).resolve())
    return from_dict(data)


def worker(config: dict) -> None:
    """One Ray Train worker: the same `run(cfg)` every launcher ends in."""
    from rnnscale.train import run

    run(from_dict(config["config"]))


def train_with_ray(cfg: RunConfig) -> None:
    """Run the job's workers under Ray Train and wait for them; raises Ray's
    `TrainingFailedError` when the workers fail more than launch.max_failures times."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    launch = cfg.launch
    cfg = absolute_paths(cfg)
    address = launch.address or os.environ.get("RAY_ADDRESS", "")
    dashboard = ""
    if not ray.is_initialized():
        if address:
            context = ray.init(address=address)
        else:  # embedded: nothing listens beyond this machine
            needed = int(launch.num_workers * launch.cpus_per_worker + 0.999)
            context = ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=launch.dashboard_port,
                num_cpus=max(os.cpu_count() or 1, needed),
            )
        dashboard = context.dashboard_url or ""
    # our ranks print through stdout once (Ray forwards it); Train's print patch would print
    # every line a second time through its logger (the setting reaches the workers)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    gpus = launch.gpus_per_worker
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    storage = launch.storage_path or str(cfg.run_dir / "ray")
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    print(f"rnnscale: {launch.num_workers} Ray Train workers on {where}; Ray dashboard: "
          f"{dashboard or 'not running'}", flush=True)  # fmt: skip
    trainer = TorchTrainer(
        worker,
        train_loop_config={"config": to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=launch.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker=resources,
            placement_strategy=launch.placement,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=launch.max_failures),
        ),
    )
    trainer.fit()
