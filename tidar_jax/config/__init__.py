"""Frozen configuration dataclasses, YAML presets and dotted command-line overrides.

A run is described by one `Config` holding five sections. `load_config` merges, in order: the dataclass defaults,
a YAML preset, and `section.field=value` overrides (parsed by OmegaConf, which also rejects unknown keys and values
of the wrong type). `validate` then checks every cross-field rule and raises `ConfigError` naming the field.
"""

from tidar_jax.config.loading import (apply_overrides, config_from_dict, config_layers, load_config, merge_layers,
                                      model_config_from_dict, replace, to_dict, to_yaml)
from tidar_jax.config.schema import (ADAPTATIONS, ARCHITECTURE_FIELDS, ATTENTION_IMPLS, AUTO_ATTENTION_IMPL,
                                     DRAFT_TARGETS, DTYPES, OBJECTIVES, REMAT_POLICIES, SECTIONS, Config, ConfigError,
                                     DataConfig, DecodeConfig, MeshConfig, ModelConfig, TrainConfig)
from tidar_jax.config.validation import (CUDNN_DTYPES, CUDNN_IMPLS, resolve_attention_impl, validate, validate_backend,
                                         validate_cudnn, validate_model, validate_training)

__all__ = ["ADAPTATIONS", "ARCHITECTURE_FIELDS", "ATTENTION_IMPLS", "AUTO_ATTENTION_IMPL", "CUDNN_DTYPES",
           "CUDNN_IMPLS", "DRAFT_TARGETS",
           "DTYPES", "OBJECTIVES", "REMAT_POLICIES", "SECTIONS", "Config", "ConfigError", "DataConfig",
           "DecodeConfig", "MeshConfig", "ModelConfig", "TrainConfig", "apply_overrides", "config_from_dict",
           "config_layers", "load_config", "merge_layers", "model_config_from_dict", "replace",
           "resolve_attention_impl", "to_dict", "to_yaml", "validate", "validate_backend", "validate_cudnn",
           "validate_model", "validate_training"]
