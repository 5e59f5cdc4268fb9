"""Building a `Config`: dataclass defaults, then a YAML preset, then `section.field=value` overrides (OmegaConf
rejects unknown keys and values of the wrong type), then `validate`; and the dict / YAML forms a checkpoint saves."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tidar_jax.config.schema import SECTIONS, Config, ConfigError, ModelConfig
from tidar_jax.config.validation import validate, validate_model


def _merge(base: Any, *layers: Any) -> Config:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # One line: the key OmegaConf names (full_key), then its message without the internals after it.
        message = str(e).splitlines()[0]
        raise ConfigError(f"{e.full_key}: {message}" if getattr(e, "full_key", None) else message) from None


def config_layers(path: str | Path | None = None, overrides: Sequence[str] = ()) -> list:
    """The OmegaConf layers of an optional YAML preset and `a.b=value` overrides, in merge order (unvalidated)."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come from several libraries; their messages span lines
            raise ConfigError(f"cannot parse config file {path}: {' '.join(str(e).split())}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...), "
                              f"not a {type(layer).__name__}")
        if not layer:  # an empty file would silently train the defaults
            raise ConfigError(f"config file {path} is empty: it must hold sections (model:, data:, ...)")
        _check_sections(layer, f"config file {path}")
        layers.append(layer)
    for layer in _override_layers(overrides):
        _check_sections(layer, "overrides")
        layers.append(layer)
    return layers


def _check_sections(layer: DictConfig, where: str) -> None:
    """Each top-level entry of `layer` must be a mapping (a section such as model:), not a scalar or a list."""
    for name, value in layer.items_ex(resolve=False):
        if not isinstance(value, DictConfig) and name in SECTIONS:
            raise ConfigError(f"{where}: section {name} must be a mapping of fields (e.g. {name}: {{...}}), got "
                              f"{OmegaConf.to_container(value) if OmegaConf.is_config(value) else value!r}")


def merge_layers(base: Config | None, layers: Sequence) -> Config:
    """`base` (None = the defaults) with `layers` merged on top, NOT validated: callers that fill fields in
    afterwards (run_setup.py) validate the result themselves."""
    start = [] if base is None else [OmegaConf.create(to_dict(base))]
    return _merge(Config, *start, *layers)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Builds a validated `Config` from defaults, an optional YAML preset and `a.b=value` overrides.

    Raises `ConfigError` for a missing preset, an unknown key, a value of the wrong type or a broken cross-field rule.
    """
    return validate(merge_layers(None, config_layers(path, overrides)))


def _override_layers(overrides: Sequence[str]) -> list:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
    return [OmegaConf.from_dotlist(list(overrides))] if overrides else []


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with `section.field=value` overrides applied (typed and validated like `load_config`)."""
    return validate(_merge(Config, OmegaConf.create(to_dict(cfg)), *_override_layers(overrides)))


def config_from_dict(data: dict) -> Config:
    """Rebuilds a validated `Config` from `to_dict` output (e.g. read back from a checkpoint)."""
    return validate(_merge(Config, OmegaConf.create(data)))


def model_config_from_dict(data: dict) -> ModelConfig:
    """Rebuilds a validated `ModelConfig` from a plain dict."""
    cfg = _merge(ModelConfig, OmegaConf.create(data))
    validate_model(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for JSON or YAML."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def replace(cfg: Config, **sections: dict) -> Config:
    """Returns a validated copy with fields replaced per section, e.g. `replace(cfg, model={"n_layers": 4})`."""
    updated = {name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    return validate(dataclasses.replace(cfg, **updated))
