"""`Generator`: TiDAR / AR generation compiled once per shape, with per-call sampling knobs and streaming.

Prompts are padded (left-aligned) to the smallest `decode.prompt_buckets` entry that holds the longest one, so a new
prompt length does not recompile. Compiled programs are cached per (model graph, function, DecodeSpec, argument
shapes): the prefill per (bucket, batch, mode, greedy, capacity), the decode loop per (batch, mode, greedy,
capacity), the loop being independent of the bucket because the KV cache has a fixed length. This program cache is
module-wide, so Generators over models of one architecture (other weights, other block size) share programs.
beta / temperature / top-k / top-p / seed / max_new_tokens (up to the capacity) are traced values.
`TRACE_COUNTS` counts traces (= compilations) per function name, for tests.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from tidar_jax import decode
from tidar_jax.config import DecodeConfig, ModelConfig
from tidar_jax.decode import DecodeSpec, DecodeState
from tidar_jax.kv_cache import KVCache, init_cache
from tidar_jax.sampling import SamplingParams
from tidar_jax.sharding import check_runtime

TokenCallback = Callable[[list[list[int]]], None]


def _tensor_axis_size(params) -> int:
    """The tensor-axis size of the mesh the params live on (1 when they are not on a named mesh)."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None) if jax.tree.leaves(params) else None
    mesh = getattr(sharding, "mesh", None)
    return dict(mesh.shape).get("tensor", 1) if mesh is not None else 1

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
_PROGRAMS: dict = {}  # signature -> compiled executable


@dataclasses.dataclass
class GenerationResult:
    """tokens: new tokens per row (an EOS that ended a row is kept); forwards: batch forwards, prefill included;
    tokens_per_forward: new tokens / forwards summed over rows (each row counts the forwards it was active for, so
    AR gives exactly 1.0); acceptance_histogram[a]: decode steps (per row) that accepted a tokens, index 0 unused;
    wall_time_s: prefill + decoding, compilation excluded; finish_reasons: per row "eos" | "length" | "cache";
    block_size: K (1 for AR); compile_time_s: compilation this call triggered (0 once warm)."""

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


class Generator:
    """Holds the split model and its compiled decode programs.

    graphdef, params: from `nnx.split(model)` (params may be sharded; inputs follow them); model_cfg: the model's
    config (vocab, special ids, trained block size); decode_cfg: defaults for every knob plus the prompt buckets,
    cache length and output capacity (`max_new_tokens`).
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig, decode_cfg: DecodeConfig,
                 *, allow_block_size_mismatch: bool = False):
        self.graphdef, self.params = graphdef, params
        self.model_cfg, self.decode_cfg = model_cfg, decode_cfg
        self.block_size = decode.resolve_block_size(model_cfg, decode_cfg, allow_block_size_mismatch)
        check_runtime(model_cfg, _tensor_axis_size(params))
        self._compile_time = 0.0

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
            bad = [t for t in row if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
            if cfg.mask_token_id in row:
                raise ValueError(f"prompt {i} contains the mask token id {cfg.mask_token_id}, which is reserved for "
                                 "diffusion drafting")
        return rows

    def _sampling_params(self, beta, temperature, top_k, top_p) -> tuple[SamplingParams, bool]:
        """The per-call knobs (None = the DecodeConfig's), checked; plus whether decoding is greedy."""
        dec = self.decode_cfg
        beta = dec.beta if beta is None else float(beta)
        temperature = dec.temperature if temperature is None else float(temperature)
        top_k = dec.top_k if top_k is None else int(top_k)
        top_p = dec.top_p if top_p is None else float(top_p)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return SamplingParams.create(beta=beta, temperature=temperature, top_k=top_k, top_p=top_p), temperature == 0

    # ----- compiled programs --------------------------------------------------------------------------------------

    def _run_compiled(self, name: str, fn: Callable, spec: DecodeSpec, donate: int, *args):
        """Calls `fn(graphdef, *args, spec=spec)` through an executable compiled once per signature (the argument
        shardings are part of it: params placed differently compile anew)."""
        leaves, treedef = jax.tree.flatten(args)
        signature = (self.graphdef, name, spec, treedef,
                     tuple((leaf.shape, str(leaf.dtype), getattr(leaf, "sharding", None)) for leaf in leaves))
        executable = _PROGRAMS.get(signature)
        if executable is None:
            start = time.perf_counter()
            graphdef = self.graphdef

            def traced(*a):
                TRACE_COUNTS[name] += 1
                return fn(graphdef, *a, spec=spec)

            executable = jax.jit(traced, donate_argnums=donate).lower(*args).compile()
            _PROGRAMS[signature] = executable
            self._compile_time += time.perf_counter() - start
        return executable(*args)

    def prefill(self, prompts: Sequence[Sequence[int]], mode: str = "tidar", max_new_tokens: int | None = None,
                seed: int = 0, *, beta: float | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None,
                cache: KVCache | None = None) -> tuple[DecodeState, DecodeSpec, SamplingParams]:
        """Validates inputs, pads prompts to their bucket and runs the compiled prefill.

        Returns (state, spec, sampling params) for `advance`. `cache` (optional, donated) must be an empty
        [batch, decode.max_cache_len, ...] cache; by default a zeroed one is allocated.
        """
        dec = self.decode_cfg
        sp, greedy = self._sampling_params(beta, temperature, top_k, top_p)
        limit = dec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        spec = DecodeSpec.create(mode, self.block_size, greedy, max(limit, dec.max_new_tokens), self.model_cfg)
        rows = self._check_prompts(prompts, spec.num_drafts)
        bucket = next(b for b in dec.prompt_buckets if b >= max(len(r) for r in rows))
        padded = np.full((len(rows), bucket), self.model_cfg.pad_token_id, np.int32)
        for i, row in enumerate(rows):
            padded[i, :len(row)] = row
        lengths = np.array([len(r) for r in rows], np.int32)
        if cache is None:
            cache = init_cache(self.model_cfg, len(rows), dec.max_cache_len)
        elif (cache.batch_size, cache.max_len) != (len(rows), dec.max_cache_len):
            raise ValueError(f"cache has batch {cache.batch_size} and {cache.max_len} slots; expected batch "
                             f"{len(rows)} and decode.max_cache_len={dec.max_cache_len}")
        state = self._run_compiled("prefill", decode.prefill, spec, 1, self.params, cache, padded, lengths,
                                   np.int32(limit), jax.random.key(seed), sp)
        return state, spec, sp

    def advance(self, state: DecodeState, spec: DecodeSpec, sp: SamplingParams,
                max_forwards: int | None = None) -> DecodeState:
        """Runs the compiled decode loop (donating `state`) until every row finished or `state.forwards` reaches
        max_forwards (default: no limit)."""
        bound = spec.capacity + 1 if max_forwards is None else max_forwards  # every forward emits >= 1 token/row
        return self._run_compiled("decode_loop", decode.decode_loop, spec, 1, self.params, state, sp,
                                  np.int32(bound))

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
            seen = np.zeros(state.num_tokens.shape, np.int64)
            bound = 1  # the prefill's forward; kept on the host so each chunk costs one device-to-host copy
            while True:
                tokens, counts, finish = jax.device_get((state.tokens, state.num_tokens, state.finish))
                on_tokens([tokens[i, seen[i]:counts[i]].tolist() for i in range(len(seen))])
                seen = counts
                if np.all(finish != decode.RUNNING):
                    break
                bound += chunk_forwards
                state = self.advance(state, spec, sp, bound)
        host = jax.device_get(state.replace(cache=None, draft_probs=None, key=None))
        compile_time = self._compile_time - compile_before
        wall = time.perf_counter() - start - compile_time
        counts = host.num_tokens
        total = int(counts.sum())
        return GenerationResult(
            tokens=[host.tokens[i, :counts[i]].tolist() for i in range(len(counts))],
            forwards=int(host.forwards),
            tokens_per_forward=total / max(int(host.row_forwards.sum()), 1),
            acceptance_histogram=host.accept_hist.tolist(),
            wall_time_s=wall, tokens_per_second=total / wall if wall > 0 else float("inf"),
            finish_reasons=[decode.FINISH_NAMES[int(f)] for f in host.finish],
            mode=mode, block_size=spec.num_drafts, compile_time_s=compile_time)
