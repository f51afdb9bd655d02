"""The run configuration: one tree of dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("configs/debug_cpu.yaml", ["optim.lr=3e-4", "train.max_steps=50"])

- `schema` (with `architecture` for the `model` and `kernels` sections, and `fields` for
  `doc()` and the generic checker): the sections and fields, each with its documentation and
  allowed range; the checker enforces the ranges, then each section's rules across fields;
- `loading`: YAML and overrides, building the typed tree, `to_dict` / `dump_yaml`, and the keys
  that moved (carried to their new place with a warning);
- `reference`: docs/configs.md generated from the schema.

Loading checks every key and value before anything starts: an unknown key, a wrong type or a
value out of range raises `ConfigError` naming the dotted path and what is allowed. Nothing
here imports torch, so the CLI can reject a bad config at once.
"""

from rnnscale.train.config.architecture import (
    AttnSection,
    ChunkSizeSection,
    GatedDeltaNetSection,
    GLASection,
    HGRN2Section,
    KernelsSection,
    Mamba2Section,
    MinRNNSection,
    MixerName,
    ModelSection,
    RetNetSection,
    RGLRUSection,
    SWASection,
)
from rnnscale.train.config.fields import ConfigError
from rnnscale.train.config.launch_section import LaunchSection
from rnnscale.train.config.loading import (
    MOVED,
    apply_override,
    dump_yaml,
    from_dict,
    load_config,
    migrate,
    model_architecture,
    to_dict,
)
from rnnscale.train.config.parallel_section import ParallelSection
from rnnscale.train.config.reference import reference_markdown
from rnnscale.train.config.schema import (
    CheckpointSection,
    DataSection,
    LogSection,
    OptimSection,
    RunConfig,
    RunSection,
    ScheduleSection,
    StreamSection,
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
    "migrate", "model_architecture", "reference_markdown", "to_dict",
]  # fmt: skip
