"""`Generator`: TiDAR / AR generation compiled once per shape bucket, with per-call sampling knobs and streaming.

Shapes come from buckets (buckets.py), so a new prompt length, batch size or max_new_tokens within a bucket does
not recompile: prompts are padded (left-aligned) to the smallest `decode.prompt_buckets` entry that holds the
longest one; the batch is padded to the smallest `decode.batch_buckets` entry (past the largest: its next multiple;
on a mesh: rounded up to a multiple of the data shards) with inert rows, which finish at prefill and are dropped
from every result; the output buffer holds the smallest `decode.max_new_tokens * 2^i` tokens that hold the
requested max_new_tokens, which stays an exact per-row limit (a traced [batch] array). Compiled programs are kept
per (model graph, function, DecodeSpec, mesh, argument shapes and shardings): the prefill per (prompt bucket, batch
bucket, mode, greedy, capacity), the decode loop per (batch bucket, mode, greedy, capacity), independent of the
prompt bucket because the KV cache has a fixed length. They live in a bounded LRU `ProgramCache`
(program_cache.py; module-wide `PROGRAMS` by default), so Generators over models of one architecture share
programs. beta / temperature / top-k / top-p / seed are traced.
`TRACE_COUNTS` counts traces per function name and `PROGRAMS.misses` compilations, for tests.

Sharded decoding: with `mesh`, params are placed by the rules table (heads, kv_heads, mlp, vocab over `tensor`),
the batch rows over `data` and the KV cache over batch and kv_heads (`sharding.decode_shardings`), and every
program's outputs are pinned to those shardings; mesh programs are traced without the CPU kernels
(`ops.cpu_kernels.suspended`). Without a mesh everything stays where the params are: one device for params from
`checkpoint.load_for_inference(path)`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tidar_jax.config import DecodeConfig, ModelConfig
from tidar_jax.decoding import decode, step_choice
from tidar_jax.decoding import tuning as tuning_lib
from tidar_jax.decoding.buckets import bucket_for, length_buckets
from tidar_jax.decoding.decode import DecodeState
from tidar_jax.decoding.program_cache import ProgramCache
from tidar_jax.decoding.sampling import SamplingParams, checked_knobs
from tidar_jax.decoding.spec import DecodeSpec, resolve_block_size
from tidar_jax.model.init import abstract_model
from tidar_jax.model.kv_cache import KVCache, init_cache
from tidar_jax.model.layer_stacking import to_layout
from tidar_jax.model.precision import inference_params
from tidar_jax.ops import cpu_kernels, kernel_choice
from tidar_jax.sharding import batch_shards, check_runtime, decode_shardings, named_sharding, place_params

TokenCallback = Callable[[list[list[int]]], None]


def _tensor_axis_size(params) -> int:
    """The tensor-axis size of the mesh the params live on (1 when they are not on a named mesh)."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None) if jax.tree.leaves(params) else None
    mesh = getattr(sharding, "mesh", None)
    return dict(mesh.shape).get("tensor", 1) if mesh is not None else 1


def in_decoding_layout(graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig,
                       scan_layers: bool) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
    """(graphdef, params, model config) of the model with its layers in the layout decoding runs in
    (`decode.scan_layers`): the inputs themselves when they already are, else the params converted once
    (layer_stacking.to_layout: the same values) with that layout's graphdef and `model.scan_layers`."""
    if model_cfg.scan_layers == scan_layers:
        return graphdef, params, model_cfg
    cfg = dataclasses.replace(model_cfg, scan_layers=scan_layers)
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, to_layout(nnx.to_pure_dict(params), scan_layers))
    return graphdef, state, cfg


TRACE_COUNTS: collections.Counter[str] = collections.Counter()
PROGRAMS = ProgramCache()  # the module-wide program cache; resize with `PROGRAMS.max_programs = n`


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Prompts in bucket shapes (B = batch bucket, P = prompt bucket). prompts: [B, P] int32, left-aligned, pad
    token after each row's end; lengths: [B] int32 (1 for inert rows); limits: [B] int32 max_new_tokens per row (0
    for inert rows, so they finish at prefill); rows: the number of real rows (the first `rows` of B)."""

    prompts: np.ndarray
    lengths: np.ndarray
    limits: np.ndarray
    rows: int


@dataclasses.dataclass
class GenerationResult:
    """tokens: new tokens per row (an EOS that ended a row is kept); forwards: batch forwards, prefill included;
    tokens_per_forward: new tokens / forwards summed over rows (each row counts the forwards it was active for, so
    AR gives exactly 1.0); acceptance_histogram[a]: decode steps (per row) that accepted a tokens, index 0 unused;
    wall_time_s: prefill + decoding, compilation excluded; finish_reasons: per row "eos" | "length" | "cache";
    block_size: K (1 for AR); compile_time_s: compilation this call triggered (0 once warm); proposal_lengths: the
    proposal set A a TiDAR step computed (() for AR)."""

    tokens: list[list[int]]
    forwards: int
    tokens_per_forward: float
    acceptance_histogram: list[int]
    wall_time_s: float
    tokens_per_second: float
    finish_reasons: list[str]
    mode: str
    block_size: int
    compile_time_s: float
    proposal_lengths: tuple[int, ...] = ()


class Generator:
    """Holds the split model and its compiled decode programs.

    graphdef, params: from `nnx.split(model)`; model_cfg: the model's config (vocab, special ids, trained block
    size); decode_cfg: defaults for every knob plus the prompt and batch buckets, cache length, the smallest
    output capacity (`max_new_tokens`) and the layer layout (`scan_layers`: params in the other layout are
    converted once, so `self.model_cfg.scan_layers` may differ from model_cfg's); mesh: decode sharded on it
    (params are placed there by the rules table), or None: run where the params are (inputs follow them);
    programs: the compiled-program cache (default the module-wide `PROGRAMS`); tokenizer_size: the tokenizer's
    number of ids (`Tokenizer.vocab_size`) when the embedding has rows past it (an import padded to a multiple of
    64: SmolLM2's 49154 ids in 49216 rows), None when every row is a token.

    Non-tokens: ids >= tokenizer_size, the mask id and the pad id (unless it is also the EOS id, as in imports
    without a pad token). Prompts may not contain ids >= tokenizer_size or the mask; sampled decoding gives every
    non-token probability 0 at any accepted knobs (`sampling.non_tokens`). Greedy decoding takes the argmax of
    decode.py's logits, in which only the mask is suppressed so far: a model whose pad or padding rows out-score
    every token would emit them (an import's padding rows start at the mean embedding, whose logit is the mean
    logit, so they never do).

    tuning: the checkpoint's decode tuning (tuning.read_tuning / tuning.for_decode), needed when decode_cfg's
    block_size or proposal_lengths is "auto": each batch bucket then decodes TiDAR with the K' and proposal set
    step_choice picks from it (`step_shape`), resolved before that bucket's programs are built; `block_size` is
    then the trained K, the largest block any step holds. An auto K' < the trained K needs no
    allow_block_size_mismatch: it was chosen from measurements.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig, decode_cfg: DecodeConfig,
                 *, allow_block_size_mismatch: bool = False, mesh: Mesh | None = None,
                 programs: ProgramCache | None = None, tokenizer_size: int | None = None,
                 tuning: tuning_lib.DecodeTuning | None = None):
        graphdef, params, model_cfg = in_decoding_layout(graphdef, params, model_cfg, decode_cfg.scan_layers)
        self.graphdef, self.mesh = graphdef, mesh
        params = inference_params(params, model_cfg)
        self.params = params if mesh is None else place_params(params, mesh)
        self.model_cfg, self.decode_cfg = model_cfg, decode_cfg
        self.block_size = resolve_block_size(model_cfg, decode_cfg, allow_block_size_mismatch)
        self.programs = PROGRAMS if programs is None else programs
        check_runtime(model_cfg, mesh.shape["tensor"] if mesh is not None else _tensor_axis_size(params))
        if tokenizer_size is not None and not 0 < tokenizer_size <= model_cfg.vocab_size:
            raise ValueError(f"tokenizer_size must be in [1, model.vocab_size={model_cfg.vocab_size}], got "
                             f"{tokenizer_size}")
        self.token_limit = model_cfg.vocab_size if tokenizer_size is None else tokenizer_size
        # The pad id of an import without a pad token is its EOS id, which must stay possible (the mask never is).
        self.reserved_ids = tuple(sorted({model_cfg.mask_token_id, model_cfg.pad_token_id} - {model_cfg.eos_token_id}))
        self._compile_time = 0.0
        self.tuning, self._choices = tuning, {}
        if tuning_lib.uses_auto(decode_cfg):
            if tuning is None:
                raise tuning_lib.TuningError(f"decode.block_size=auto / decode.proposal_lengths=auto need the "
                                             f"checkpoint's {tuning_lib.FILE_NAME}: pass tuning= (Python: "
                                             f"tuning.read_tuning(WORKDIR)); {tuning_lib.HOW_TO_TUNE} writes it")
            tuning_lib.check_model(tuning, model_cfg)

    def auto_choice(self, bucket: int) -> step_choice.Choice | None:
        """What auto chose for a batch bucket (best option, AR, the table), None without auto; resolved once."""
        if not tuning_lib.uses_auto(self.decode_cfg):
            return None
        if bucket not in self._choices:
            self._choices[bucket] = tuning_lib.resolve(self.tuning, self.model_cfg, self.decode_cfg, bucket)
        return self._choices[bucket]

    def step_shape(self, rows: int) -> tuple[int, tuple[int, ...]]:
        """(K, proposal set; () = the full set) a TiDAR decode of `rows` prompts runs with: the configured ones, or
        with auto the choice for their batch bucket."""
        choice = self.auto_choice(self.batch_bucket(rows))
        if choice is None:
            return self.block_size, tuple(self.decode_cfg.proposal_lengths)
        return choice.best.block_size, choice.best.proposal_lengths

    # ----- input checks -------------------------------------------------------------------------------------------

    def _check_prompts(self, prompts: Sequence[Sequence[int]], num_drafts: int) -> list[list[int]]:
        cfg, dec = self.model_cfg, self.decode_cfg
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass a list of token-id lists, one per batch row")
        rows = [[int(t) for t in p] for p in prompts]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
            if len(row) > dec.prompt_buckets[-1]:
                raise ValueError(f"prompt {i} has {len(row)} tokens, more than the largest prompt bucket "
                                 f"({dec.prompt_buckets[-1]}); raise decode.prompt_buckets")
            if len(row) + num_drafts > dec.max_cache_len:
                raise ValueError(f"prompt {i} ({len(row)} tokens) leaves no room in the KV cache for a block of "
                                 f"{num_drafts} (decode.max_cache_len={dec.max_cache_len})")
            bad = [t for t in row if not 0 <= t < self.token_limit]
            if bad:
                what = "vocabulary" if self.token_limit == cfg.vocab_size else "tokenizer's ids"
                raise ValueError(f"prompt {i} has token ids outside the {what} [0, {self.token_limit}): {bad[:5]}")
            if cfg.mask_token_id in row:
                raise ValueError(f"prompt {i} contains the mask token id {cfg.mask_token_id}, which is reserved for "
                                 "diffusion drafting")
            if cfg.pad_token_id != cfg.eos_token_id and cfg.pad_token_id in row:
                raise ValueError(f"prompt {i} contains the pad id {cfg.pad_token_id}, which is not a token of text "
                                 "(the batch is padded for you)")
        return rows

    def batch_bucket(self, rows: int) -> int:
        """Rows of the padded batch for `rows` prompts: the decode.batch_buckets entry that holds them (past the
        largest, its next multiple), rounded up to a multiple of the mesh's batch shards (so the rows split evenly
        over `data`)."""
        buckets = self.decode_cfg.batch_buckets
        bucket = bucket_for(rows, buckets) if rows <= buckets[-1] else _round_up(rows, buckets[-1])
        return _round_up(bucket, 1 if self.mesh is None else batch_shards(self.mesh))

    def capacity(self, max_new_tokens: int) -> int:
        """Output-buffer length for `max_new_tokens`: the smallest decode.max_new_tokens * 2^i that holds it."""
        return length_buckets(max_new_tokens, smallest=self.decode_cfg.max_new_tokens)[-1]

    def pad_batch(self, prompts: Sequence[Sequence[int]], num_drafts: int, max_new_tokens: int) -> PaddedBatch:
        """Checks the prompts and pads them to the prompt and batch buckets (see `PaddedBatch`)."""
        rows = self._check_prompts(prompts, num_drafts)
        batch = self.batch_bucket(len(rows))
        bucket = bucket_for(max(len(r) for r in rows), self.decode_cfg.prompt_buckets)
        padded = np.full((batch, bucket), self.model_cfg.pad_token_id, np.int32)
        for i, row in enumerate(rows):
            padded[i, :len(row)] = row
        lengths = np.ones((batch,), np.int32)
        lengths[:len(rows)] = [len(r) for r in rows]
        limits = np.zeros((batch,), np.int32)
        limits[:len(rows)] = max_new_tokens
        return PaddedBatch(prompts=padded, lengths=lengths, limits=limits, rows=len(rows))

    def _sampling_params(self, beta, temperature, top_k, top_p) -> tuple[SamplingParams, bool]:
        """The per-call knobs (None = the DecodeConfig's), checked (`SamplingParams.create`: ValueError naming a
        bad one), with this model's non-tokens; plus whether decoding is greedy."""
        dec = self.decode_cfg
        knobs = checked_knobs(dec.beta if beta is None else beta,
                              dec.temperature if temperature is None else temperature,
                              dec.top_k if top_k is None else top_k, dec.top_p if top_p is None else top_p)
        sp = SamplingParams.create(*knobs, token_limit=self.token_limit, reserved=self.reserved_ids)
        return sp, bool(np.float32(knobs[1]) == 0)  # as the device holds it: 1e-50 is float32 0, greedy

    # ----- compiled programs --------------------------------------------------------------------------------------

    def place(self, tree: Any, logical: tuple[str | None, ...] | None = None) -> Any:
        """`tree` on the mesh (unchanged without one): an array with dims named `logical`, or (logical None) a
        decoding pytree in `sharding.decode_shardings`."""
        if self.mesh is None:
            return tree
        if logical is None:
            return jax.device_put(tree, decode_shardings(tree, self.mesh))
        return jax.device_put(tree, named_sharding(logical, np.shape(tree), self.mesh))

    def _run_compiled(self, name: str, fn: Callable, spec: DecodeSpec, donate: int | tuple[int, ...], *args):
        """Calls `fn(graphdef, *args, spec=spec)` through an executable compiled once per signature (the argument
        shardings are part of it: params placed differently compile anew), kept in `self.programs`."""
        leaves, treedef = jax.tree.flatten(args)
        # The CPU kernels are read when a program is traced ($TIDAR_JAX_CPU_KERNELS: a toggle compiles anew) and kept
        # out of mesh programs (cpu_kernels.suspended: the partitioner would gather their operands).
        kernels = cpu_kernels.enabled() and self.mesh is None
        kernel_mode = kernel_choice.mode() if kernels else "off"  # auto and on trace different programs
        signature = (self.graphdef, name, spec, self.mesh, kernel_mode, treedef,
                     tuple((leaf.shape, str(leaf.dtype), getattr(leaf, "sharding", None)) for leaf in leaves))

        def build():
            start = time.perf_counter()
            graphdef, mesh = self.graphdef, self.mesh

            def traced(*a):
                TRACE_COUNTS[name] += 1
                out = fn(graphdef, *a, spec=spec)
                # Pin the loop state's layout (rows over data, cache over kv_heads) rather than leave it to
                # propagation, so every program of a mesh hands the next one the same shardings.
                return out if mesh is None else jax.lax.with_sharding_constraint(out, decode_shardings(out, mesh))

            with contextlib.nullcontext() if kernels else cpu_kernels.suspended():
                executable = jax.jit(traced, donate_argnums=donate).lower(*args).compile()
            self._compile_time += time.perf_counter() - start
            return executable

        return self.programs.get(signature, build)(*args)

    def prefill(self, prompts: Sequence[Sequence[int]], mode: str = "tidar", max_new_tokens: int | None = None,
                seed: int = 0, *, beta: float | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None,
                cache: KVCache | None = None) -> tuple[DecodeState, DecodeSpec, SamplingParams]:
        """Validates inputs, pads prompts to their prompt and batch buckets and runs the compiled prefill.

        Returns (state, spec, sampling params) for `advance`; the state has `batch_bucket(len(prompts))` rows, the
        real ones first. `cache` (optional, donated) must be an empty [that batch, decode.max_cache_len, ...] cache;
        by default a zeroed one is allocated.
        """
        dec = self.decode_cfg
        sp, greedy = self._sampling_params(beta, temperature, top_k, top_p)
        limit = dec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        k, lengths = self.step_shape(len(prompts)) if mode == "tidar" else (self.block_size, ())
        spec = DecodeSpec.create(mode, k, greedy, self.capacity(limit), self.model_cfg, proposal_lengths=lengths,
                                 token_limit=self.token_limit, reserved=self.reserved_ids)
        spec.check_beta(float(sp.beta))
        batch = self.pad_batch(prompts, spec.num_drafts, limit)
        rows = len(batch.lengths)
        if cache is None:
            cache = init_cache(self.model_cfg, rows, dec.max_cache_len)
        elif (cache.batch_size, cache.max_len) != (rows, dec.max_cache_len):
            raise ValueError(f"cache has batch {cache.batch_size} and {cache.max_len} slots; expected batch "
                             f"{rows} (the batch bucket of {batch.rows} prompts) and "
                             f"decode.max_cache_len={dec.max_cache_len}")
        state = self._run_compiled("prefill", decode.prefill, spec.for_prefill(), 1, self.params, self.place(cache),
                                   self.place(batch.prompts, ("batch", None)), self.place(batch.lengths, ("batch",)),
                                   self.place(batch.limits, ("batch",)), self.place(prng_key(seed)),
                                   self.place(sp))
        return state, spec, sp

    def advance(self, state: DecodeState, spec: DecodeSpec, sp: SamplingParams,
                max_forwards: int | None = None) -> DecodeState:
        """Runs the compiled decode loop (donating `state`) until every row finished or `state.forwards` reaches
        max_forwards (default: no limit)."""
        bound = spec.capacity + 1 if max_forwards is None else max_forwards  # every forward emits >= 1 token/row
        return self._run_compiled("decode_loop", decode.decode_loop, spec, 1, self.params, state, self.place(sp),
                                  self.place(np.int32(bound)))

    # ----- the public entry point ---------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], mode: str = "tidar", max_new_tokens: int | None = None,
                 seed: int = 0, *, beta: float | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, on_tokens: TokenCallback | None = None,
                 chunk_forwards: int = 8) -> GenerationResult:
        """Generates up to max_new_tokens (default decode.max_new_tokens) per prompt.

        prompts: token-id lists (ragged lengths allowed); mode: "tidar" or "ar"; knobs default to the DecodeConfig;
        temperature 0 = greedy. With `on_tokens`, decoding runs in chunks of `chunk_forwards` forwards (the same
        compiled loop) and `on_tokens(new_tokens_per_row)` is called after the prefill and after every chunk.
        """
        if chunk_forwards < 1:
            raise ValueError(f"chunk_forwards must be >= 1, got {chunk_forwards}")
        compile_before = self._compile_time
        start = time.perf_counter()
        state, spec, sp = self.prefill(prompts, mode, max_new_tokens, seed, beta=beta, temperature=temperature,
                                       top_k=top_k, top_p=top_p)
        if on_tokens is None:
            state = self.advance(state, spec, sp)
        else:
            seen = np.zeros(len(prompts), np.int64)
            bound = 1  # the prefill's forward; kept on the host so each chunk costs one device-to-host copy
            while True:
                tokens, counts, finish = jax.device_get((state.tokens, state.num_tokens, state.finish))
                counts = counts[:len(seen)]  # the real rows; inert ones finished at prefill
                on_tokens([tokens[i, seen[i]:counts[i]].tolist() for i in range(len(seen))])
                seen = counts
                if np.all(finish != decode.RUNNING):
                    break
                bound += chunk_forwards
                state = self.advance(state, spec, sp, bound)
        host = jax.device_get(state.replace(cache=None, draft_probs=None, key=None))
        compile_time = self._compile_time - compile_before
        wall = time.perf_counter() - start - compile_time
        return GenerationResult(**summary(host, len(prompts), wall), mode=mode, block_size=spec.num_drafts,
                                proposal_lengths=spec.lengths,
                                compile_time_s=compile_time)


def prng_key(seed) -> jax.Array:
    """The PRNG key of an integer seed in [0, 2**32), the seeds that give distinct keys (JAX keeps 32 bits of a seed:
    2**32 would be the key of 0); ValueError otherwise, as the CLIs' --seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return jax.random.key(int(seed))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def summary(host: DecodeState, rows: int, wall: float) -> dict:
    """The GenerationResult fields read from a finished (host) state: only its first `rows` rows are real; inert
    padding rows were never active, so the batch counters (forwards, acceptance histogram) exclude them already."""
    counts = host.num_tokens[:rows]
    total = int(counts.sum())
    return dict(tokens=[host.tokens[i, :counts[i]].tolist() for i in range(rows)], forwards=int(host.forwards),
                tokens_per_forward=total / max(int(host.row_forwards[:rows].sum()), 1),
                acceptance_histogram=host.accept_hist.tolist(), wall_time_s=wall,
                tokens_per_second=total / wall if wall > 0 else float("inf"),
                finish_reasons=[decode.FINISH_NAMES[int(f)] for f in host.finish[:rows]])
