"""model.attention_impl=auto (the default): resolved per backend where the model graph is built, explicit choices
kept, recorded by a run, and the default train step on a CPU equals the dense "xla" reference's."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_ops_blockwise import padding  # tests/ is on sys.path under pytest

from tidar_jax import config as config_lib
from tidar_jax.checkpoint.store import runtime_record
from tidar_jax.config import ATTENTION_IMPLS, MeshConfig, ModelConfig, replace, resolve_attention_impl
from tidar_jax.model.transformer import create_model, resolved_config
from tidar_jax.sharding import make_global_batch, make_mesh
from tidar_jax.training.trainer import Trainer

# The documented table (README, config.AUTO_ATTENTION_IMPL), restated here so that a change to it is deliberate.
EXPECTED = {"cpu": "blockwise", "gpu": "blockwise", "tpu": "splash", "METAL": "xla", "rocm": "xla", "": "xla"}


def test_auto_is_the_default():
    assert ModelConfig().attention_impl == "auto"


@pytest.mark.parametrize("backend", sorted(EXPECTED))
def test_auto_resolves_per_backend(backend, monkeypatch):
    """Known backends get their kernel, any other one "xla"; never an error. Resolving with the process's backend
    (`model.resolved_config`) follows `jax.default_backend()`."""
    assert resolve_attention_impl(ModelConfig(), backend).attention_impl == EXPECTED[backend]
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert resolved_config(ModelConfig()).attention_impl == EXPECTED[backend]
    assert runtime_record(ModelConfig()) == {"backend": backend, "attention_impl": EXPECTED[backend]}
    # validate_backend checks what auto becomes (never cudnn today), so it passes on every backend.
    config_lib.validate_backend(ModelConfig(), backend, 1)


@pytest.mark.parametrize("impl", [i for i in ATTENTION_IMPLS if i != "auto"])
def test_explicit_choice_is_never_replaced(impl):
    m = ModelConfig(attention_impl=impl)
    for backend in EXPECTED:
        assert resolve_attention_impl(m, backend) is m


def test_model_graph_names_the_concrete_impl():
    """The graph built from an "auto" config (create_model, and so sharding's abstract / sharded init and
    checkpoint loading, which build the same Transformer) runs blockwise on this CPU in every layer."""
    model = create_model(ModelConfig(n_layers=2))
    assert model.cfg.attention_impl == "blockwise"
    assert {layer.attn.cfg.attention_impl for layer in model.layers} == {"blockwise"}
    assert create_model(ModelConfig(attention_impl="xla")).cfg.attention_impl == "xla"


def test_default_train_step_equals_xla(tiny_config):
    """One full Trainer step (TiDAR loss, AdamW update) under the default config on this CPU equals the "xla"
    step from the same params and batch (float32; blockwise only reassociates the softmax sums)."""
    cfg = replace(tiny_config, data={"seq_len": 16}, model={"n_layers": 1})
    assert cfg.model.attention_impl == "auto"
    mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    valid = padding(cfg.data.global_batch_size, 16, cfg.model.block_size)
    tokens = np.where(valid, rng.integers(3, 512, valid.shape), 2).astype(np.int32)
    batch = make_global_batch({"tokens": tokens, "valid": valid}, mesh)
    params = None
    results = []
    for c in (replace(cfg, model={"attention_impl": "xla"}), cfg):
        trainer = Trainer(c, mesh)
        state = trainer.init_state(params)
        params = jax.device_get(state["params"]) if params is None else params
        state, metrics = trainer.train_step(state, batch)
        results.append((jax.device_get(state["params"]), jax.device_get(metrics), trainer.runtime))
    (ref_params, ref_metrics, ref_runtime), (got_params, got_metrics, runtime) = results
    assert (ref_runtime["attention_impl"], runtime["attention_impl"]) == ("xla", "blockwise")
    for key in ("loss", "ar_loss", "diff_loss", "grad_norm"):
        np.testing.assert_allclose(got_metrics[key], ref_metrics[key], rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(got_params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
