"""`python -m infer.tune` in-process on a tiny random TiDAR checkpoint: it writes decode_tuning.json, a second run
reads the step costs from this machine's cache, infer.generate and infer.bench use the file (auto == AR tokens,
expected next to measured; the bench run is in the slow set, its table is checked on an injected report), and bad
input exits 2 with one line. The timings themselves are not checked."""

import json

import pytest
from test_eval import corpus, make_run, token_cache  # noqa: F401  (fixtures shared with the eval tests)

from infer import bench, generate, tune
from tidar_jax.decoding import tuning
from tidar_jax.evals import bench_report, step_timing

FLAGS = ["--num-prompts", "2", "--prompt-len", "8", "--max-new-tokens", "8", "--repeats", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config, corpus):  # noqa: F811
    return make_run(tmp_path_factory, tiny_config, corpus, "tune")[0]


def _main(fn, argv, capsys):
    try:
        code = fn(argv)
    except SystemExit as e:  # argparse's parser.error
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_writes_the_file_that_auto_decodes_with(run, tmp_path, capsys, monkeypatch):
    code, out, err = _main(tune.main, ["--checkpoint", str(run), "--block-sizes", "2",
                                       "--json", str(tmp_path / "tune.json"), *FLAGS], capsys)
    assert code == 0, err
    assert out.count("<- auto") == 1 and "wrote" in out
    t = tuning.read_tuning(run)
    profile = t.profile("float32")
    assert sorted(profile.costs) == [1] and sum(t.histogram) > 0
    assert sorted(profile.costs[1].tidar) == [(2, 1), (2, 2)]
    report = json.loads((tmp_path / "tune.json").read_text())
    chosen = report["batches"]["1"]["chosen"]
    assert chosen == max(report["batches"]["1"]["options"], key=lambda o: o["expected_tokens_per_second"])
    # A second run measures the acceptance again but reads every step cost from this machine's cache.
    monkeypatch.setattr(step_timing, "_runner", lambda *a: pytest.fail("step timed again"))
    code, _, err = _main(tune.main, ["--checkpoint", str(run), "--block-sizes", "2", *FLAGS], capsys)
    assert code == 0, err
    monkeypatch.undo()
    # infer.generate with auto decodes the tuned choice for batch 1.
    gen = ["--checkpoint", str(run), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "8", "--json"]
    code, out, err = _main(generate.main, gen + ["decode.block_size=auto", "decode.proposal_lengths=auto"], capsys)
    assert code == 0, err
    auto = json.loads(out)
    expected = tuning.resolve(tuning.read_tuning(run), *_configs(run), 1).best
    assert (auto["block_size"], auto["proposal_lengths"]) == (expected.block_size, list(expected.proposal_lengths))


@pytest.mark.slow  # a tune and a bench run: ~15 s on 2 busy cores
def test_bench_shows_expected_next_to_measured(run, tmp_path, capsys):
    code, _, err = _main(tune.main, ["--checkpoint", str(run), "--block-sizes", "2", *FLAGS], capsys)
    assert code == 0, err
    code, out, err = _main(bench.main, ["--checkpoint", str(run), "--batch-sizes", "1", "--repeats", "1",
                                        "--prompt-len", "8", "--max-new-tokens", "4", "--skip-latency",
                                        "--no-progress", "--json", str(tmp_path / "bench.json")], capsys)
    assert code == 0, err
    assert "tidar auto" in out and "expected" in out
    methods = json.loads((tmp_path / "bench.json").read_text())["generation"][0]["methods"]
    assert all(methods[name]["expected_tokens_per_second"] > 0 for name in ("ar", "tidar auto"))
    assert methods["tidar"]["expected_tokens_per_second"] is None  # K = 4 was not tuned: no extrapolation
    assert methods["tidar auto"]["same_tokens_as_ar"] is True


def test_bench_table_puts_expected_next_to_measured():
    method = {"tokens_per_second": 90.0, "speedup_vs_ar": 1.0, "tokens_per_forward": 1.0, "forwards": 9,
              "agreement": {"verdict": "exact"}}
    group = {"label": "run (tidar, K=4)", "block_size": 4, "batch_size": 1, "auto_step": [2, [1]],
             "step_cost": {"tidar_over_ar": {"flops": 2.0, "bytes": 1.1}}, "ar_baseline": "ar",
             "methods": {"ar": {**method, "expected_tokens_per_second": 100.0},
                         "tidar": {**method, "expected_tokens_per_second": None},
                         "tidar auto": {**method, "tokens_per_second": 120.0, "expected_tokens_per_second": 130.0}}}
    lines = bench_report.format_tables({"generation": [group]}).splitlines()
    assert "expected" in lines[2] and lines[2].index("tokens/s") < lines[2].index("expected")
    rows = {line.split()[0] + (" auto" if " auto " in line else ""): line.split() for line in lines[3:6]}
    assert rows["ar"][1:3] == ["90.0", "100.0"] and rows["tidar"][1:3] == ["90.0", "-"]
    assert rows["tidar auto"][2:4] == ["120.0", "130.0"]
    assert lines[6].startswith("  expected:") and lines[7].endswith("K=2 A=[1]")


def _configs(run):
    from tidar_jax.checkpoint.inference import load_for_inference
    from tidar_jax.config import apply_overrides

    cfg = apply_overrides(load_for_inference(run).config, ["decode.block_size=auto", "decode.proposal_lengths=auto"])
    return cfg.model, cfg.decode


def test_bad_input_exits_2_with_one_line(run, tmp_path_factory, tiny_config, corpus, capsys):  # noqa: F811
    fresh = make_run(tmp_path_factory, tiny_config, corpus, "untuned")[0]
    for fn, argv, message in [
            (tune.main, ["--checkpoint", str(fresh), "--block-sizes", "9", *FLAGS], "must be in 2..4"),
            (tune.main, ["--checkpoint", str(fresh), "--block-sizes", "1", *FLAGS], "must be >= 2"),
            (tune.main, ["--checkpoint", str(fresh), "train.steps=3", *FLAGS], "must look like decode.field"),
            (generate.main, ["--checkpoint", str(fresh), "--prompt-ids", "5,6", "decode.block_size=auto"],
             "decode_tuning.json not found.*infer.tune"),
            (generate.main, ["--checkpoint", str(fresh), "--prompt-ids", "5,6", "decode.proposal_lengths=fast"],
             "proposal_lengths must be a list of acceptance lengths or 'auto'")]:
        code, _, err = _main(fn, argv, capsys)
        assert code == 2 and message.split(".*")[0] in err and "Traceback" not in err, (argv, err)
        assert err.strip().splitlines()[-1].count("error") == 1  # one line (argparse prints its usage first)
    foreign = fresh / tuning.FILE_NAME
    foreign.write_text('{"mine": true}')
    code, _, err = _main(tune.main, ["--checkpoint", str(fresh), *FLAGS], capsys)
    assert code == 2 and "not a tidar-jax decode tuning file" in err and "move it away" in err
    assert foreign.read_text() == '{"mine": true}'
    code, _, err = _main(generate.main, ["--checkpoint", str(fresh), "--prompt-ids", "5,6",
                                         "decode.block_size=auto"], capsys)
    assert code == 2 and "not a tidar-jax decode tuning file" in err


def test_step_timing_runs_whole_loop_calls_from_one_prefilled_state(run):
    """The timed unit is a call of the real decode loop: every call runs exactly its forwards (no row finishes) from
    a copy of the same prefilled state, so repeated calls time the same work; a cache without room is refused."""
    import dataclasses

    from tidar_jax.checkpoint.inference import load_for_inference
    from tidar_jax.decoding.generation import Generator

    bundle = load_for_inference(run)
    gen = Generator(bundle.graphdef, bundle.params, bundle.config.model, bundle.config.decode)
    for step in [(1, ()), (4, (1, 2))]:
        calls = step_timing._runner(gen, 2, step, 5)
        for n in (1, 5):
            assert [int(calls[n](r)) for r in range(3)] == [1 + n] * 3  # the prefill is forward 1
    small = dataclasses.replace(bundle.config.decode, max_cache_len=bundle.config.decode.prompt_buckets[0] + 8)
    with pytest.raises(ValueError, match="cache slots"):
        step_timing._runner(Generator(bundle.graphdef, bundle.params, bundle.config.model, small), 1, (4, ()), 5)


def test_step_cost_is_the_difference_per_forward_and_never_zero():
    n = step_timing.LOOP_FORWARDS
    assert step_timing._per_step(0.010, 0.010 + n * 0.002) == pytest.approx(0.002)
    # Noise hid the difference (a long call no slower than a short one): the long call's time per forward.
    assert step_timing._per_step(0.010, 0.009) == pytest.approx(0.009 / (1 + n))
