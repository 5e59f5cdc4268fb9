"""Resolve a training run once: preset, overrides, the workdir's saved run, the init checkpoint and the tokenizer.

`plan_run` reads everything a run depends on, checks it, and returns a `RunPlan` that the trainer executes without
reading any of it again. It writes nothing, so a refused run leaves the filesystem as it was.

Precedence, lowest first:
- a resumed run (WORKDIR holds checkpoints): the saved config, then the preset and overrides. Fields that define
  what the run computes (model, data, objective, adaptation) may only restate the saved values (floats compared
  with a relative tolerance of 1e-6, keeping the saved value); anything else, e.g. train.steps, may change.
- a new run with `train.init_from=DIR`: the init checkpoint's model section, then the preset and overrides. The
  architecture and token ids come from the checkpoint and may only be restated (same tolerance, so a preset's
  `rms_norm_eps: 1e-5` matches a GGUF's float32 9.99999975e-06); block size, dtypes, remat and adapters are the
  run's choice. data.tokenizer defaults to the checkpoint's tokenizer; its chat template travels with the run.
- a new run from scratch: the dataclass defaults, then the preset and overrides.
Then `data.separator_token_id` (-1) and `data.tokenizer_sha256` are filled in from the tokenizer, and the result
is validated (the config's own rules, training-only ones included, are checked before the tokenizer is
resolved). A resumed run's tokenizer.json must hash to the recorded `data.tokenizer_sha256`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from tidar_jax.checkpoint.store import (
    CHECKPOINT_DIR,
    TOKENIZER_FILE,
    locate_checkpoint,
    read_checkpoint_config,
    read_step_config,
    run_fields,
)
from tidar_jax.config import (ARCHITECTURE_FIELDS, Config, ConfigError, config_layers, merge_layers, to_dict, validate,
                              validate_training)
from tidar_jax.data.pipeline import check_tokenizer_matches, load_or_train_tokenizer, separator_id
from tidar_jax.data.tokenizer import Tokenizer

# Files of an imported model's workdir that a run started from it carries along (chat template, HF export info).
CARRIED_FILES = ("tokenizer_config.json", "chat_template.jinja", "hf_config.json")
_REL_TOL = 1e-6
# Fields the run fills in; a request that leaves them at these values takes the saved ones.
_UNRESOLVED = {"data.separator_token_id": -1, "data.tokenizer_sha256": ""}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A resolved run. config: validated, with separator and tokenizer hash filled in; resume: WORKDIR holds
    checkpoints of this run; tokenizer: in memory (trained if need be; written to WORKDIR by the trainer);
    init_dir: the checkpoint whose params a NEW run starts from (None when resuming or from scratch)."""

    config: Config
    workdir: Path
    resume: bool
    tokenizer: Tokenizer
    init_dir: Path | None
    step: int | None = None  # --step N: the saved step a resumed run starts from (None: the latest)

    @property
    def carried_files(self) -> list[Path]:
        """Files of the init workdir to copy into WORKDIR (only those it has)."""
        if self.init_dir is None:
            return []
        return [self.init_dir / name for name in CARRIED_FILES if (self.init_dir / name).is_file()]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=_REL_TOL)
    return a == b


def _restate(wanted: Config, fixed: dict[str, Any], what: str) -> Config:
    """`wanted` with every `section.field` of `fixed` checked to restate the fixed value (floats within tolerance)
    and then set to it exactly. Raises ConfigError naming every field that differs."""
    flat = {f"{s}.{k}": v for s in ("model", "data", "train") for k, v in to_dict(getattr(wanted, s)).items()}
    diffs = [f"{k}: {what} {v!r}, requested {flat[k]!r}" for k, v in fixed.items()
             if not _same(v, flat[k]) and _UNRESOLVED.get(k, object()) != flat[k]]
    if diffs:
        raise ConfigError(f"{'; '.join(diffs)}")
    sections: dict[str, dict[str, Any]] = {}
    for key, value in fixed.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(wanted, **{s: dataclasses.replace(getattr(wanted, s), **v)
                                          for s, v in sections.items()})


def _check_workdir(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} exists and is not a directory")


def _init_dir(path: str) -> tuple[Path, Config]:
    """(workdir of the init checkpoint, its config) for train.init_from."""
    root, step, workdir = locate_checkpoint(path)
    return workdir, read_step_config(root, step)


def plan_run(workdir: str | Path, *, preset: str | Path | None = None, overrides: Sequence[str] = (),
             config: Config | None = None, step: int | None = None) -> RunPlan:
    """Resolves the run in WORKDIR from a YAML `preset` + dotted `overrides` (the CLI), or from a complete
    `config` object (Python callers; every field counts as requested). With neither, WORKDIR's saved run is
    resumed (overrides still apply). Raises ConfigError / CheckpointError / TokenizerError / DataError naming the
    problem; reads but never writes. `step` (--step N) resumes from that saved step; it must be the latest, since
    the next save must not land below (or on) a later one: later steps are refused, never deleted."""
    workdir = Path(workdir)
    _check_workdir(workdir)
    layers = config_layers(preset, overrides) if config is None else [to_dict(config)]
    if step is not None:
        _check_resume_step(workdir, step)
    saved = read_checkpoint_config(workdir, step)
    init_dir = None
    if saved is not None:
        wanted = merge_layers(saved, layers)
        try:
            wanted = _restate(wanted, run_fields(saved), "saved")
        except ConfigError as e:
            raise ConfigError(f"workdir {workdir} already holds a run with a different config ({e}); resume with "
                              "the saved config or choose another --workdir") from None
    else:
        if config is None and preset is None and not any(o.split("=", 1)[0].strip() == "train.init_from"
                                                         for o in overrides):
            raise ConfigError(f"{workdir} holds no checkpoint to resume: pass --config (or train.init_from=DIR) "
                              "to start a new run")
        wanted = merge_layers(None, layers)
        if wanted.train.init_from:
            init_dir, init_cfg = _init_dir(wanted.train.init_from)
            base = dataclasses.replace(Config(), model=init_cfg.model)
            wanted = merge_layers(base, layers)
            fixed = {f"model.{k}": getattr(init_cfg.model, k) for k in ARCHITECTURE_FIELDS}
            try:
                wanted = _restate(wanted, fixed, "checkpoint")
            except ConfigError as e:
                raise ConfigError(f"train.init_from={wanted.train.init_from} holds a different architecture: {e}"
                                  ) from None
            if not wanted.data.tokenizer and (init_dir / TOKENIZER_FILE).is_file():
                wanted = dataclasses.replace(
                    wanted, data=dataclasses.replace(wanted.data, tokenizer=str(init_dir / TOKENIZER_FILE)))
    validate_training(validate(wanted))  # the config's own rules first: no tokenizer is trained for a broken one
    tokenizer = _resolve_tokenizer(wanted, workdir, saved, init_dir)
    wanted = dataclasses.replace(wanted, data=dataclasses.replace(
        wanted.data, separator_token_id=separator_id(wanted, tokenizer), tokenizer_sha256=tokenizer.fingerprint))
    check_tokenizer_matches(tokenizer, wanted)
    return RunPlan(config=validate(wanted), workdir=workdir, resume=saved is not None, tokenizer=tokenizer,
                   init_dir=init_dir, step=step)


def _check_resume_step(workdir: Path, step: int) -> None:
    """--step N must name a saved step with no later step on disk (the next save would skip or collide with it)."""
    root = workdir / CHECKPOINT_DIR
    later = [p.name for p in sorted(root.iterdir()) if p.name.isdigit() and int(p.name) > step] if root.is_dir() else []
    if later:
        raise ConfigError(f"--step {step}: {root} holds later step(s) {later}, which the resumed run's saves would "
                          f"collide with; move them out of {root} (nothing is deleted) and run again")


def _resolve_tokenizer(cfg: Config, workdir: Path, saved: Config | None, init_dir: Path | None) -> Tokenizer:
    """The run's tokenizer: a resumed run's own tokenizer.json (which must hash as recorded), else
    `load_or_train_tokenizer`; a data.tokenizer must equal both the workdir's and the init checkpoint's."""
    in_workdir = workdir / TOKENIZER_FILE
    if saved is not None:
        if not in_workdir.is_file():
            raise ConfigError(f"{in_workdir} is missing: the run in {workdir} cannot resume without its tokenizer")
        tokenizer = Tokenizer.from_file(in_workdir)
        recorded = saved.data.tokenizer_sha256
        if recorded and tokenizer.fingerprint != recorded:
            raise ConfigError(f"{in_workdir} is not the tokenizer this run was trained with (sha256 "
                              f"{tokenizer.fingerprint[:12]}..., recorded {recorded[:12]}...); restore it or "
                              "choose another --workdir")
        return tokenizer
    tokenizer = load_or_train_tokenizer(cfg, in_workdir)
    others = [(str(in_workdir), in_workdir)]
    if init_dir is not None:
        others.append((f"train.init_from={cfg.train.init_from}", init_dir / TOKENIZER_FILE))
    for name, path in others:
        if path.is_file() and Tokenizer.from_file(path).fingerprint != tokenizer.fingerprint:
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} differs from the tokenizer of {name} ({path})")
    return tokenizer


def describe(plan: RunPlan, start_step: int) -> str:
    """One line saying what the run does: resumes from a step, starts from an init checkpoint, or from scratch."""
    if plan.resume:
        return f"resuming {plan.workdir} from step {start_step}"
    if plan.init_dir is not None:
        return f"new run in {plan.workdir} from {plan.init_dir} ({plan.config.train.adaptation} adaptation)"
    return f"new run in {plan.workdir} from scratch"


