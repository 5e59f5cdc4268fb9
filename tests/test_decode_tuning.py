"""decode.block_size=auto / decode.proposal_lengths=auto: the tuning file (decoding/tuning.py), its resolution per
batch bucket in a Generator, lossless greedy decoding with every choice, the step-cost cache, and infer.tune.

Step costs are injected (never timed) except in the infer.tune run, whose numbers are not checked."""

import dataclasses
import json
import warnings

import pytest
from test_decode import MAX_NEW, RAGGED, cfg, trained_params  # noqa: F401  (fixtures shared with test_decode)

from tidar_jax.config import ConfigError, apply_overrides
from tidar_jax.decoding import step_choice, tuning
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.step_choice import StepCosts

HISTOGRAM = (0, 30, 20, 10, 40)
# Batch 1: steps barely cost more with more query tokens, so the full K = 4 set wins. Batch 4: query tokens are
# expensive, so a small step wins (with these costs K' = 3 with the set {1}).
FLAT = StepCosts(ar=1.0, tidar={(k, m): 1.0 + 0.001 * k * (1 + m) for k in (2, 3, 4) for m in range(1, k + 1)})
STEEP = StepCosts(ar=1.0, tidar={(k, m): 1.0 + 0.2 * k * (1 + m) for k in (2, 3, 4) for m in range(1, k + 1)})


def _tuning(tmp_path, model_cfg, costs=None, machine=None):
    t = tuning.with_measurements(None, tmp_path / tuning.FILE_NAME, model_cfg, 7, HISTOGRAM,
                                 {"prompts": "test", "num_prompts": 3}, costs or {1: FLAT, 4: STEEP},
                                 {"device": "test machine"})
    if machine is not None:  # the profile as if measured on another machine
        (key, profile), = t.profiles.items()
        t = dataclasses.replace(t, profiles={tuning.profile_key(machine, profile.compute_dtype):
                                             dataclasses.replace(profile, machine=machine)})
    return t


def _auto(cfg, **decode):
    return dataclasses.replace(cfg.decode, batch_buckets=(1, 2, 4), **decode)


def test_tuning_file_round_trip(tmp_path, cfg):
    t = _tuning(tmp_path, cfg.model)
    tuning.write_tuning(t)
    back = tuning.read_tuning(tmp_path)  # a workdir names its decode_tuning.json
    assert back == t and back.to_json() == json.loads((tmp_path / tuning.FILE_NAME).read_text())
    # A new measurement on another machine keeps this one's profile (same model); another model's are dropped.
    other = dataclasses.replace(_tuning(tmp_path, cfg.model, machine="feedfacecafebeef"))
    merged = tuning.with_measurements(other, t.path, cfg.model, 8, HISTOGRAM, {}, {1: FLAT}, {})
    assert len(merged.profiles) == 2 and merged.checkpoint_step == 8
    bigger = dataclasses.replace(cfg.model, d_model=128)
    assert len(tuning.with_measurements(other, t.path, bigger, 8, HISTOGRAM, {}, {1: FLAT}, {}).profiles) == 1


def test_auto_resolves_per_batch_bucket_and_stays_lossless(tmp_path, cfg, trained_params):
    t = _tuning(tmp_path, cfg.model)
    graphdef, params = trained_params
    gen = Generator(graphdef, params, cfg.model, _auto(cfg, block_size="auto", proposal_lengths="auto"), tuning=t)
    flat = step_choice.choose(HISTOGRAM, FLAT, 1)
    steep = step_choice.choose(HISTOGRAM, STEEP, 4)
    assert (flat.best.block_size, flat.best.proposal_lengths) == (4, (1, 2, 3, 4))
    assert steep.best.block_size < 4 and len(steep.best.proposal_lengths) < steep.best.block_size  # K' < K, sparse
    assert gen.step_shape(1) == gen.step_shape(2) == (4, (1, 2, 3, 4))  # bucket 2 uses the batch-1 costs
    assert gen.step_shape(3) == (steep.best.block_size, steep.best.proposal_lengths)  # bucket 4
    assert gen.block_size == cfg.model.block_size
    ar = Generator(graphdef, params, cfg.model, _auto(cfg))
    for prompts in (RAGGED[:1], RAGGED):
        out = gen.generate(prompts, "tidar", MAX_NEW)
        assert out.tokens == ar.generate(prompts, "ar", MAX_NEW).tokens  # greedy beta = 1: exactly AR
        assert (out.block_size, out.proposal_lengths) == gen.step_shape(len(prompts))
        assert sum(out.acceptance_histogram[2:]) > 0


def test_one_auto_field_keeps_the_other_fixed(tmp_path, cfg, trained_params):
    t = _tuning(tmp_path, cfg.model, {1: STEEP})
    graphdef, params = trained_params
    k_auto = Generator(graphdef, params, cfg.model, _auto(cfg, block_size="auto"), tuning=t)
    k, lengths = k_auto.step_shape(1)
    assert lengths == tuple(range(1, k + 1))  # the full set of the chosen K'
    set_auto = Generator(graphdef, params, cfg.model, _auto(cfg, block_size=3, proposal_lengths="auto"), tuning=t,
                         allow_block_size_mismatch=True)
    assert set_auto.step_shape(1)[0] == 3
    ar = Generator(graphdef, params, cfg.model, _auto(cfg)).generate(RAGGED, "ar", MAX_NEW)
    assert set_auto.generate(RAGGED, "tidar", MAX_NEW).tokens == ar.tokens


def test_bad_tuning_gives_clear_errors(tmp_path, cfg, trained_params):
    graphdef, params = trained_params
    dec = _auto(cfg, block_size="auto")
    with pytest.raises(tuning.TuningError, match="infer.tune"):
        Generator(graphdef, params, cfg.model, dec)
    with pytest.raises(tuning.TuningError, match="not found.*infer.tune"):
        tuning.read_tuning(tmp_path)
    assert tuning.for_decode(cfg.decode, tmp_path) is None  # no auto: the file is not read at all
    path = tmp_path / tuning.FILE_NAME
    for text, message in (("{", "damaged"), ('{"a": 1}', "not a tidar-jax decode tuning file"),
                          ('{"format": "tidar-jax decode tuning", "version": 99}', "version 99"),
                          ('{"format": "tidar-jax decode tuning", "version": 1, "model": {}}', "damaged")):
        path.write_text(text)
        with pytest.raises(tuning.TuningError, match=message):
            tuning.for_decode(dec, tmp_path)
    bad = _tuning(tmp_path, cfg.model).to_json()
    bad["profiles"][next(iter(bad["profiles"]))]["step_costs"]["1"]["ar_seconds"] = -1
    path.write_text(json.dumps(bad))
    with pytest.raises(tuning.TuningError, match="damaged.*positive"):
        tuning.read_tuning(path)
    with pytest.raises(tuning.TuningError, match="another model.*model.d_model"):
        Generator(graphdef, params, cfg.model, dec, tuning=_tuning(tmp_path, dataclasses.replace(cfg.model,
                                                                                                 d_model=128)))
    with pytest.raises(ConfigError, match="decode.block_size must be >= 0.*'auto', got 'fast'"):
        apply_overrides(cfg, ["decode.block_size=fast"])
    with pytest.raises(ConfigError, match="proposal_lengths=auto may choose a sparse set.*beta=1"):
        apply_overrides(cfg, ["decode.proposal_lengths=auto", "decode.beta=0.5"])


def test_another_machines_costs_are_used_with_a_warning(tmp_path, cfg, trained_params):
    graphdef, params = trained_params
    t = _tuning(tmp_path, cfg.model, machine="feedfacecafebeef")
    gen = Generator(graphdef, params, cfg.model, _auto(cfg, block_size="auto"), tuning=t)
    with pytest.warns(UserWarning, match="no step costs measured on this machine.*test machine"):
        gen.step_shape(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Generator(graphdef, params, cfg.model, _auto(cfg, block_size="auto"),
                  tuning=_tuning(tmp_path, cfg.model)).step_shape(1)
        tuning.write_tuning(_tuning(tmp_path, cfg.model))
        tuning.for_decode(_auto(cfg, block_size="auto"), tmp_path, 7)
    with pytest.warns(UserWarning, match="measured at checkpoint step 7, decoding step 9"):
        tuning.for_decode(_auto(cfg, block_size="auto"), tmp_path, 9)



@pytest.mark.slow  # one program per option: ~10 compiles
def test_every_option_auto_can_choose_decodes_ar_tokens(cfg, trained_params):
    """Auto decodes one of its table's options (the resolution is tested above): each option of a K = 4 table,
    K' = 2..4 with the best set of every size, decodes exactly AR's greedy tokens."""
    graphdef, params = trained_params
    ar = Generator(graphdef, params, cfg.model, _auto(cfg)).generate(RAGGED, "ar", MAX_NEW)
    table = step_choice.choose(HISTOGRAM, FLAT, 1).table
    assert len(table) == 9
    for option in table:
        dec = _auto(cfg, block_size=option.block_size, proposal_lengths=option.proposal_lengths)
        out = Generator(graphdef, params, cfg.model, dec, allow_block_size_mismatch=True).generate(RAGGED, "tidar",
                                                                                                  MAX_NEW)
        assert out.tokens == ar.tokens and out.proposal_lengths == option.proposal_lengths, option
