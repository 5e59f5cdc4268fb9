"""lm-evaluation-harness (lm-eval 0.4.13) model backend `tidar_jax`: any lm-eval task on a tidar-jax checkpoint.

    python -m tidar_jax.evals.lm_eval_cli --model tidar_jax --model_args checkpoint=runs/smollm2,mode=tidar \\
        --tasks hellaswag,arc_easy --batch_size 8

(lm-eval 0.4.13 has no plugin entry point for models, so the wrapper imports this module, which registers the name,
and then runs lm-eval's own CLI with the same arguments; from Python, `import tidar_jax.evals.harness` before
`lm_eval.simple_evaluate(model="tidar_jax", ...)`.)

model_args (all optional but `checkpoint`):
    checkpoint     a training WORKDIR, its checkpoints/ directory or one step directory (needs tokenizer.json)
    mode           generate_until decoding: tidar (default) or ar; scoring is always AR
    batch_size     rows per batch; every batch is padded to this many rows (model_args win over lm-eval's
                   --batch_size, whose default is 1; "auto" means 8)
    max_length     context window for scoring and prompts (default: the checkpoint's data.seq_len); longer inputs
                   keep their last max_length tokens, loglikelihood_rolling cuts documents into windows of it
    max_gen_toks   default generation limit when a task sets none (default 256); any limit is cut, with a
                   warning, to what the checkpoint's decode.max_cache_len leaves after max_length + two blocks
    beta, block_size, allow_block_size_mismatch, seed, chunk_forwards   as in infer.generate / infer.humaneval
Params are restored with `load_for_inference` onto the local devices (replicated).

- `loglikelihood` / `loglikelihood_rolling`: one plain causal forward (`model.forward` + `masks.causal_layout_mask`) per
  batch; requests are sorted by length and each batch is right-padded to a power-of-two length bucket (<= the one
  holding max_length), so there is one compiled program per bucket, never one per length. The jitted function
  returns per-row sums of continuation log-probabilities and the all-greedy flag, not the logits. Rolling
  documents use lm-eval's disjoint windows (`get_rolling_token_windows`, context_len=1), the harness's own rule.
- `generate_until`: requests grouped by their generation kwargs, batched through `batching.BatchDecoder` (one
  `Generator` per distinct max_gen_toks, prompt buckets up to max_length); stops at EOS, at max_gen_toks, or once
  the text holds one of `until`, which is then cut off; temperature 0 (or do_sample false) is greedy, otherwise
  sampling with temperature / top_k / top_p (TiDAR samples follow the AR distribution exactly).
- `get_model_info` adds the checkpoint, mode, K and generation statistics (tokens per forward, tokens/s) to
  lm-eval's results["config"].
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (registers lm-eval's own models; get_model skips that once ours is there)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from tidar_jax.decoding import tuning
from tidar_jax.decoding.spec import resolve_block_size
from tidar_jax.evals.batching import BatchDecoder, bucket_for, cut_at_eos, decode_config_for, length_buckets
from tidar_jax.layout import masks
from tidar_jax.model.transformer import forward

log = logging.getLogger(__name__)
MODES = ("tidar", "ar")
_KNOWN_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _score(graphdef, params, tokens, targets, weights):
    """tokens, targets: [B, L] int32 (targets[t] = the token after tokens[t]); weights: [B, L] float32 (1 where a
    target is scored). Returns (sum of scored log-probs [B], every scored target is the argmax [B])."""
    length = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    logits, _ = forward(graphdef, params, tokens, positions, masks.causal_layout_mask(jnp.ones(tokens.shape, bool)))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return (target_logp * weights).sum(-1), greedy.all(-1)


def _parse_batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("tidar_jax: batch_size=%s is not supported (no memory probing); using 8", value)
        return 8
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("tidar_jax", "tidar-jax")
class TidarLM(TemplateLM):
    """An lm-eval `LM` over a tidar-jax checkpoint (see the module docstring for the model_args)."""

    def __init__(self, checkpoint: str | None = None, mode: str = "tidar", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, beta: float | None = None,
                 block_size: int | None = None, allow_block_size_mismatch: bool = False, seed: int = 0,
                 chunk_forwards: int = 16, max_batch_size: int | None = None, device: str | None = None,
                 **unused: Any):
        super().__init__()
        from tidar_jax.checkpoint.inference import load_for_inference
        from tidar_jax.config import apply_overrides

        if checkpoint is None:
            raise ValueError("tidar_jax needs model_args checkpoint=DIR")
        if mode not in MODES:
            raise ValueError(f"tidar_jax mode must be one of {MODES}, got {mode!r}")
        if mode == "ar" and beta is not None:  # refused, not ignored: AR decoding has no diffusion logits to mix
            raise ValueError("tidar_jax: beta mixes diffusion logits into TiDAR's verifier; mode=ar has none, so it "
                             "would be ignored: drop beta or use mode=tidar")
        if unused:
            log.warning("tidar_jax: ignoring model_args %s", sorted(unused))
        if device is not None:
            log.info("tidar_jax: --device %s ignored; JAX uses its visible devices (%s)", device, jax.devices())
        self.checkpoint, self.mode = str(checkpoint), mode
        self.batch_size = _parse_batch_size(batch_size)
        self.bundle = load_for_inference(self.checkpoint)
        if self.bundle.tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer.json next to its checkpoints; lm-eval passes text")
        flags = [f"decode.{k}={v}" for k, v in (("beta", beta), ("block_size", block_size)) if v is not None]
        self.config = apply_overrides(self.bundle.config, flags)
        self.tokenizer = self.bundle.tokenizer
        self._max_length = int(max_length) if max_length is not None else int(self.config.data.seq_len)
        self.max_gen_toks = int(max_gen_toks)
        if self._max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"need max_length >= 2 and max_gen_toks >= 1, got {self._max_length}, "
                             f"{self.max_gen_toks}")
        self.allow_block_size_mismatch = _bool(allow_block_size_mismatch)
        self.seed, self.chunk_forwards = int(seed), int(chunk_forwards)
        self._buckets = length_buckets(self._max_length, smallest=16)
        self._score = jax.jit(functools.partial(_score, self.bundle.graphdef))
        self._decoders: dict[int, BatchDecoder] = {}
        self._gen_stats = collections.Counter()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TidarLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "TidarLM":
        """model_args plus the CLI's --batch_size / --max_batch_size / --device; model_args win (lm-eval always
        passes a batch_size, 1 unless --batch_size says otherwise)."""
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(arg_dict)
        return cls(**args)

    # ----- what TemplateLM needs -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.config.model.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"tidar_jax-{self.tokenizer.fingerprint[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from tidar_jax.data.chat import load_chat_template

        if not chat_template or self.tokenizer.path is None:
            return None
        return load_chat_template(self.tokenizer.path.parent)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from tidar_jax.data.chat import apply_chat_template

        if self.tokenizer.path is None:
            raise ValueError("the checkpoint's tokenizer has no directory to read a chat template from")
        return apply_chat_template(self.tokenizer.path.parent, chat_history, add_generation_prompt)

    # ----- scoring -----------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context ids, continuation ids). Returns (log p(continuation | context),
        continuation is the greedy one) per request, in order."""
        items = []  # (index, input ids, target ids, scored targets)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (_, context, continuation) in enumerate(requests):
            whole = (list(context) + list(continuation))[-(self._max_length + 1):]
            if len(whole) < 2 or not continuation:
                results[i] = (0.0, True)
                continue
            items.append((i, whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        items.sort(key=lambda item: (-len(item[1]), item[0]))
        pad = self.config.model.pad_token_id
        bar = tqdm(total=len(items), desc="tidar_jax loglikelihood", disable=disable_tqdm)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            length = bucket_for(len(chunk[0][1]), self._buckets)
            tokens = np.full((self.batch_size, length), pad, np.int32)
            targets = np.full((self.batch_size, length), pad, np.int32)
            weights = np.zeros((self.batch_size, length), np.float32)
            for row, (_, inp, tgt, scored) in enumerate(chunk):
                tokens[row, :len(inp)], targets[row, :len(tgt)] = inp, tgt
                weights[row, len(inp) - scored:len(inp)] = 1.0
            logp, greedy = jax.device_get(self._score(self.bundle.params, tokens, targets, weights))
            for row, (i, *_rest) in enumerate(chunk):
                results[i] = (float(logp[row]), bool(greedy[row]))
            bar.update(len(chunk))
        bar.close()
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string (after the prefix token), scored in disjoint max_length windows."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self._max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----- generation --------------------------------------------------------------------------------------------

    def _bounded(self, max_gen_toks: int) -> int:
        """`max_gen_toks` cut, with a warning, to what the checkpoint's decode.max_cache_len leaves after a prompt of
        max_length tokens and two blocks: a task's limit never grows the KV cache past the configured one."""
        k = resolve_block_size(self.config.model, self.config.decode, True)
        room = self.config.decode.max_cache_len - self._max_length - 2 * k
        if max_gen_toks <= room:
            return max_gen_toks
        if room < 1:
            raise ValueError(f"tidar_jax: prompts of max_length {self._max_length} tokens leave no room to generate in "
                             f"decode.max_cache_len {self.config.decode.max_cache_len}: lower max_length")
        log.warning("tidar_jax: max_gen_toks %d cut to %d: that fills decode.max_cache_len=%d after prompts of "
                    "max_length=%d tokens", max_gen_toks, room, self.config.decode.max_cache_len, self._max_length)
        return room

    def _decoder(self, max_gen_toks: int) -> BatchDecoder:
        """One Generator per generation limit (its capacity), prompt buckets up to max_length."""
        if max_gen_toks not in self._decoders:
            from tidar_jax.decoding.generation import Generator

            m = self.config.model
            dec = decode_config_for(self.config.decode, self._max_length, max_gen_toks,
                                    resolve_block_size(m, self.config.decode, True))
            dec = dataclasses.replace(dec, prompt_buckets=tuple(b for b in dec.prompt_buckets if b < self._max_length)
                                      + (self._max_length,), block_size=self.config.decode.block_size)
            generator = Generator(self.bundle.graphdef, self.bundle.params, m, dec,
                                  allow_block_size_mismatch=self.allow_block_size_mismatch,
                                  tuning=tuning.for_decode(dec, self.bundle.workdir, self.bundle.step))
            self._decoders[max_gen_toks] = BatchDecoder(generator, self.batch_size, self.chunk_forwards,
                                                        warmup=False)
        return self._decoders[max_gen_toks]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc=f"tidar_jax generate_until ({self.mode})", disable=disable_tqdm)
        eos, batches = self.config.model.eos_token_id, 0
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            ignored = sorted(set(kwargs) - _KNOWN_GEN_KWARGS)
            if ignored:
                log.warning("tidar_jax: ignoring generation kwargs %s", ignored)
            until = [s for s in kwargs["until"] if s]
            max_gen = self._bounded(int(kwargs["max_gen_toks"]))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            knobs = {"temperature": temperature, "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p")}
            decoder = self._decoder(max_gen)
            prompts = {i: self.tok_encode(requests[i].args[0])[-self._max_length:] or [self.prefix_token_id]
                       for i in indices}
            order = sorted(indices, key=lambda i: (len(prompts[i]), i))
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]

                def stop(row: int, new: list[int]) -> bool:
                    text = self.tok_decode(cut_at_eos(new, eos))
                    return any(s in text for s in until)

                out = decoder.run([prompts[i] for i in idx], self.mode, max_gen, stop=stop if until else None,
                                  seed=self.seed + batches, **knobs)
                batches += 1
                for row, i in enumerate(idx):
                    text = self.tok_decode(cut_at_eos(out.tokens[row], eos))
                    for s in until:
                        text = text.split(s, 1)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                self._gen_stats["new_tokens"] += sum(len(t) for t in out.tokens)
                self._gen_stats["row_forwards"] += sum(out.row_forwards)
                self._gen_stats["wall_time_s"] += out.wall_time_s
                bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        s = self._gen_stats
        info = {"tidar_jax": {"checkpoint": self.checkpoint, "step": self.bundle.step, "mode": self.mode,
                              "objective": self.config.train.objective, "max_length": self._max_length,
                              "batch_size": self.batch_size,
                              "decode_block_size": self.config.decode.block_size or self.config.model.block_size}}
        if s["row_forwards"]:
            info["tidar_jax"]["generation"] = {
                "new_tokens": int(s["new_tokens"]), "row_forwards": int(s["row_forwards"]),
                "tokens_per_forward": s["new_tokens"] / s["row_forwards"],
                "tokens_per_second_incl_compile": s["new_tokens"] / s["wall_time_s"] if s["wall_time_s"] else None}
        return info
