"""Mistral-3 directories (`model_type: mistral3`, transformers' Mistral3ForConditionalGeneration: how the Ministral-3
3B / 8B / 14B releases ship) read as their Ministral-3 text decoder; the vision tower and projector are not read.

config.json nests the decoder's config under `text_config` (`model_type: ministral3`); its tensors are named
`language_model.model.*` / `language_model.lm_head.weight` (the saved layout, which transformers 5 still writes)
or `model.language_model.*` / `lm_head.weight` (transformers 5's in-memory names). The head is untied exactly when
the directory holds a head tensor. Quantized releases (a `quantization_config`, e.g. FP8) are refused by
`hf_config.model_config_from_hf`, naming the field.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from tidar_jax.interop.hf_config import ConversionError
from tidar_jax.interop.renamed import RenamedTensors, prefix_renamer

MODEL_TYPE = "mistral3"
TEXT_MODEL_TYPES = ("ministral3",)
_RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."), ("vision_tower.", None), ("multi_modal_projector.", None),
            ("model.vision_tower.", None), ("model.multi_modal_projector.", None))
# Top-level keys the text decoder's config may leave to its wrapper.
_INHERITED = ("eos_token_id", "pad_token_id", "bos_token_id", "quantization_config")


def as_ministral3(hf: dict, tensors: Mapping[str, np.ndarray]) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(the text decoder's config dict, its tensors under transformers' Ministral-3 names) of a Mistral-3 directory.
    Raises ConversionError for a text_config that is missing or not Ministral-3."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConversionError("a mistral3 config.json needs a text_config object (the language model's config)")
    if text.get("model_type") not in TEXT_MODEL_TYPES:
        raise ConversionError(f"unsupported mistral3 checkpoint: text_config.model_type {text.get('model_type')!r} "
                              f"(implemented: {TEXT_MODEL_TYPES})")
    renamed = RenamedTensors(tensors, prefix_renamer(_RENAMES))
    config = {k: hf[k] for k in _INHERITED if k in hf} | text
    config["tie_word_embeddings"] = "lm_head.weight" not in renamed
    return config, renamed
