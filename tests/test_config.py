"""Config loading, overrides, round trips and the clear errors for every cross-field rule."""

import glob
import os

import pytest

from tidar_jax.config import ConfigError, config_from_dict, load_config, replace, to_dict


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
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(broken)


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
