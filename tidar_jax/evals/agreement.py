"""Agreement of a greedy decoding method's tokens with AR greedy's, judged at near-ties (issue 10, item 8).

Greedy TiDAR at beta = 1 (and greedy speculative decoding) must emit exactly AR greedy's tokens. But the methods
compute the same logits with differently shaped matmuls (a K + K*K-row step against a 1-row step), and in bfloat16
(or TF32) their rounding differs by more than a near-tie's top-2 gap, so an argmax may flip there; after a flip the
continuations legitimately part. So only each row's FIRST divergence is judged, on AR's logits at that position,
recomputed by ONE independent causal forward of prompt + AR's tokens (full recompute, no KV cache, the decoding's
compute dtype):

- exact: the row's tokens equal AR's;
- near-tie: at the first divergence position, AR's token and the method's token both lie within `tolerance` of the
  recomputed maximum logit (when AR's token is the top-1 and the method's the runner-up, as at a flip: AR's top-2
  gap < tolerance);
- mismatch: anything else (a larger gap, a token far from the top, or outputs of different lengths).
The recompute is a third computation and may side with the method (then ar_is_top is False and token_gap < 0):
on SmolLM2-135M in bfloat16 (infer.bench, 4 corpus prompts x 64 tokens) 3 of 4 TiDAR rows diverged, each where
the recompute's top-2 gap was 0.008-0.08 logits (tolerance ~0.65) and the recompute's top-1 was TiDAR's token.

Tolerance (absolute, in logits) unless an explicit `epsilon` is given:
`NEAR_TIE_FACTOR * finfo(compute_dtype).eps * max|logit|` at that position. Why: every layer rounds activations to
the compute dtype (relative error ~ eps) and the logits inherit an error that scales with their magnitude; two
computations of the same logit then differ by a few eps * |logit| (bfloat16: eps = 2^-7, so 4 * 2^-7 * 25 = 0.78
logits at SmolLM2-135M's typical max|logit| of 25; float32: 1.2e-5). Measured: see NEAR_TIE_FACTOR.

The strict check stays: in float32 the outputs must match exactly (`strict_ok`), and accelerators must run it with
full float32 dots: `matmul_precision` gives `jax.default_matmul_precision("highest")` for float32 models, since GPUs
use TF32 and TPUs bfloat16 passes for float32 dots at the default precision (CPUs compute float32 dots exactly).
Generator's program cache does not key on the precision: enter the context before the first decode program of a
process is compiled (infer.bench / infer.eval do).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.layout import masks
from tidar_jax.model.transformer import forward_hidden, head_logits

# Tolerance = NEAR_TIE_FACTOR * eps(dtype) * max|logit|. Measured on SmolLM2-135M (256 positions of README text,
# full causal forwards): the bfloat16 top-2 gap differs from the float32 one by at most 1.3 eps * max|logit| (p99
# 0.78, median 0.16; max|logit| ~ 25, so ~0.23 logits at most); 8 of 256 argmaxes flipped. A flip between two
# bfloat16 computations needs up to 2 x 1.3 of error, and the recompute that judges it adds up to 1.3 more: 4.
NEAR_TIE_FACTOR = 4.0


def first_divergence(ar: Sequence[int], other: Sequence[int]) -> int | None:
    """First index where `other` differs from `ar` (a length difference counts at the shorter length), or None."""
    for i, (a, b) in enumerate(zip(ar, other)):
        if a != b:
            return i
    return None if len(ar) == len(other) else min(len(ar), len(other))


def tolerance(compute_dtype: str, logit_scale: float, epsilon: float | None = None) -> float:
    """The near-tie threshold in logits: `epsilon` if given, else NEAR_TIE_FACTOR * eps(dtype) * logit_scale
    (logit_scale: max |logit| at the position)."""
    if epsilon is not None:
        return float(epsilon)
    return NEAR_TIE_FACTOR * float(jnp.finfo(jnp.dtype(compute_dtype)).eps) * float(logit_scale)


def precision_name(compute_dtype: str, precision: str | None = None) -> str:
    """The matmul precision decoding runs at: `precision`, or for None "highest" for float32 (the strict check) and
    "default" (the backend's) otherwise."""
    if precision is not None:
        return precision
    return "highest" if jnp.dtype(compute_dtype) == jnp.float32 else "default"


def matmul_precision(compute_dtype: str, precision: str | None = None):
    """Context for decoding whose agreement is checked: `jax.default_matmul_precision` of `precision_name` (a
    no-op context for "default")."""
    name = precision_name(compute_dtype, precision)
    return contextlib.nullcontext() if name == "default" else jax.default_matmul_precision(name)


@functools.partial(jax.jit, static_argnums=0)
def _reference(graphdef: nnx.GraphDef, params: nnx.State, tokens, rows, pairs):
    """Full causal recompute. tokens [B, L] int32 (left-aligned sequences, padding after); rows [B]: the position
    whose next-token logits are read; pairs [B, 2]: (AR token, method token). Returns float32 top-2 logits [B, 2],
    their ids [B, 2], the pair's logits [B, 2] and max |logit| [B]."""
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    hidden, _ = forward_hidden(graphdef, params, tokens, positions, masks.causal_mask(length)[None])
    logits = head_logits(graphdef, params, jnp.take_along_axis(hidden, rows[:, None, None], axis=1))[:, 0]
    top, ids = jax.lax.top_k(logits, 2)
    return top, ids, jnp.take_along_axis(logits, pairs, axis=1), jnp.max(jnp.abs(logits), axis=-1)


def _bucket(n: int, floor: int) -> int:
    """The smallest power of two >= max(n, floor): few shapes, so a report's recompute compiles once or twice."""
    return max(floor, 1 << max(n - 1, 0).bit_length())


def reference_logits(graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig,
                     sequences: Sequence[Sequence[int]], positions: Sequence[int],
                     pairs: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """AR's next-token logits after `sequences[i][:positions[i] + 1]`, from one causal forward of every sequence
    (padded to a power-of-two batch and length; causal rows never see the padding after them). params: in the
    compute dtype (precision.inference_params). Returns numpy top [n, 2], ids [n, 2], pair [n, 2], scale [n]."""
    n, length = len(sequences), _bucket(max(map(len, sequences)), 16)
    tokens = np.full((_bucket(n, 1), length), model_cfg.pad_token_id, np.int32)
    rows, pair = np.zeros(len(tokens), np.int32), np.zeros((len(tokens), 2), np.int32)
    for i, (seq, pos, p) in enumerate(zip(sequences, positions, pairs)):
        tokens[i, :len(seq)], rows[i], pair[i] = seq, pos, p
    top, ids, got, scale = jax.device_get(_reference(graphdef, params, tokens, rows, pair))
    return {"top": top[:n], "ids": ids[:n], "pair": got[:n], "scale": scale[:n]}


def compare(graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]],
            ar_tokens: Sequence[Sequence[int]], method_tokens: Sequence[Sequence[int]],
            epsilon: float | None = None) -> dict[str, Any]:
    """Per-row agreement of `method_tokens` with `ar_tokens` (new tokens per row, after `prompts`); params in
    model_cfg.compute_dtype. Rows that match exactly cost no forward. Returns a JSON-ready dict: rows,
    exact_match_rows, near_tie_rows, mismatch_rows, verdict ("exact" | "near-tie" | "mismatch"), strict (float32),
    strict_ok (float32: every row exact; other dtypes: no mismatch), compute_dtype, epsilon (None: the dtype rule)
    and `divergences`: one dict per diverging row (row, position, ar_token, method_token, top2_gap = AR's top-1 minus
    top-2 logit, token_gap = AR's logit of its token minus that of the method's, spread = AR's top-1 logit minus
    the lower of the two tokens' (the figure judged: near_tie = spread < tolerance), method_is_runner_up,
    ar_is_top, tolerance, near_tie); the logit fields are None for a length-only divergence."""
    if not len(prompts) == len(ar_tokens) == len(method_tokens):
        raise ValueError(f"prompts, ar_tokens and method_tokens must have one entry per row, got {len(prompts)}, "
                         f"{len(ar_tokens)} and {len(method_tokens)}")
    divergences = []
    for row, (ar, other) in enumerate(zip(ar_tokens, method_tokens)):
        pos = first_divergence(ar, other)
        if pos is not None:
            both = pos < min(len(ar), len(other))
            divergences.append({"row": row, "position": pos, "ar_token": int(ar[pos]) if pos < len(ar) else None,
                                "method_token": int(other[pos]) if pos < len(other) else None, "judged": both})
    judged = [d for d in divergences if d.pop("judged")]
    if judged:
        # AR's logits for token `position` are read at the last token of prompt + ar[:position].
        seqs = [list(prompts[d["row"]]) + list(ar_tokens[d["row"]][:d["position"]]) for d in judged]
        ref = reference_logits(graphdef, params, model_cfg, seqs, [len(s) - 1 for s in seqs],
                               [(d["ar_token"], d["method_token"]) for d in judged])
        for i, d in enumerate(judged):
            top, ids, pair = ref["top"][i], ref["ids"][i], ref["pair"][i]
            tol = tolerance(model_cfg.compute_dtype, ref["scale"][i], epsilon)
            spread = float(top[0] - min(pair))
            d.update(top2_gap=float(top[0] - top[1]), token_gap=float(pair[0] - pair[1]), spread=spread,
                     method_is_runner_up=bool(ids[1] == d["method_token"]), ar_is_top=bool(ids[0] == d["ar_token"]),
                     tolerance=tol, near_tie=spread < tol)
    for d in divergences:
        d.setdefault("near_tie", False)
        for key in ("top2_gap", "token_gap", "spread", "method_is_runner_up", "ar_is_top", "tolerance"):
            d.setdefault(key, None)
    near = sum(d["near_tie"] for d in divergences)
    mismatch = len(divergences) - near
    verdict = "mismatch" if mismatch else "near-tie" if near else "exact"
    strict = jnp.dtype(model_cfg.compute_dtype) == jnp.float32
    return {"rows": len(ar_tokens), "exact_match_rows": len(ar_tokens) - len(divergences), "near_tie_rows": near,
            "mismatch_rows": mismatch, "verdict": verdict, "strict": bool(strict),
            "strict_ok": verdict == "exact" if strict else verdict != "mismatch",
            "compute_dtype": model_cfg.compute_dtype, "epsilon": epsilon, "divergences": divergences}


def describe(summary: dict[str, Any]) -> str:
    """One table cell: "True" (every row exact), "near-tie (gap 3e-03)" (no mismatch; the largest spread of the
    near-tie rows) or "False (m/n rows)" (m mismatching rows of n)."""
    if summary["verdict"] == "exact":
        return "True"
    if summary["verdict"] == "near-tie":
        return f"near-tie (gap {max(d['spread'] for d in summary['divergences']):.0e})"
    return f"False ({summary['mismatch_rows']}/{summary['rows']} rows)"
