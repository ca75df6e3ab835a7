"""Settings: what a run may be told, checked once where a config is loaded, and the docs generated from it.

- `settings`: the machinery (a `Key` per setting, coercion, YAML with duplicate keys refused, `--set`, deep merge);
- `schema`: `Config`, one declaration per setting, and loading (`load_config`, `from_dict`, `recorded_config`);
- `rules`: the rules between keys; `launch`: the `launch:` section (where a series' members train);
- `choices`, `methods`: the names the schema offers as choices, the multi-task methods' declarations among them,
  so that the schema never imports a component;
- `docs`: docs/settings.md and the tables generated from the declarations.

The schema's names are re-exported here (`from mmpt.config import Config, load_config`): the rest of the package
and users import them from the package, and a SLURM job queued by an earlier release, whose pickle names
`mmpt.config.Config`, still loads.
"""

from mmpt.config.launch import LaunchConfig
from mmpt.config.schema import (
    EVALUATE_FLAGS,
    NAMED_FLAGS,
    RESULT_NEUTRAL,
    RESUME_MAY_CHANGE,
    SETTINGS,
    AugmentConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvaluationConfig,
    InputConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    TrainConfig,
    check_value,
    config_differences,
    config_yaml,
    fixed_key_changes,
    from_dict,
    load_config,
    parse_flag,
    recorded_config,
)
from mmpt.config.settings import to_dict

__all__ = [
    "EVALUATE_FLAGS",
    "NAMED_FLAGS",
    "RESULT_NEUTRAL",
    "RESUME_MAY_CHANGE",
    "SETTINGS",
    "AugmentConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvaluationConfig",
    "InputConfig",
    "LaunchConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SamplerConfig",
    "TrainConfig",
    "check_value",
    "config_differences",
    "config_yaml",
    "fixed_key_changes",
    "from_dict",
    "load_config",
    "parse_flag",
    "recorded_config",
    "to_dict",
]
