"""infer/bench.py and tidar_jax/evals/benchmark.py: one smoke run of the CLI on tiny random checkpoints (TiDAR, AR and an
AR draft model), the latency curve's contract, and the interleaving order of timed runs."""

import json
import math
import shutil

import numpy as np
import pytest
from flax import nnx
from test_eval import corpus, make_run, token_cache  # noqa: F401  (fixtures shared with the eval tests)

from infer import bench
from tidar_jax.evals import benchmark
from tidar_jax.model.transformer import create_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config, corpus):  # noqa: F811
    draft_model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
    return {"tidar": make_run(tmp_path_factory, tiny_config, corpus, "tidar"),
            "ar": make_run(tmp_path_factory, tiny_config, corpus, "ar", objective="ar", seed=1),
            "draft": make_run(tmp_path_factory, tiny_config, corpus, "draft", objective="ar", model=draft_model,
                              seed=2)}


@pytest.mark.slow  # ~40 s; the bench CLI's other tests stay fast (default suite under 10 min on 2 cores)
def test_bench_cli_smoke(runs, tmp_path, capsys):
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    argv = ["--checkpoint", str(runs["tidar"][0]), str(runs["ar"][0]), "--draft", str(runs["draft"][0]),
            "--batch-sizes", "1", "2", "--repeats", "2", "--prompt-len", "8", "--max-new-tokens", "6",
            "--latency-prefixes", "16", "--latency-queries", "1", "3", "--latency-repeats", "2", "--no-progress",
            "--proposal-sets", "1", "--json", str(out), "--plot-dir", str(plots)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert table.count("same tokens as AR") == 4 and "False" not in table and "near-tie" not in table
    report = json.loads(out.read_text())
    groups = report["generation"]
    assert [(g["objective"], g["batch_size"]) for g in groups] == [("tidar", 1), ("tidar", 2), ("ar", 1), ("ar", 2)]
    for g in groups:
        methods = g["methods"]
        assert set(methods) == ({"ar", "tidar", "tidar{1}", "spec"} if g["objective"] == "tidar" else {"ar", "spec"})
        assert methods["ar"]["speedup_vs_ar"] == 1.0 and methods["ar"]["tokens_per_forward"] == 1.0
        for name, s in methods.items():
            assert s["same_tokens_as_ar"] is True, name  # greedy TiDAR and speculative decoding are lossless
            a = s["agreement"]  # float32: every distinct (prompt, output) row exact, no recompute needed
            assert (s["exact_match_rows"], s["near_tie_rows"], s["mismatch_rows"]) == (a["rows"], 0, 0), name
            # batch 1: one prompt per round (2 rounds, 2 rows); batch 2: the same 2 prompts each round, judged once
            assert a["rows"] == 2 and a["strict_ok"] and a["divergences"] == []
            assert len(s["tokens_per_second_all"]) == 2
            assert all(math.isfinite(t) and t > 0 for t in s["tokens_per_second_all"])
            assert s["tokens_per_second"] == pytest.approx(float(np.median(s["tokens_per_second_all"])))
            assert 1.0 <= s["tokens_per_forward"] <= g["block_size"]
            assert s["new_tokens"] == 6 * g["batch_size"]
        spec = methods["spec"]
        assert spec["draft_forwards"] == 1 + (spec["forwards"] - 1) * (g["block_size"] - 1)
        assert g["compute_dtype"] == "float32" and g["matmul_precision"] == "highest"
    curve = report["latency"]["curves"]["16"]
    assert [p["query_tokens"] for p in curve] == [1, 3] and all(p["median_ms"] > 0 for p in curve)
    for name in ("bench_speedup.png", "bench_latency.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_modes_run_as_rows_against_the_fastest_ar(runs, tmp_path, capsys):
    """--cpu-kernels on off: every method once per mode, all lossless; the speed-up baseline is the AR row with the
    highest median tokens/s (itself exactly 1.0x)."""
    out = tmp_path / "bench.json"
    argv = ["--checkpoint", str(runs["tidar"][0]), "--batch-sizes", "1", "--repeats", "2", "--prompt-len", "8",
            "--max-new-tokens", "6", "--skip-latency", "--no-progress", "--cpu-kernels", "on", "off",
            "--json", str(out)]
    assert bench.main(argv) == 0
    assert "the fastest AR measured" in capsys.readouterr().out
    (group,) = json.loads(out.read_text())["generation"]
    methods = group["methods"]
    assert set(methods) == {"ar [on]", "ar [off]", "tidar [on]", "tidar [off]"}
    fastest = max(("ar [on]", "ar [off]"), key=lambda n: methods[n]["tokens_per_second"])
    assert group["ar_baseline"] == fastest and methods[fastest]["speedup_vs_ar"] == 1.0
    assert all(s["same_tokens_as_ar"] for s in methods.values())


def test_block_size_other_than_trained_needs_the_flag(runs, capsys):
    argv = ["--checkpoint", str(runs["tidar"][0]), "--block-sizes", "2", "--skip-latency", "--no-progress",
            "--prompt-len", "8"]
    assert bench.main(argv) == 2
    assert "--allow-block-size-mismatch" in capsys.readouterr().err


def test_step_loads_an_earlier_step_after_a_corrupt_save(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["tidar"][0], run)
    shutil.copytree(run / "checkpoints" / "0", run / "checkpoints" / "1")
    shutil.rmtree(run / "checkpoints" / "1" / "state")  # the newest save lost its arrays
    argv = ["--checkpoint", str(run), "--skip-generation", "--latency-prefixes", "8", "--latency-queries", "1",
            "--latency-repeats", "1", "--no-progress"]
    assert bench.main(argv) == 2
    assert "checkpoints/1 is incomplete" in capsys.readouterr().err
    assert bench.main(argv + ["--step", "5"]) == 2
    assert "--step 5 is not saved" in capsys.readouterr().err
    assert bench.main(argv + ["--step", "0", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["latency"]["checkpoint_step"] == 0


def test_latency_curve_gives_one_timing_per_query_count(tiny_config):
    graphdef, params = nnx.split(create_model(tiny_config.model))
    counts = [5, 1, 2]
    curve = benchmark.forward_latency_curve(graphdef, params, tiny_config.model, prefix_len=8, query_counts=counts,
                                            repeats=3)
    assert [p["query_tokens"] for p in curve] == counts
    for p in curve:
        assert len(p["times_ms"]) == 3 and p["median_ms"] == pytest.approx(float(np.median(p["times_ms"])))
        assert 0 < p["min_ms"] <= p["median_ms"]
    with pytest.raises(ValueError, match="positive"):
        benchmark.forward_latency_curve(graphdef, params, tiny_config.model, prefix_len=8, query_counts=[0])


def test_interleaved_warms_up_then_alternates_order():
    calls = []
    runners = {name: (lambda r, name=name: calls.append((name, r)) or r) for name in ("a", "b", "c")}
    runs = benchmark.interleaved(runners, repeats=3, warmup=1)
    assert calls == [("a", 0), ("b", 0), ("c", 0),  # warm-up round, untimed
                     ("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert {name: [res for _, res in v] for name, v in runs.items()} == {n: [0, 1, 2] for n in "abc"}
    assert all(sec >= 0 for v in runs.values() for sec, _ in v)


def test_cost_only_needs_no_checkpoint(tmp_path, capsys):
    """--cost-only on configs/tiny.yaml: positive figures, the TiDAR step costs more FLOPs than the AR step, roughly
    2 * params * query rows (loose: attention over the cache and elementwise work add to it)."""
    out = tmp_path / "cost.json"
    argv = ["--cost-only", "--config", "configs/tiny.yaml", "--cache-len", "64", "--prompt-bucket", "16",
            "--peak-tflops", "1", "--bandwidth-gbs", "100", "--proposal-sets", "1,2", "--json", str(out)]
    assert bench.main(argv) == 0
    assert "TiDAR step / AR step" in capsys.readouterr().out
    report = json.loads(out.read_text())
    cost, k = report["step_cost"], report["block_size"]
    for name in ("tidar_step", "ar_step", "prefill"):
        f = cost[name]
        assert f["gflop"] > 0 and f["gb_accessed"] > 0 and f["roofline_ms"] > 0
        estimate = 2 * cost["params"] * f["query_rows"] / 1e9
        assert 0.3 * estimate < f["gflop"] < 4 * estimate, (name, f["gflop"], estimate)
    assert cost["tidar_step"]["query_rows"] == k + k * k and cost["ar_step"]["query_rows"] == 1
    assert cost["tidar_over_ar"]["flops"] > 0.3 * (k + k * k)
    sparse = report["sparse_step_costs"]["tidar{1,2}"]  # a sparse proposal set: K + 2K rows, fewer FLOPs
    assert sparse["tidar_step"]["query_rows"] == 3 * k and sparse["tidar_step"]["gflop"] < cost["tidar_step"]["gflop"]


def test_cost_only_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--cost-only"])  # needs --config
    with pytest.raises(SystemExit):
        bench.parse_args([])  # needs --checkpoint
    assert bench.main(["--cost-only", "--config", "configs/tiny.yaml", "--override", "model.scan_layers=maybe"]) == 2
