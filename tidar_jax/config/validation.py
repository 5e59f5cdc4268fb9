"""Every field and cross-field rule of a `Config`, raising `ConfigError` naming the field; the backend rules
(cuDNN's dtypes and head dims) that are checked where a model is about to be compiled."""

from __future__ import annotations

import dataclasses

from tidar_jax.config.schema import (ADAPTATIONS, AUTO, ATTENTION_IMPLS, AUTO_ATTENTION_IMPL, DRAFT_TARGETS, DTYPES,
                                     OBJECTIVES, REMAT_POLICIES, ROPE_SCALINGS, Config, ConfigError, ModelConfig)
from tidar_jax.layout import proposals


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
    _validate_positional(m)


def _validate_positional(m: ModelConfig) -> None:
    """The RoPE scaling, query scale and sliding window fields (see `ModelConfig`)."""
    _require(m.rope_scaling in ROPE_SCALINGS, f"model.rope_scaling must be one of {ROPE_SCALINGS}, got "
                                              f"{m.rope_scaling!r}")
    if m.rope_scaling == "yarn":
        _require(m.rope_factor > 0, f"model.rope_factor must be positive, got {m.rope_factor}")
        _require(m.rope_original_max_len > 0, "model.rope_scaling=yarn needs model.rope_original_max_len > 0 (the "
                                              f"pre-training context), got {m.rope_original_max_len}")
        _require(m.rope_beta_fast > 0 and m.rope_beta_slow > 0,
                 f"model.rope_beta_fast / rope_beta_slow must be positive, got {m.rope_beta_fast} / "
                 f"{m.rope_beta_slow}")
    _require(m.rope_attention_factor > 0,
             f"model.rope_attention_factor must be positive, got {m.rope_attention_factor}")
    _require(m.query_scale_beta >= 0, f"model.query_scale_beta must be >= 0 (0 = off), got {m.query_scale_beta}")
    _require(m.query_scale_beta == 0 or m.query_scale_len > 0,
             f"model.query_scale_beta > 0 needs model.query_scale_len > 0, got {m.query_scale_len}")
    _require(m.sliding_window >= 0, f"model.sliding_window must be >= 0 (0 = none), got {m.sliding_window}")


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
    _require(t.draft_targets in DRAFT_TARGETS,
             f"train.draft_targets must be one of {DRAFT_TARGETS}, got {t.draft_targets!r}")
    if t.draft_targets == "soft":
        _require(t.objective == "tidar", "train.draft_targets=soft distils the drafts: it needs train.objective=tidar")
        _require(t.loss_chunk_rows == 0, "train.draft_targets=soft needs the full AR distributions: set "
                                         "train.loss_chunk_rows=0")
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
    auto_k, auto_set = dec.block_size == AUTO, dec.proposal_lengths == AUTO
    _require(auto_k or (not isinstance(dec.block_size, str) and dec.block_size >= 0),
             f"decode.block_size must be >= 0 (0 = trained size) or {AUTO!r}, got {dec.block_size!r}")
    _require(auto_set or not isinstance(dec.proposal_lengths, str),
             f"decode.proposal_lengths must be a list of acceptance lengths or {AUTO!r}, got {dec.proposal_lengths!r}")
    # The auto choice may be a sparse set, which verifies with the AR logits alone.
    _require(not auto_set or dec.beta == 1.0,
             f"decode.proposal_lengths={AUTO} may choose a sparse set, which needs decode.beta=1, got {dec.beta}")
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
        k = m.block_size if auto_k else dec.block_size or m.block_size  # auto: some K' <= the trained K
        if not auto_set:
            proposals.check_beta(dec.beta, proposals.resolve_proposal_lengths(dec.proposal_lengths, k), k,
                                 "decode.beta")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg
