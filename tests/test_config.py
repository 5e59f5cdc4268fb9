"""Config loading, overrides, round trips and the clear errors for every cross-field rule."""

import glob
import os

import pytest

from tidar_jax.config import (ConfigError, config_from_dict, load_config, replace, to_dict, validate_backend,
                              validate_training)


def test_every_preset_loads(repo_root):
    paths = sorted(glob.glob(os.path.join(repo_root, "configs", "*.yaml")))
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path)
        assert cfg.data.seq_len % cfg.model.block_size == 0


def test_overrides_apply_with_types(repo_root):
    cfg = load_config(os.path.join(repo_root, "configs", "tiny.yaml"),
                      ["model.n_layers=3", "train.learning_rate=1e-4", "decode.prompt_buckets=[8,32]"])
    assert cfg.model.n_layers == 3
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert tuple(cfg.decode.prompt_buckets) == (8, 32)


def test_dict_round_trip(tiny_config):
    assert config_from_dict(to_dict(tiny_config)) == tiny_config


@pytest.mark.parametrize("overrides, field", [
    (["data.seq_len=66"], "data.seq_len"),
    (["model.n_heads=3"], "model.n_heads"),
    (["model.mask_token_id=512"], "model.mask_token_id"),
    (["model.eos_token_id=-1"], "model.eos_token_id"),
    (["model.head_dim=15"], "model.head_dim"),
    (["model.compute_dtype=float8"], "model.compute_dtype"),
    (["model.remat=true", "model.remat_policy=everything"], "model.remat_policy"),
    (["model.remat_policy=dots_saveable"], "model.remat_policy=dots_saveable has no effect without model.remat"),
    (["train.objective=mlm"], "train.objective"),
    (["train.draft_targets=logits"], "train.draft_targets"),
    (["train.draft_targets=soft", "train.loss_chunk_rows=64"], "train.draft_targets=soft needs"),
    (["train.draft_targets=soft", "train.objective=ar"], "train.draft_targets=soft distils"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh axis"),
    (["decode.beta=1.5"], "decode.beta"),
    (["decode.top_p=0"], "decode.top_p"),
    (["decode.prompt_buckets=[64,16]"], "decode.prompt_buckets"),
    (["decode.max_cache_len=100"], "decode.max_cache_len"),
    (["data.global_batch_size=6", "train.grad_accum_steps=4"], "train.grad_accum_steps"),
    (["model.nonexistent=1"], "model.nonexistent"),
    (["model.n_layers=two"], "model.n_layers"),
    (["model.n_layers"], "section.field=value"),
])
def test_bad_config_names_the_field(repo_root, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(os.path.join(repo_root, "configs", "tiny.yaml"), overrides)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {d_model: 64\n  n_layers: [\n")
    with pytest.raises(ConfigError, match="cannot parse") as e:
        load_config(broken)
    assert "\n" not in str(e.value)  # YAML's multi-line report folded into one line


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),  # used to train the defaults silently
    ("# only a comment\n", "is empty"),
    ("model: 3\n", "section model must be a mapping"),
    ("data: [1, 2]\n", "section data must be a mapping"),
    ("model:\n  d_modl: 64\n", "model.d_modl: Key 'd_modl' not in 'ModelConfig'"),
    ("modle:\n  d_model: 64\n", "modle: Key 'modle' not in 'Config'"),
    ("model:\n  d_model: sixty\n", "model.d_model: Value 'sixty'"),
])
def test_yaml_shape_errors_are_one_line_naming_the_section(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_override_errors_are_one_line():
    for overrides, message in ((["decode.nonsense=1"], "decode.nonsense: Key 'nonsense'"),
                               (["model=3"], "overrides: section model must be a mapping")):
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)


CUDNN_IMPLS = ["cudnn", "cudnn_hybrid"]  # both run cuDNN flash attention (cudnn_hybrid on its causal clean half)


def cudnn_ok(impl):
    return [f"model.attention_impl={impl}", "model.compute_dtype=bfloat16"]


@pytest.mark.parametrize("impl", CUDNN_IMPLS)
@pytest.mark.parametrize("extra, message", [
    (["model.compute_dtype=float32"], "model.compute_dtype in"),  # float32 used to fail while tracing
    (["model.head_dim=12", "model.d_model=48"], "multiple of 8"),
    (["model.head_dim=264"], "at most 256"),
    # 12 query / 2 KV heads on tensor=4: q split, k/v replicated, which cuDNN's partitioner refuses.
    (["model.n_heads=12", "model.n_kv_heads=2", "mesh.tensor=4"], "sharded alike"),
])
def test_cudnn_configs_that_cannot_work_are_refused_at_load(impl, extra, message):
    with pytest.raises(ConfigError, match=f"model.attention_impl={impl} needs .*{message}"):
        load_config(None, cudnn_ok(impl) + extra)


def test_float32_refusal_names_the_float32_alternative():
    for impl, alternative in (("cudnn", "xla"), ("cudnn_hybrid", "blockwise")):
        with pytest.raises(ConfigError, match=f"no float32 kernel.*use attention_impl={alternative} for float32"):
            load_config(None, [f"model.attention_impl={impl}"])


@pytest.mark.parametrize("impl", CUDNN_IMPLS)
def test_cudnn_configs_that_can_work_load_anywhere(impl):
    for extra in ([], ["model.compute_dtype=float16", "model.head_dim=256"],
                  ["model.n_heads=12", "model.n_kv_heads=4", "mesh.tensor=4"],  # both split over tensor
                  ["model.n_heads=12", "model.n_kv_heads=2", "mesh.tensor=8"],  # neither: both replicated
                  ["model.n_heads=12", "model.n_kv_heads=2", "mesh.data=1", "mesh.tensor=-1"]):  # resolved later
        assert load_config(None, cudnn_ok(impl) + extra).model.attention_impl == impl
    assert load_config(None, ["model.n_heads=12", "model.n_kv_heads=2", "mesh.tensor=4"])  # xla: any split works


@pytest.mark.parametrize("impl", CUDNN_IMPLS)
def test_backend_checks_where_the_model_is_compiled(impl):
    cudnn = load_config(None, cudnn_ok(impl) + ["model.n_heads=12", "model.n_kv_heads=2", "model.head_dim=192",
                                                "model.d_model=96"]).model
    with pytest.raises(ConfigError, match=f"attention_impl={impl} needs a GPU backend.*'cpu'"):
        validate_backend(cudnn, "cpu", 1)
    with pytest.raises(ConfigError, match="needs a GPU backend.*'tpu'"):
        validate_backend(cudnn, "tpu", 1)
    validate_backend(cudnn, "gpu", 1, "9.0")  # Hopper: head dim up to 256
    for capability in ("8.0", None):  # Ampere, and ROCm (no CUDA capability): up to 128
        with pytest.raises(ConfigError, match="head_dim <= 128"):
            validate_backend(cudnn, "gpu", 1, capability)
    with pytest.raises(ConfigError, match="sharded alike"):  # mesh.tensor=-1 came out as 4 on this machine
        validate_backend(cudnn, "gpu", 4, "9.0")
    validate_backend(load_config(None, ["model.n_heads=12", "model.n_kv_heads=2"]).model, "cpu", 4)  # xla


def test_low_precision_params_need_an_explicit_opt_in_for_training():
    bf16 = load_config(None, ["model.param_dtype=bfloat16"])  # loads: inference of bf16 checkpoints is fine
    assert config_from_dict(to_dict(bf16)).model.param_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="train.allow_low_precision_params=true"):
        validate_training(bf16)
    with pytest.raises(ConfigError, match="float16"):
        validate_training(load_config(None, ["model.param_dtype=float16"]))
    allowed = load_config(None, ["model.param_dtype=bfloat16", "train.allow_low_precision_params=true"])
    assert validate_training(allowed) is allowed
    assert validate_training(load_config(None, ["model.compute_dtype=bfloat16"]))  # float32 params, bf16 compute


def test_replace_validates(tiny_config):
    assert replace(tiny_config, model={"n_layers": 3}).model.n_layers == 3
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        replace(tiny_config, model={"n_kv_heads": 3})


def test_apply_overrides_on_a_loaded_config(tiny_config):
    from tidar_jax.config import apply_overrides

    cfg = apply_overrides(tiny_config, ["train.steps=7", "decode.beta=0.5"])
    assert (cfg.train.steps, cfg.decode.beta, cfg.model) == (7, 0.5, tiny_config.model)
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(tiny_config, ["train.steps=seven"])
