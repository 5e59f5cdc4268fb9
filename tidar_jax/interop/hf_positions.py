"""config.json's positional fields -> `ModelConfig` fields: RoPE theta and YaRN scaling (any family), Ministral-3's
query scale (`llama_4_scaling_beta`) and sliding window. Field names and defaults follow transformers 5
(`modeling_rope_utils._compute_yarn_parameters`, `Ministral3Config`, `Ministral3Attention`); a transformers v4
config (`rope_theta` + `rope_scaling`) reads the same. Anything our model cannot compute exactly is returned as a
problem naming the field, for the caller to refuse."""

from __future__ import annotations

import math

# Ministral-3 reads its query scale and sliding window from these; other families have neither.
QUERY_SCALE_FAMILIES = ("ministral3",)


def rope_parameters(hf: dict) -> dict:
    """The RoPE parameters of a config.json, v5 `rope_parameters` over v4 `rope_scaling` + `rope_theta`."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _yarn_attention_factor(params: dict, factor: float) -> float:
    """YaRN's cos / sin scale: `attention_factor` when given, else from `mscale` / `mscale_all_dim` (transformers'
    `get_mscale`)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else float(mscale(factor))


def positional_fields(hf: dict, model_type: str) -> tuple[dict, list[str]]:
    """(ModelConfig keyword arguments, problems) for the positional features of config.json `hf`."""
    params, problems, fields = rope_parameters(hf), [], {}
    fields["rope_theta"] = float(params["rope_theta"])
    kind = params.get("rope_type") or params.get("type") or "default"
    for where in (hf, params):
        if where.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"partial_rotary_factor {where['partial_rotary_factor']}")
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if kind == "yarn":
        factor = params.get("factor")
        if factor is None and original:  # transformers derives it from the two context lengths
            factor = hf.get("max_position_embeddings", 0) / original
        original = original or hf.get("max_position_embeddings")
        if not factor or not original:
            problems.append("rope scaling 'yarn' without rope_parameters.factor and original_max_position_embeddings")
        else:
            fields.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_len=int(original),
                          rope_beta_fast=float(params.get("beta_fast") or 32), rope_truncate=bool(params.get(
                              "truncate", True)), rope_beta_slow=float(params.get("beta_slow") or 1),
                          rope_attention_factor=_yarn_attention_factor(params, float(factor)))
    elif kind != "default":
        problems.append(f"rope scaling {kind!r} (rope_parameters.rope_type; implemented: default and yarn)")
    beta = params.get("llama_4_scaling_beta")
    if beta and model_type in QUERY_SCALE_FAMILIES:
        length = params.get("original_max_position_embeddings")
        if not length:
            problems.append("rope_parameters.llama_4_scaling_beta without "
                            "rope_parameters.original_max_position_embeddings")
        else:
            fields.update(query_scale_beta=float(beta), query_scale_len=int(length))
    elif beta:
        problems.append(f"rope_parameters.llama_4_scaling_beta in a {model_type} config (only Ministral-3 reads it)")
    window = hf.get("sliding_window")
    if model_type in QUERY_SCALE_FAMILIES and window:
        fields["sliding_window"] = int(window)
    return fields, problems
