"""A tiny random transformers Ministral-3 (Ministral3ForCausalLM) with every feature our model had to learn for it:
YaRN RoPE with an attention factor != 1, the llama-4 query scale (original context 8, so positions past 8 are
scaled), a sliding window shorter than the test sequences and head_dim 32 != hidden_size / heads = 16. Shared by
tests/test_ministral3.py and tests/test_nemotron_diffusion.py."""

import numpy as np

VOCAB = 512
WINDOW = 6
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=32, rms_norm_eps=1e-5, eos_token_id=0,
              pad_token_id=2, bos_token_id=1, tie_word_embeddings=False, sliding_window=WINDOW,
              # no mscale / mscale_all_dim: YaRN's attention factor is then 0.1 ln(4) + 1, not 1
              rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=8,
                                   beta_fast=32.0, beta_slow=1.0, llama_4_scaling_beta=0.1))


def make_ministral(init_std: float = 0.3, **changes):
    """Ministral3ForCausalLM in float32 eval mode, seeded; norms perturbed so that each tensor's mapping matters. A
    large init spreads the logits, so greedy choices are not near-ties decided by rounding."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Ministral3Config(**(CONFIG | changes), initializer_range=init_std)
    model = transformers.Ministral3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt` with its KV cache, exactly n tokens (eos disabled)."""
    import torch

    ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return ids[0, len(prompt):].tolist()


def make_mistral3():
    """Mistral3ForConditionalGeneration (how the Ministral-3 releases ship) with the text decoder of `CONFIG` and a
    tiny Pixtral vision tower, seeded, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    text = transformers.Ministral3Config(**CONFIG, initializer_range=0.3)
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.Mistral3ForConditionalGeneration(
        transformers.Mistral3Config(vision_config=vision, text_config=text)).eval()
