"""The run configuration: one tree of dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/debug_cpu.yaml", ["optim.lr=3e-4", "train.max_steps=50"])

- `schema`: the sections and fields, each with its documentation and allowed range, and the
  generic checker (ranges, then each section's rules across fields);
- `loading`: YAML and overrides, building the typed tree, `to_dict` / `dump_yaml`, and the keys
  that moved (carried to their new place with a warning);
- `reference`: docs/configs.md generated from the schema.

Loading checks every key and value before anything starts: an unknown key, a wrong type or a
value out of range raises `ConfigError` naming the dotted path and what is allowed. Nothing
here imports torch, so the CLI can reject a bad config at once.
"""

from rnnscale.train.config.loading import (
    MOVED,
    apply_override,
    dump_yaml,
    from_dict,
    load_config,
    migrate,
    to_dict,
)
from rnnscale.train.config.reference import reference_markdown
from rnnscale.train.config.schema import (
    AttnSection,
    CheckpointSection,
    ChunkSizeSection,
    ConfigError,
    DataSection,
    GatedDeltaNetSection,
    GLASection,
    HGRN2Section,
    KernelsSection,
    LaunchSection,
    LogSection,
    Mamba2Section,
    MinRNNSection,
    MixerName,
    ModelSection,
    OptimSection,
    ParallelSection,
    RetNetSection,
    RGLRUSection,
    RunConfig,
    RunSection,
    ScheduleSection,
    StreamSection,
    SWASection,
    TrainSection,
    WandbSection,
)

__all__ = [
    "MOVED", "AttnSection", "CheckpointSection", "ChunkSizeSection", "ConfigError",
    "DataSection", "GLASection", "GatedDeltaNetSection", "HGRN2Section", "KernelsSection",
    "LaunchSection", "LogSection", "Mamba2Section", "MinRNNSection", "MixerName",
    "ModelSection", "OptimSection", "ParallelSection", "RGLRUSection", "RetNetSection",
    "RunConfig", "RunSection", "SWASection", "ScheduleSection", "StreamSection",
    "TrainSection", "WandbSection", "apply_override", "dump_yaml", "from_dict", "load_config",
    "migrate", "reference_markdown", "to_dict",
]  # fmt: skip
