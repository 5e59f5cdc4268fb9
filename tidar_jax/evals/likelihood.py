"""Held-out evaluation: likelihood (loss, perplexity, bits per byte), diffusion draft accuracy, decoding statistics.

- `heldout_likelihood`: one jitted forward per fixed-shape held-out batch (data.make_eval_batches). A `tidar`
  checkpoint is scored on the training layout `[x | M x S]` (losses.tidar_loss: the clean half is exactly a causal
  forward of x, so its AR loss is the AR-mode loss); an `ar` checkpoint with a plain causal forward, AR terms only.
  Sums are weighted by target counts, so batch boundaries and padding do not change the numbers.
- Bits per byte divide the summed next-token cross-entropy (in bits) by the UTF-8 bytes of the predicted tokens
  (`token_byte_lengths`: exact for byte-level BPE, special tokens count 0 bytes), so it compares across tokenizers.
- `decoding_stats`: TiDAR tokens per forward and acceptance histogram on held-out prompts, plus the greedy
  lossless check against AR decoding (beta = 1, greedy: the outputs must be identical; in low precision a flip at
  a near-tie is told apart from a real mismatch by agreement.compare).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tidar_jax.config import Config
from tidar_jax.data.tokenizer import Tokenizer
from tidar_jax.decoding.generation import Generator
from tidar_jax.evals import agreement
from tidar_jax.sharding import batch_sharding, batch_shards, check_runtime
from tidar_jax.training.objective import objective_metrics

LN2 = math.log(2.0)


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """[vocab_size] int64: UTF-8 bytes that each token id stands for (0 for special tokens and ids past the
    tokenizer's vocabulary).

    Byte-level BPE token strings spell one byte per character (GPT-2 byte alphabet), which is exact even for tokens
    holding part of a multi-byte character; other tokens fall back to the length of their decoded text.
    """
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    hf = tokenizer.hf_tokenizer
    special = {tokenizer.eos_id, tokenizer.mask_id, tokenizer.pad_id}
    special.update(i for i, tok in hf.get_added_tokens_decoder().items() if tok.special)
    lengths = np.zeros(vocab_size, np.int64)
    for i in range(min(tokenizer.vocab_size, vocab_size)):
        if i in special:
            continue
        piece = hf.id_to_token(i)
        if piece is not None and piece and set(piece) <= alphabet:
            lengths[i] = len(piece)
        else:
            lengths[i] = len(tokenizer.decode([i], skip_special_tokens=True).encode("utf-8"))
    return lengths


def _batch_placement(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Batch rows split over the mesh's batch axes when they divide the batch, else replicated."""
    return batch_sharding(mesh) if batch_size % batch_shards(mesh) == 0 else NamedSharding(mesh, P())


def heldout_likelihood(graphdef: nnx.GraphDef, params: nnx.State, cfg: Config, batches: Sequence[dict],
                       mesh: Mesh, byte_lengths: np.ndarray | None = None) -> dict[str, Any]:
    """Held-out metrics of the checkpoint's objective (cfg.train.objective) over `batches`.

    batches: dicts tokens int32 [B, S], valid bool [B, S] (all of one shape); params placed on `mesh`;
    byte_lengths: `token_byte_lengths` output, for bits per byte. Returns floats: `ar_loss` (nats per token),
    `perplexity` = exp(ar_loss), `ar_accuracy`, `num_targets`, and with byte_lengths `bytes`, `bits_per_byte`;
    for a `tidar` checkpoint also `diff_loss`, `diff_accuracy`, `diff_slot_accuracy` (list of K: top-1 accuracy
    of block slot r, r = 0 being the token right after the visible prefix) and `loss` (the training objective).
    """
    if not batches:
        raise ValueError("no held-out batches to evaluate: the held-out split is empty")
    check_runtime(cfg.model, mesh.shape["tensor"])
    objective, k = cfg.train.objective, cfg.model.block_size
    step = jax.jit(lambda p, tok, val: objective_metrics(graphdef, p, tok, val, cfg, objective))
    placement = _batch_placement(mesh, batches[0]["tokens"].shape[0])
    sums: dict[str, Any] = {"ar_nats": 0.0, "ar_hits": 0.0, "ar_count": 0.0, "diff_nats": 0.0, "diff_hits": 0.0,
                            "diff_count": 0.0, "slot_hits": np.zeros(k), "slot_count": np.zeros(k), "bytes": 0}
    with jax.set_mesh(mesh):
        for batch in batches:
            tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
            m = jax.device_get(step(params, jax.device_put(tokens, placement), jax.device_put(valid, placement)))
            sums["ar_nats"] += float(m["ar_loss"]) * float(m["ar_count"])
            sums["ar_hits"] += float(m["ar_accuracy"]) * float(m["ar_count"])
            sums["ar_count"] += float(m["ar_count"])
            if byte_lengths is not None:
                targets = valid[:, :-1] & valid[:, 1:]
                sums["bytes"] += int(byte_lengths[tokens[:, 1:]][targets].sum())
            if objective == "tidar":
                sums["diff_nats"] += float(m["diff_loss"]) * float(m["diff_count"])
                sums["diff_hits"] += float(m["diff_accuracy"]) * float(m["diff_count"])
                sums["diff_count"] += float(m["diff_count"])
                slot_count = valid.reshape(valid.shape[0], -1, k).sum(axis=(0, 1))
                sums["slot_hits"] += np.asarray(m["diff_slot_accuracy"]) * slot_count
                sums["slot_count"] += slot_count
    ar_count = max(sums["ar_count"], 1.0)
    out: dict[str, Any] = {"objective": objective, "num_targets": int(sums["ar_count"]),
                           "ar_loss": sums["ar_nats"] / ar_count, "ar_accuracy": sums["ar_hits"] / ar_count}
    out["perplexity"] = math.exp(out["ar_loss"])
    if byte_lengths is not None:
        out["bytes"] = sums["bytes"]
        out["bits_per_byte"] = sums["ar_nats"] / LN2 / max(sums["bytes"], 1)
    if objective == "tidar":
        diff_count = max(sums["diff_count"], 1.0)
        out["diff_loss"] = sums["diff_nats"] / diff_count
        out["diff_accuracy"] = sums["diff_hits"] / diff_count
        out["diff_slot_accuracy"] = (sums["slot_hits"] / np.maximum(sums["slot_count"], 1.0)).tolist()
        alpha = cfg.train.alpha
        out["loss"] = (alpha * out["ar_loss"] + out["diff_loss"]) / (1.0 + alpha)
    return out


def summarize_generation(result) -> dict[str, Any]:
    """The JSON-friendly statistics of a GenerationResult (or SpecResult)."""
    out = {"mode": result.mode, "block_size": result.block_size, "new_tokens": sum(len(t) for t in result.tokens),
           "forwards": result.forwards, "tokens_per_forward": result.tokens_per_forward,
           "acceptance_histogram": list(result.acceptance_histogram), "wall_time_s": result.wall_time_s,
           "tokens_per_second": result.tokens_per_second}
    if hasattr(result, "draft_forwards"):
        out["draft_forwards"] = result.draft_forwards
    return out


def decoding_stats(generator: Generator, prompts: list[list[int]], max_new_tokens: int,
                   modes: Sequence[str] = ("tidar", "ar"),
                   near_tie_epsilon: float | None = None) -> tuple[dict[str, dict], dict[str, list[list[int]]]]:
    """Greedy generation of `prompts` (one batch) in each mode. Returns ({mode: summarize_generation}, {mode:
    new tokens per prompt}); with both modes the stats gain `tidar_equals_ar` (the greedy lossless check: exact
    equality) and `tidar_vs_ar` (agreement.compare: exact / near-tie / mismatch rows, first divergences with AR's
    top-2 logit gaps; `near_tie_epsilon` None = the compute dtype's rule there)."""
    stats, tokens = {}, {}
    for mode in modes:
        result = generator.generate(prompts, mode, max_new_tokens, temperature=0.0)
        stats[mode], tokens[mode] = summarize_generation(result), result.tokens
    if "tidar" in tokens and "ar" in tokens:
        stats["tidar_equals_ar"] = tokens["tidar"] == tokens["ar"]
        stats["tidar_vs_ar"] = agreement.compare(generator.graphdef, generator.params, generator.model_cfg, prompts,
                                                 tokens["ar"], tokens["tidar"], near_tie_epsilon)
    return stats, tokens
