"""The configuration's frozen dataclasses (one per section) and the value sets their fields take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
DRAFT_TARGETS = ("hard", "soft")
# model.remat_policy -> what a rematerialised layer keeps from its forward pass: "full" keeps only the layer's
# inputs (everything is recomputed in the backward pass); the others are `jax.checkpoint_policies` of that name.
REMAT_POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")


# Model fields that a model's weights and tokenizer fix: a run from `train.init_from` may only restate them, and an
# adapter pack records them to refuse a base it was not trained on.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "rope_theta",
                       "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings", "mask_token_id", "eos_token_id",
                       "pad_token_id", "rope_scaling", "rope_factor", "rope_original_max_len", "rope_beta_fast",
                       "rope_beta_slow", "rope_truncate", "rope_attention_factor", "query_scale_beta",
                       "query_scale_len", "sliding_window")
ROPE_SCALINGS = ("none", "yarn")


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
    Ministral-3 / Nemotron-Labs-Diffusion features (the defaults switch each off and compute exactly what they
    did before; model/rope.py, layout/window.py): `rope_scaling` "yarn" blends interpolated (inv_freq /
    `rope_factor`) and original frequencies over the ramp `rope_beta_fast` .. `rope_beta_slow` of
    `rope_original_max_len` (transformers' `_compute_yarn_parameters`, `rope_truncate` its `truncate`) and scales
    cos / sin by `rope_attention_factor`; `query_scale_beta` > 0 multiplies the roped queries at position p by
    `1 + beta * log(1 + floor(p / query_scale_len))` (Ministral-3's `llama_4_scaling_beta`); `sliding_window` > 0
    lets a query at position p see only keys at positions > p - sliding_window (0 = no window).

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
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_max_len: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0
    query_scale_beta: float = 0.0
    query_scale_len: int = 0
    sliding_window: int = 0


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
    bit-identical). `draft_targets` is what the mask rows learn: `hard` (the data's tokens) or `soft` (the model's
    own next-token distribution at that position, from the AR logits of the same step's clean rows: distillation
    from the verifier itself, so corpus text needs no generated answers). `init_from` is a checkpoint (e.g. an
    imported model) whose params, architecture, tokenizer and chat template a new run starts from.
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
    draft_targets: str = "hard"
    loss_chunk_rows: int = 0  # > 0: CE from hidden states in chunks of this many rows (ops.row_ce); 0: dense
    allow_low_precision_params: bool = False  # train with model.param_dtype other than float32 (see validate_training)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; exactly one axis may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool = False


# decode.block_size / decode.proposal_lengths value: chosen per batch bucket from measurements (decoding/tuning.py).
AUTO = "auto"


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
    generations of deep models). `block_size` and `proposal_lengths` may be "auto": chosen per batch bucket from the
    checkpoint's measured acceptance and step costs (WORKDIR/decode_tuning.json from `python -m infer.tune`;
    decoding/step_choice.py, decoding/tuning.py)."""

    block_size: int | str = 0  # or "auto"
    beta: float = 1.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_cache_len: int = 512
    prompt_buckets: tuple[int, ...] = (16, 64, 256)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    proposal_lengths: tuple[int, ...] | str = ()  # or "auto"
    scan_layers: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
