"""WORKDIR/decode_tuning.json: the measurements `decode.block_size=auto` and `decode.proposal_lengths=auto` choose from.

`python -m infer.tune` writes it next to the checkpoint. It holds
- `acceptance`: the checkpoint's acceptance histogram (greedy, beta = 1, the trained K, the full proposal set) on a
  named prompt set, and the checkpoint step it was measured at;
- `profiles`: per machine and compute dtype (`profile_key`), the measured decode-step seconds per tuned batch size:
  the AR step and TiDAR steps of K' drafts with m proposal blocks (step_choice.StepCosts).
No choice is stored: a loader recomputes it from these measurements (`resolve`, step_choice.choose) under the decode
config's constraints (`auto`, one K, one set), so a fixed `decode.block_size=4` with `decode.proposal_lengths=auto`
picks the best set for K = 4 from the same file. The choice for a batch bucket B uses the costs of the largest tuned
batch size <= B (the smallest tuned one when B is below all). This machine's profile is used when the file has one;
otherwise the most recently measured profile, with a warning (costs measured elsewhere are a guess). A file tuned for
another model (architecture or trained K) is refused; one from another checkpoint step is used with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax

from tidar_jax import caches
from tidar_jax.config import ARCHITECTURE_FIELDS, DecodeConfig, ModelConfig
from tidar_jax.decoding import step_choice
from tidar_jax.decoding.step_choice import AUTO, Choice, StepCosts
from tidar_jax.ops import cpu_kernels

FILE_NAME = "decode_tuning.json"
FORMAT = "tidar-jax decode tuning"
VERSION = 1
HOW_TO_TUNE = "python -m infer.tune --checkpoint WORKDIR"


class TuningError(ValueError):
    """A tuning file is missing, damaged or for another model; the message names the file and what to run."""


def uses_auto(decode_cfg: DecodeConfig) -> bool:
    return AUTO in (decode_cfg.block_size, decode_cfg.proposal_lengths)


def machine_key() -> str:
    """What measured step costs are valid for (16 hex digits): the backend, device kind and count, jax version and,
    on a CPU, the CPU kernels' build key (sources, flags, jaxlib, the CPU's model and feature flags)."""
    device = jax.devices()[0]
    parts = [jax.default_backend(), device.device_kind, str(jax.device_count()), jax.__version__]
    if jax.default_backend() == "cpu":
        parts.append(cpu_kernels.build_key())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def profile_key(machine: str, compute_dtype: str) -> str:
    return f"{machine}/{compute_dtype}"


def model_fingerprint(model_cfg: ModelConfig) -> dict[str, Any]:
    """The model fields a tuning file must match: the architecture and the trained block size, as JSON has them (so a
    fingerprint read back from the file compares equal)."""
    return json.loads(json.dumps({name: getattr(model_cfg, name) for name in (*ARCHITECTURE_FIELDS, "block_size")}))


@dataclasses.dataclass(frozen=True)
class Profile:
    """Step costs measured on one machine in one compute dtype. costs: {tuned batch size: StepCosts}; info:
    free-form provenance (device, kernel mode, cache length, date) kept for the reader."""

    machine: str
    compute_dtype: str
    written: str
    costs: Mapping[int, StepCosts]
    info: Mapping[str, Any]

    def costs_for(self, bucket: int) -> tuple[int, StepCosts]:
        """(tuned batch size, its costs) for a batch bucket: the largest tuned size <= bucket, else the smallest."""
        sizes = sorted(self.costs)
        batch = max((b for b in sizes if b <= bucket), default=sizes[0])
        return batch, self.costs[batch]


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """A parsed tuning file. histogram: [K+1] acceptance counts (index 0 unused); acceptance: its provenance (prompt
    set, prompts, new tokens); profiles: {profile_key: Profile}."""

    path: Path
    model: Mapping[str, Any]
    checkpoint_step: int
    histogram: tuple[int, ...]
    acceptance: Mapping[str, Any]
    profiles: Mapping[str, Profile]

    def profile(self, compute_dtype: str) -> Profile:
        """This machine's profile for `compute_dtype`, else the most recently written one with a warning."""
        wanted = profile_key(machine_key(), compute_dtype)
        if wanted in self.profiles:
            return self.profiles[wanted]
        latest = max(self.profiles.values(), key=lambda p: p.written)
        warnings.warn(f"{self.path} has no step costs measured on this machine in {compute_dtype}; using those of "
                      f"{latest.info.get('device', latest.machine)} in {latest.compute_dtype} ({latest.written}). "
                      f"Run {HOW_TO_TUNE} here for a choice measured on this machine", stacklevel=3)
        return latest

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": dict(self.model),
                "acceptance": {**self.acceptance, "histogram": list(self.histogram),
                               "checkpoint_step": self.checkpoint_step},
                "profiles": {key: {"machine": p.machine, "compute_dtype": p.compute_dtype, "written": p.written,
                                   "info": dict(p.info),
                                   "step_costs": {str(b): _costs_to_json(c) for b, c in sorted(p.costs.items())}}
                             for key, p in sorted(self.profiles.items())}}


def _costs_to_json(costs: StepCosts) -> dict[str, Any]:
    return {"ar_seconds": costs.ar, "tidar": [{"block_size": k, "proposal_blocks": m, "seconds": s}
                                              for (k, m), s in sorted(costs.tidar.items())]}


def tuning_path(path: str | Path) -> Path:
    """WORKDIR/decode_tuning.json for a workdir, or `path` itself when it names a file."""
    path = Path(path)
    return path / FILE_NAME if path.is_dir() or path.suffix != ".json" else path


def read_tuning(path: str | Path) -> DecodeTuning:
    """Parses WORKDIR/decode_tuning.json (or the file `path`); TuningError (one line, naming the file and what to
    run) when it is missing, not JSON, of another format or version, or has a missing or ill-typed field."""
    file = tuning_path(path)
    if not file.is_file():
        raise TuningError(f"{file} not found: decode.block_size=auto and decode.proposal_lengths=auto choose from "
                          f"the measurements it holds; run {HOW_TO_TUNE} first")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TuningError(f"{file} is damaged ({e}); run {HOW_TO_TUNE} again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TuningError(f"{file} is not a tidar-jax decode tuning file")
    if data.get("version") != VERSION:
        raise TuningError(f"{file} has version {data.get('version')!r}; this tidar-jax reads version {VERSION}: "
                          f"run {HOW_TO_TUNE} again")
    try:
        return _parse(file, data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TuningError(f"{file} is damaged ({type(e).__name__}: {e}); run {HOW_TO_TUNE} again") from None


def _positive(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"step seconds must be finite and positive, got {value!r}")
    return float(value)


def _parse(file: Path, data: dict) -> DecodeTuning:
    acceptance = dict(data["acceptance"])
    histogram = tuple(acceptance.pop("histogram"))
    step = acceptance.pop("checkpoint_step")
    if len(histogram) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in histogram):
        raise ValueError(f"acceptance.histogram must be non-negative integer counts, got {list(histogram)}")
    step_choice.truncated(histogram, 1)  # counts some steps
    profiles = {}
    for key, p in dict(data["profiles"]).items():
        costs = {}
        for batch, c in dict(p["step_costs"]).items():
            tidar = {(int(t["block_size"]), int(t["proposal_blocks"])): _positive(t["seconds"]) for t in c["tidar"]}
            costs[int(batch)] = StepCosts(ar=_positive(c["ar_seconds"]), tidar=tidar)
        if not costs:
            raise ValueError(f"profile {key} has no step costs")
        profiles[key] = Profile(machine=str(p["machine"]), compute_dtype=str(p["compute_dtype"]),
                                written=str(p["written"]), costs=costs, info=dict(p.get("info", {})))
    if not profiles:
        raise ValueError("no profiles")
    return DecodeTuning(path=file, model=dict(data["model"]), checkpoint_step=int(step), histogram=histogram,
                        acceptance=acceptance, profiles=profiles)


def with_measurements(existing: DecodeTuning | None, path: Path, model_cfg: ModelConfig, checkpoint_step: int,
                      histogram, acceptance: Mapping[str, Any], costs: Mapping[int, StepCosts],
                      info: Mapping[str, Any]) -> DecodeTuning:
    """A tuning with this run's acceptance and this machine's profile; the other machines' profiles of `existing`
    are kept when it was tuned for the same model (step costs do not depend on the weights' values)."""
    fingerprint = model_fingerprint(model_cfg)
    kept = dict(existing.profiles) if existing is not None and existing.model == fingerprint else {}
    machine = machine_key()
    written = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    kept[profile_key(machine, model_cfg.compute_dtype)] = Profile(machine, model_cfg.compute_dtype, written,
                                                                  dict(costs), dict(info))
    return DecodeTuning(path=path, model=fingerprint, checkpoint_step=checkpoint_step,
                        histogram=tuple(int(n) for n in histogram), acceptance=dict(acceptance), profiles=kept)


def write_tuning(tuning: DecodeTuning) -> None:
    """Writes `tuning` to its path atomically (an interrupted write leaves the old file)."""
    caches.write_json_atomic(tuning.path, tuning.to_json())


def check_model(tuning: DecodeTuning, model_cfg: ModelConfig) -> None:
    """TuningError when the file was tuned for another architecture or trained K."""
    fingerprint = model_fingerprint(model_cfg)
    changed = sorted(k for k in fingerprint if tuning.model.get(k) != fingerprint[k])
    if changed:
        raise TuningError(f"{tuning.path} was tuned for another model (model.{', model.'.join(changed)} differ); "
                          f"run {HOW_TO_TUNE} for this one")


def resolve(tuning: DecodeTuning, model_cfg: ModelConfig, decode_cfg: DecodeConfig, bucket: int) -> Choice:
    """The TiDAR step (step_choice.Choice; its throughputs are for the tuned batch size whose costs priced it) for a
    batch bucket, under the decode config's constraints: block_size "auto" or a K (0 = trained), proposal_lengths
    "auto", () (the full set) or a set."""
    block = decode_cfg.block_size if decode_cfg.block_size == AUTO else decode_cfg.block_size or model_cfg.block_size
    batch, costs = tuning.profile(model_cfg.compute_dtype).costs_for(bucket)
    try:
        return step_choice.choose(tuning.histogram, costs, batch, block, decode_cfg.proposal_lengths)
    except ValueError as e:
        raise TuningError(f"{tuning.path} (batch {batch}): {e}") from None


def for_decode(decode_cfg: DecodeConfig, workdir: str | Path | None, step: int | None = None) -> DecodeTuning | None:
    """The tuning a Generator with `decode_cfg` needs: read from `workdir` when the config says auto (TuningError
    when it is missing or damaged; a warning when its acceptance was measured at another checkpoint `step`), None
    otherwise (the file is then not read at all)."""
    if not uses_auto(decode_cfg):
        return None
    if workdir is None:
        raise TuningError(f"decode.block_size=auto / decode.proposal_lengths=auto need a checkpoint's {FILE_NAME}; "
                          f"this model was not loaded from a workdir")
    tuning = read_tuning(workdir)
    if step is not None and step != tuning.checkpoint_step:
        warnings.warn(f"{tuning.path}: acceptance measured at checkpoint step {tuning.checkpoint_step}, decoding step "
                      f"{step}; rerun infer.tune if the drafts changed", stacklevel=2)
    return tuning


def expected_rate(tuning: DecodeTuning, model_cfg: ModelConfig, batch: int, block_size: int,
                  proposal_lengths: tuple[int, ...]) -> float | None:
    """Expected tokens/s of one configuration (block_size 1 with () = AR; () = the full set of block_size) at exactly
    a tuned batch size of this machine's (or the fallback) profile; None when that batch or step shape was not
    measured (no extrapolation)."""
    profile = tuning.profile(model_cfg.compute_dtype)
    if batch not in profile.costs:
        return None
    costs = profile.costs[batch]
    if not proposal_lengths and block_size == 1:
        return batch / costs.ar
    try:
        return step_choice.choose(tuning.histogram, costs, batch, block_size, proposal_lengths).best.tokens_per_second
    except ValueError:
        return None
