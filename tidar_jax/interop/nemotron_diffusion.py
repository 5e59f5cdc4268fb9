"""Nemotron-Labs-Diffusion (NVIDIA, `model_type: nemotron_labs_diffusion`) checkpoints as Ministral-3 ones.

The released directories hold a Ministral-3 decoder under the weight prefix `encoder.` (`encoder.embed_tokens`,
`encoder.layers.N.*`, `encoder.norm`) and an untied output layer `diffusion_head.weight` [vocab, d] that serves
both the AR and the diffusion predictions (a mask token at position p predicts the token at p, as in our
layout); config.json is a `Ministral3Config` (`rope_parameters` with YaRN and `llama_4_scaling_beta`,
`sliding_window`, a free `head_dim`) plus `mask_token_id` (a trained vocabulary row, 100 in the released models)
and `block_size` (the training block, 32). These names were read from public code that loads
the checkpoints (mlx / vLLM / TensorRT ports and their tests), not from the checkpoints themselves: no weights
are downloaded here.

`as_ministral3` renames the tensors to transformers' Ministral-3 names (`model.*`, `lm_head.weight`) and turns the
config into a `ministral3` one carrying our import keys: `tidar_mask_token_id` (the checkpoint's own mask row: no
row is added, the tokenizer is kept as it is) and `tidar_block_size` = `DECODE_BLOCK_SIZE` (model.block_size is the
draft block K that decoding uses by default; the trained 32 would make each TiDAR step K + K*K = 1056 query tokens,
so a small K is the default and `--block-size` chooses another). Fields that change what the model computes and
that we do not implement are refused, naming the field.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from tidar_jax.interop.hf_config import ConversionError
from tidar_jax.interop.renamed import RenamedTensors, prefix_renamer

MODEL_TYPE = "nemotron_labs_diffusion"
# The default draft block of an imported model (model.block_size); the checkpoint's training block stays in
# OUT/hf_config.json. K = 4 makes a 20-token TiDAR step.
DECODE_BLOCK_SIZE = 4
_RENAMES = (("encoder.", "model."), ("diffusion_head.weight", "lm_head.weight"))
# Config fields of NemotronLabsDiffusionConfig that would split the stack or change its attention at inference;
# each must hold its inert value (None counts as inert) for the checkpoint to be the plain Ministral-3 we compute.
_INERT_FIELDS = {"num_ar_layers": 0, "num_diffusion_layers": 0}


def as_ministral3(hf: dict, tensors: Mapping[str, np.ndarray]) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(Ministral-3 config dict with our import keys, renamed tensors) of a Nemotron-Labs-Diffusion checkpoint.

    Raises ConversionError naming the field for a config we cannot run exactly (a split AR / diffusion stack, no
    or an out-of-vocabulary mask_token_id) and for tensors in neither layout. The head is untied exactly when the
    directory holds `diffusion_head.weight` (what the model computes with), whatever `tie_word_embeddings` says.
    """
    problems = [f"{name} {hf[name]!r} (only {inert} is implemented: one shared stack)"
                for name, inert in _INERT_FIELDS.items() if hf.get(name) not in (None, inert)]
    mask = hf.get("mask_token_id")
    vocab = hf.get("vocab_size")
    if not isinstance(mask, int) or isinstance(mask, bool) or not (vocab is None or 0 <= mask < vocab):
        problems.append(f"mask_token_id {mask!r} (the trained mask row: an id inside vocab_size {vocab})")
    if problems:
        raise ConversionError(f"unsupported {MODEL_TYPE} checkpoint: " + "; ".join(problems))
    if not any(name.startswith("encoder.") for name in tensors):
        raise ConversionError(f"a {MODEL_TYPE} checkpoint keeps its decoder under 'encoder.', but no tensor name "
                              f"starts with it (found e.g. {sorted(tensors)[:3]})")
    config = {k: v for k, v in hf.items() if k not in ("mask_token_id", "block_size", "auto_map", "architectures")}
    config.update(model_type="ministral3", architectures=["Ministral3ForCausalLM"], tidar_mask_token_id=mask,
                  tidar_block_size=DECODE_BLOCK_SIZE, tie_word_embeddings="diffusion_head.weight" not in tensors)
    return config, RenamedTensors(tensors, prefix_renamer(_RENAMES))
