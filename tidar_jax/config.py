"""Frozen configuration dataclasses, YAML presets and dotted command-line overrides.

A run is described by one `Config` holding five sections. `load_config` merges, in order: the dataclass defaults,
a YAML preset, and `section.field=value` overrides (parsed by OmegaConf, which also rejects unknown keys and values
of the wrong type). `validate` then checks every cross-field rule and raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tidar_jax import proposals

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "xla_reference", "blockwise", "splash", "cudnn_hybrid")
# What model.attention_impl=auto runs on each backend (`jax.default_backend()`); any other backend runs "xla". GPUs
# get the portable blockwise path: cudnn_hybrid (explicit opt-in) has not run on a GPU yet, and it also needs bf16
# compute and cuDNN's head dims; switch this entry once scripts/gpu_bench.sh has measured it against blockwise.
# Resolved once, where the model graph is built (model.Transformer), so a config, a preset or a checkpoint keeps
# "auto" and runs the right kernel on whichever machine loads it.
AUTO_ATTENTION_IMPL = {"cpu": "blockwise", "gpu": "blockwise", "tpu": "splash"}
OBJECTIVES = ("tidar", "ar")
ADAPTATIONS = ("full", "adapters")
# model.remat_policy -> what a rematerialised layer keeps from its forward pass: "full" keeps only the layer's
# inputs (everything is recomputed in the backward pass); the others are `jax.checkpoint_policies` of that name.
REMAT_POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the offending field."""


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape (Qwen2 / Qwen3 / Llama family).

    `mask_token_id` is the vocabulary row used for diffusion mask tokens; `block_size` is the draft block size K the
    model was (or will be) trained with, stored here so that a checkpoint carries it to decoding. `eos_token_id`
    stops generation (an instruct model's end-of-turn token); documents in training data are separated by
    `data.separator_token_id`, which may differ. `adapter_rank` > 0 adds mask-gated low-rank adapters (adapters.py):
    they act only on mask-token rows, so the AR path computes exactly the base model.

    `remat` recomputes each layer's activations in the backward pass, keeping what `remat_policy` names.
    `attention_impl` "auto" (the default) runs `AUTO_ATTENTION_IMPL[backend]` (`resolve_attention_impl`); the
    others are explicit choices, never replaced (see ops/__init__.py for what each computes).
    `scan_layers` stores the layers' params stacked on a leading `layers` axis ([n_layers, ...]) and runs them with
    one `lax.scan` (one layer body to compile instead of n_layers); the KV cache is then stacked too
    ([n_layers, batch, max_len, kv_heads, head_dim]). Both layouts compute the same function and hold the same
    values for the same seed (layer_stacking.py converts between them).
    """

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    mask_token_id: int = 1
    eos_token_id: int = 0
    pad_token_id: int = 2
    block_size: int = 4
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    attention_impl: str = "auto"
    init_std: float = 0.02
    adapter_rank: int = 0
    adapter_alpha: float = 32.0


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is cut into examples of `seq_len` clean tokens.

    `separator_token_id` joins packed documents; -1 = resolved when a run starts (the tokenizer's `<|endoftext|>`
    if it has one, else model.eos_token_id). `tokenizer_sha256` is recorded by the run (leave it empty): a resumed
    run whose tokenizer.json changed is refused.
    """

    corpus: str = "bbc-news"
    paths: tuple[str, ...] = ()
    tokenizer: str = ""
    seq_len: int = 64
    global_batch_size: int = 8
    holdout_fraction: float = 0.02
    seed: int = 0
    worker_count: int = 0
    separator_token_id: int = -1
    tokenizer_sha256: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. `objective` is `tidar` (joint AR + diffusion loss) or `ar` (next-token only).

    `adaptation` is `full` (every parameter trains) or `adapters` (needs model.adapter_rank > 0 and the tidar
    objective: only the mask-gated adapters train, on the diffusion loss; the base model and so its AR output stay
    bit-identical). `init_from` is a checkpoint (e.g. an imported model) whose params, architecture, tokenizer and
    chat template a new run starts from.
    """

    objective: str = "tidar"
    alpha: float = 1.0
    steps: int = 100
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    init_from: str = ""
    adaptation: str = "full"
    loss_chunk_rows: int = 0  # > 0: CE from hidden states in chunks of this many rows (ops.row_ce); 0: dense
    allow_low_precision_params: bool = False  # train with model.param_dtype other than float32 (see validate_training)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; exactly one axis may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool = False


@dataclass(frozen=True)
class DecodeConfig:
    """Generation settings. `block_size` 0 means the model's trained block size. Shapes come from buckets, so that a
    new prompt length, batch size or max_new_tokens within a bucket reuses the compiled programs: prompts are padded
    to `prompt_buckets`, batches to `batch_buckets` (with inert rows; past the largest, to its next multiple), and
    the output buffer holds the smallest `max_new_tokens * 2^i` tokens that hold the requested max_new_tokens.
    `proposal_lengths`: the acceptance lengths whose proposal blocks a TiDAR step computes (a sparse set, e.g.
    [1, 2]: Q = K + |A|*K query tokens; must include 1; needs beta = 1); empty = all of 1..K (proposals.py).
    `scan_layers`: the layer layout decoding runs in, whatever `model.scan_layers` says (a Generator converts the
    params once): false (default) unrolls the layers, since a scanned step reads each layer's weights through a
    dynamic slice that XLA on CPU copies out on every step (SmolLM2-135M forwards 1.14-1.62x slower in float32,
    2.5-5x in bfloat16; docs/RESULTS.md section 5); true compiles the decode programs 4-7x faster (one-off short
    generations of deep models)."""

    block_size: int = 0
    beta: float = 1.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_cache_len: int = 512
    prompt_buckets: tuple[int, ...] = (16, 64, 256)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    proposal_lengths: tuple[int, ...] = ()
    scan_layers: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(m: ModelConfig) -> None:
    """Checks the model section alone (used when a checkpoint's model config is restored)."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "block_size"):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    _require(m.head_dim % 2 == 0, f"model.head_dim ({m.head_dim}) must be even for rotary embeddings")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(m, name)
        _require(0 <= value < m.vocab_size,
                 f"model.{name} ({value}) must be a token id inside the vocabulary [0, {m.vocab_size})")
    _require(m.mask_token_id != m.eos_token_id, "model.mask_token_id must differ from model.eos_token_id")
    _require(m.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}, got {m.param_dtype!r}")
    _require(m.compute_dtype in DTYPES, f"model.compute_dtype must be one of {DTYPES}, got {m.compute_dtype!r}")
    _require(m.attention_impl in ATTENTION_IMPLS,
             f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
    _require(m.remat_policy in REMAT_POLICIES,
             f"model.remat_policy must be one of {REMAT_POLICIES}, got {m.remat_policy!r}")
    _require(m.remat or m.remat_policy == "full",
             f"model.remat_policy={m.remat_policy} has no effect without model.remat=true")
    if m.attention_impl in CUDNN_IMPLS:
        validate_cudnn(m)
    _require(m.rope_theta > 0, f"model.rope_theta must be positive, got {m.rope_theta}")
    _require(m.rms_norm_eps > 0, f"model.rms_norm_eps must be positive, got {m.rms_norm_eps}")
    _require(m.adapter_rank >= 0, f"model.adapter_rank must be >= 0 (0 = no adapters), got {m.adapter_rank}")
    _require(m.adapter_alpha > 0, f"model.adapter_alpha must be positive, got {m.adapter_alpha}")


# cuDNN flash attention (jax/_src/cudnn/fused_attention_stablehlo.py, jax 0.10.2): query/key/value in float16 or
# bfloat16 (fp8 is not a compute dtype here); head dim a multiple of 8 and at most 256 on CUDA compute capability
# >= 9.0 (Hopper and later), at most 128 before (and on ROCm); q, k and v sharded alike (batch and heads only).
CUDNN_DTYPES = ("bfloat16", "float16")
# The attention impls that run cuDNN flash attention ("cudnn_hybrid": its causal clean half, ops/hybrid.py), each
# with the impl to name instead for float32 compute.
CUDNN_IMPLS = {"cudnn": "xla", "cudnn_hybrid": "blockwise"}
CUDNN_HEAD_DIM_MULTIPLE = 8
CUDNN_MAX_HEAD_DIM = {True: 256, False: 128}  # keyed by "compute capability >= 9.0"


def validate_cudnn(m: ModelConfig, tensor: int | None = None) -> None:
    """What `model.attention_impl=cudnn` (or cudnn_hybrid) needs of the config alone, on any machine (checked at
    load time, e.g. by train.plan on a CPU): a 16-bit compute dtype, a head dim cuDNN supports on some GPU, and,
    when the mesh's tensor-axis size is known (`tensor`), query and KV heads sharded alike: the rules table splits
    `heads` and `kv_heads` over `tensor` only when it divides them, and cuDNN's partitioner refuses q sharded while
    k/v are replicated (e.g. 12 query / 2 KV heads on tensor=4; ops/hybrid.py would replicate both instead)."""
    impl = m.attention_impl
    _require(m.compute_dtype in CUDNN_DTYPES,
             f"model.attention_impl={impl} needs model.compute_dtype in {CUDNN_DTYPES} (cuDNN flash attention has no "
             f"float32 kernel), got {m.compute_dtype!r}; use attention_impl={CUDNN_IMPLS[impl]} for float32")
    widest = CUDNN_MAX_HEAD_DIM[True]
    _require(m.head_dim % CUDNN_HEAD_DIM_MULTIPLE == 0 and m.head_dim <= widest,
             f"model.attention_impl={impl} needs model.head_dim to be a multiple of {CUDNN_HEAD_DIM_MULTIPLE} and at "
             f"most {widest} (at most {CUDNN_MAX_HEAD_DIM[False]} before Hopper), got {m.head_dim}")
    if tensor is not None and tensor > 1:
        _require((m.n_heads % tensor == 0) == (m.n_kv_heads % tensor == 0),
                 f"model.attention_impl={impl} needs query and KV heads sharded alike over the mesh's tensor axis "
                 f"({tensor}): model.n_heads ({m.n_heads}) and model.n_kv_heads ({m.n_kv_heads}) must both be "
                 "multiples of it (or both not, which replicates attention); change mesh.tensor or use "
                 f"attention_impl={CUDNN_IMPLS[impl]}")


def resolve_attention_impl(m: ModelConfig, backend: str) -> ModelConfig:
    """`m` with attention_impl "auto" replaced by the concrete implementation for `backend` (`jax.default_backend()`
    names: "cpu", "gpu", "tpu"; any other backend gets "xla", which runs everywhere); an explicit choice comes back
    unchanged. Never raises."""
    if m.attention_impl != "auto":
        return m
    return dataclasses.replace(m, attention_impl=AUTO_ATTENTION_IMPL.get(backend, "xla"))


def validate_backend(m: ModelConfig, backend: str, tensor: int, compute_capability: str | None = None) -> None:
    """Checks that the run's backend can execute `m`, where the model is about to be compiled for it (the
    Trainer, the decoding Generator), not at config load: a config is often loaded on another machine than the
    one it runs on. backend: `jax.default_backend()` ("cpu", "gpu", "tpu"); tensor: the mesh's tensor-axis size;
    compute_capability: the first GPU's CUDA compute capability (e.g. "9.0"), None elsewhere (ROCm included).
    attention_impl=auto is checked as what it resolves to on `backend`."""
    m = resolve_attention_impl(m, backend)
    if m.attention_impl not in CUDNN_IMPLS:
        return
    _require(backend == "gpu", f"model.attention_impl={m.attention_impl} needs a GPU backend (cuDNN), but this run's "
                               f"backend is {backend!r}; use attention_impl={CUDNN_IMPLS[m.attention_impl]}")
    validate_cudnn(m, tensor)
    hopper = compute_capability is not None and tuple(map(int, compute_capability.split("."))) >= (9, 0)
    limit = CUDNN_MAX_HEAD_DIM[hopper]
    _require(m.head_dim <= limit,
             f"model.attention_impl={m.attention_impl} on this GPU (compute capability {compute_capability}) supports "
             f"model.head_dim <= {limit}, got {m.head_dim}")


def validate_training(cfg: Config) -> Config:
    """Rules that hold for training only (an inference checkpoint may well hold bfloat16 params): params other
    than float32 need `train.allow_low_precision_params=true`, since the AdamW moments and updates take the
    params' dtype. bfloat16 keeps 8 significant bits, so an update below ~1/256 of a weight (lr 1e-5 on O(1e-2)
    weights) rounds to nothing and training silently stalls; float32 params with compute_dtype=bfloat16 avoid
    that. Returns `cfg`."""
    m = cfg.model
    _require(m.param_dtype == "float32" or cfg.train.allow_low_precision_params,
             f"model.param_dtype={m.param_dtype} for training keeps the AdamW moments and updates in {m.param_dtype}, "
             "where an update below ~1/256 of a weight (e.g. lr 1e-5) rounds away; train float32 params with "
             "model.compute_dtype=bfloat16, or set train.allow_low_precision_params=true to accept it")
    return cfg


def validate(cfg: Config) -> Config:
    """Checks every field and cross-field rule; returns `cfg` unchanged or raises `ConfigError`."""
    m, d, t, mesh, dec = cfg.model, cfg.data, cfg.train, cfg.mesh, cfg.decode
    validate_model(m)
    _require(d.seq_len > 1, f"data.seq_len must be > 1, got {d.seq_len}")
    _require(d.seq_len % m.block_size == 0,
             f"data.seq_len ({d.seq_len}) must be a multiple of model.block_size ({m.block_size})")
    _require(d.global_batch_size > 0, f"data.global_batch_size must be positive, got {d.global_batch_size}")
    _require(0.0 < d.holdout_fraction < 1.0, f"data.holdout_fraction must be in (0, 1), got {d.holdout_fraction}")
    _require(d.worker_count >= 0, f"data.worker_count must be >= 0, got {d.worker_count}")
    _require(t.objective in OBJECTIVES, f"train.objective must be one of {OBJECTIVES}, got {t.objective!r}")
    _require(t.adaptation in ADAPTATIONS, f"train.adaptation must be one of {ADAPTATIONS}, got {t.adaptation!r}")
    if t.adaptation == "adapters":
        _require(m.adapter_rank > 0, "train.adaptation=adapters needs model.adapter_rank > 0")
        _require(t.objective == "tidar", "train.adaptation=adapters trains the diffusion drafts: it needs "
                                         "train.objective=tidar")
    _require(d.separator_token_id == -1 or 0 <= d.separator_token_id < m.vocab_size,
             f"data.separator_token_id ({d.separator_token_id}) must be -1 (resolved from the tokenizer) or a token "
             f"id inside the vocabulary [0, {m.vocab_size})")
    _require(t.loss_chunk_rows >= 0, f"train.loss_chunk_rows must be >= 0, got {t.loss_chunk_rows}")
    _require(t.alpha >= 0, f"train.alpha must be >= 0, got {t.alpha}")
    _require(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    _require(t.learning_rate > 0, f"train.learning_rate must be positive, got {t.learning_rate}")
    _require(0 <= t.warmup_steps <= t.steps,
             f"train.warmup_steps ({t.warmup_steps}) must be in [0, train.steps ({t.steps})]")
    _require(0.0 <= t.min_learning_rate_ratio <= 1.0,
             f"train.min_learning_rate_ratio must be in [0, 1], got {t.min_learning_rate_ratio}")
    _require(t.grad_accum_steps > 0, f"train.grad_accum_steps must be positive, got {t.grad_accum_steps}")
    _require(d.global_batch_size % t.grad_accum_steps == 0,
             f"data.global_batch_size ({d.global_batch_size}) must be a multiple of "
             f"train.grad_accum_steps ({t.grad_accum_steps})")
    _require(t.grad_clip_norm >= 0, f"train.grad_clip_norm must be >= 0, got {t.grad_clip_norm}")
    for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
        _require(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    _require(sum(v == -1 for v in sizes.values()) <= 1, f"at most one mesh axis may be -1, got {sizes}")
    for name, value in sizes.items():
        _require(value == -1 or value > 0, f"mesh.{name} must be positive or -1, got {value}")
    if m.attention_impl in CUDNN_IMPLS and mesh.tensor != -1:  # -1 is resolved with the devices (validate_backend)
        validate_cudnn(m, mesh.tensor)
    _require(dec.block_size >= 0, f"decode.block_size must be >= 0 (0 = trained size), got {dec.block_size}")
    _require(0.0 <= dec.beta <= 1.0, f"decode.beta must be in [0, 1], got {dec.beta}")
    _require(dec.temperature >= 0, f"decode.temperature must be >= 0, got {dec.temperature}")
    _require(dec.top_k >= 0, f"decode.top_k must be >= 0 (0 = off), got {dec.top_k}")
    _require(0.0 < dec.top_p <= 1.0, f"decode.top_p must be in (0, 1], got {dec.top_p}")
    _require(dec.max_new_tokens > 0, f"decode.max_new_tokens must be positive, got {dec.max_new_tokens}")
    for name in ("prompt_buckets", "batch_buckets"):
        buckets = list(getattr(dec, name))
        _require(len(buckets) > 0 and buckets == sorted(set(buckets)),
                 f"decode.{name} must be a non-empty strictly increasing list, got {buckets}")
        _require(buckets[0] > 0, f"decode.{name} must be positive, got {buckets}")
    _require(dec.max_cache_len > dec.prompt_buckets[-1],
             f"decode.max_cache_len ({dec.max_cache_len}) must exceed the largest prompt bucket "
             f"({dec.prompt_buckets[-1]})")
    try:
        k = dec.block_size or m.block_size
        proposals.check_beta(dec.beta, proposals.resolve_proposal_lengths(dec.proposal_lengths, k), k,
                             "decode.beta")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


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
