"""Speed benchmark: TiDAR vs AR (vs draft-model speculative decoding) and the forward-latency curve, in one run.

    python -m infer.bench --checkpoint runs/tidar-k4 runs/tidar-k8 runs/ar --draft runs/draft \\
        --json docs/results/bench.json --plot-dir docs
    python -m infer.bench --checkpoint runs/tidar-k4 --block-sizes 2 4 8 --allow-block-size-mismatch
    python -m infer.bench --checkpoint runs/tidar-k4 --skip-generation --latency-prefixes 512 2048
    python -m infer.bench --checkpoint runs/tidar-k4 --proposal-sets 1 1,2 --batch-sizes 1 --skip-latency

Generation: for every checkpoint, decode block size K and batch size, greedy decoding of the same held-out prompts
(batch 1 cycles through them, one per repeat) runs in each method: `ar` (one token per forward), `tidar` (for
tidar-objective checkpoints) and `spec` (with --draft: the draft model proposes K-1 tokens, the checkpoint
verifies K per forward). Every method is compiled and run once first; then --repeats rounds alternate the methods'
order, and medians are reported. The speed-up of a method is the median over rounds of its tokens/s divided by AR's
tokens/s in the same round. A fair K sweep uses checkpoints trained with each K; decoding with another K than the
trained one needs --allow-block-size-mismatch. --proposal-sets adds TiDAR with sparse proposal sets (proposals.py),
e.g. `tidar{1,2}`: each step computes proposal blocks only for those acceptance lengths (K + |A|*K query tokens);
`infer.eval` suggests a set from the full set's acceptance histogram. "Same tokens as AR": True (every row exact),
near-tie (each differing row first differs where AR's recomputed top-2 logit gap is below the --near-tie-epsilon
tolerance: a low-precision argmax flip) or False (tidar_jax/evals/agreement.py); float32 models decode at "highest"
matmul precision (--matmul-precision), so that check stays strict on GPUs, whose float32 default is TF32.
With WORKDIR/decode_tuning.json (infer.tune): a `tidar auto` row (decode.*=auto) and each row's expected tokens/s
next to the measured (for the batch sizes it tuned).

Latency curve: one cached forward of q causal query tokens (q = 1 .. 512) over a KV cache holding a prefix of 512
and 2048 tokens, timed the same way: it shows how many tokens a forward can carry almost for free (TiDAR's step
has K + K*K query tokens).

Step cost (--cost-only, no checkpoint, no weights): the compiled cost analysis of the real decode programs for a
config's model shape, lowered on abstract params (jax.ShapeDtypeStruct), so nothing is allocated:

    python -m infer.bench --cost-only --config configs/qwen2.5-1.5b.yaml --block-size 16 --cache-len 4096 \
        --batch-size 1 --peak-tflops 989 --bandwidth-gbs 4800 --json docs/results/cost.json

prints GFLOP, GB accessed, FLOP/byte and (with --peak-tflops and --bandwidth-gbs) the roofline time of one TiDAR
step (K + K*K query rows), one AR step (1 row) and the prefill of a prompt bucket, and the TiDAR / AR step ratio.
Generation groups carry the same figures for their shape ("step_cost" in the JSON).

Everything runs on one device (the first visible one), CPU or GPU alike. Outputs: a table on stdout, --json, and
PLOT_DIR/bench_speedup.png, PLOT_DIR/bench_latency.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from infer.common import PROMPT_SET_HELP, PROMPT_SETS

    parser = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+",
                        help="one or more training WORKDIRs (or step directories), all with the same tokenizer "
                             "(required unless --cost-only)")
    parser.add_argument("--step", type=int,
                        help="load this saved step of every --checkpoint (and --latency-checkpoint) instead of the "
                             "latest, e.g. after a corrupt save; the --draft model stays at its latest step")
    parser.add_argument("--draft", help="WORKDIR of a small AR draft model (same tokenizer) for the speculative-"
                                        "decoding baseline")
    parser.add_argument("--block-sizes", type=int, nargs="+",
                        help="decode block sizes K (default: each checkpoint's trained K)")
    parser.add_argument("--allow-block-size-mismatch", action="store_true",
                        help="allow --block-sizes other than a checkpoint's trained K (its drafts were not trained "
                             "for them)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to decode")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per held-out corpus prompt")
    parser.add_argument("--prompts", choices=PROMPT_SETS, default="corpus", help=PROMPT_SET_HELP)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--proposal-sets", nargs="+", metavar="J,J,..",
                        help="also decode TiDAR with these sparse proposal sets (comma-separated acceptance lengths "
                             "that include 1, e.g. 1 1,2 1,2,4); with --cost-only, also cost their steps")
    parser.add_argument("--near-tie-epsilon", type=float, metavar="LOGITS",
                        help="a method's first divergence from AR's tokens counts as a near-tie when AR's top-2 "
                             "logit gap there is below this (default: 4 x the compute dtype's eps x max|logit|; "
                             "tidar_jax/evals/agreement.py)")
    parser.add_argument("--matmul-precision", choices=("default", "high", "highest"),
                        help="jax.default_matmul_precision of the generation runs (default: highest for float32 "
                             "models, so the strict float32 check is not judged on TF32 dots; the backend's "
                             "default otherwise)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (after one warm-up)")
    parser.add_argument("--cpu-kernels", nargs="+", choices=("auto", "on", "off"), metavar="MODE",
                        help="run every method in each of these CPU kernel modes (auto: per shape, the faster of "
                             "kernel and XLA as measured on this machine; on; off: plain XLA) as its own row; the "
                             "speed-up is against the fastest AR row. Default: the $TIDAR_JAX_CPU_KERNELS mode only")
    parser.add_argument("--skip-generation", action="store_true", help="only the latency curve")
    parser.add_argument("--skip-latency", action="store_true", help="only the generation benchmark")
    parser.add_argument("--latency-checkpoint", help="checkpoint for the latency curve (default: the first one)")
    parser.add_argument("--latency-prefixes", type=int, nargs="+", default=[512, 2048],
                        help="cached prefix lengths of the latency curve")
    parser.add_argument("--latency-queries", type=int, nargs="+",
                        help="query-token counts of the latency curve (default: 1, 2, 4, ..., 512 with the TiDAR "
                             "step sizes of K = 4, 8 and 16 among them)")
    parser.add_argument("--latency-repeats", type=int, default=7, help="timed rounds per latency point")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to this file")
    parser.add_argument("--plot-dir", metavar="DIR", help="write bench_speedup.png and bench_latency.png here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    cost = parser.add_argument_group("step cost (compiled cost analysis, no weights)")
    cost.add_argument("--cost-only", action="store_true",
                      help="only the step-cost table for --config's model shape: no checkpoint, no weights, nothing "
                           "allocated (the decode programs are lowered on jax.ShapeDtypeStruct params)")
    cost.add_argument("--config", help="YAML config whose model section gives the shape (with --cost-only)")
    cost.add_argument("--override", nargs="+", default=[], metavar="section.field=value",
                      help="with --cost-only: dotted overrides of --config, e.g. model.scan_layers=true; with "
                           "--checkpoint: model.compute_dtype / model.attention_impl for every loaded model, e.g. "
                           "model.compute_dtype=bfloat16 (AR and TiDAR alike), and decode.max_cache_len (the cache "
                           "that prompts + --max-new-tokens must fit in)")
    cost.add_argument("--block-size", type=int, help="K of the TiDAR step (default: the config's model.block_size)")
    cost.add_argument("--cache-len", type=int, default=4096, help="KV-cache slots the steps attend over")
    cost.add_argument("--batch-size", type=int, default=1, help="batch rows of the costed programs")
    cost.add_argument("--prompt-bucket", type=int, default=128, help="prompt length P of the costed prefill")
    cost.add_argument("--time-steps", action="store_true",
                      help="with --cost-only: also time the same TiDAR and AR step programs on random-init weights "
                           "(allocates the model and the cache; --repeats rounds)")
    cost.add_argument("--peak-tflops", type=float,
                      help="chip's peak TFLOP/s in the compute dtype (e.g. 989 for H100 bf16 dense); with "
                           "--bandwidth-gbs adds the roofline time max(FLOPs/peak, bytes/bandwidth)")
    cost.add_argument("--bandwidth-gbs", type=float, help="chip's memory bandwidth in GB/s (e.g. 3350 for H100 SXM)")
    args = parser.parse_args(argv)
    from infer.common import require_at_least, require_positive

    require_at_least(parser, args, repeats=1, latency_repeats=1, prompt_len=1, max_new_tokens=1, batch_sizes=1,
                     block_sizes=1, latency_prefixes=1, latency_queries=1, cache_len=1, batch_size=1,
                     prompt_bucket=1, block_size=1, near_tie_epsilon=0)
    require_positive(parser, args, "peak_tflops", "bandwidth_gbs")
    for name in ("cache_len", "prompt_bucket"):  # cache positions are int32 in the compiled programs
        if getattr(args, name) >= 2**31:
            parser.error(f"--{name.replace('_', '-')} must be below 2**31 (int32 cache positions), "
                         f"got {getattr(args, name)}")
    args.proposal_sets = [_parse_set(parser, text) for text in args.proposal_sets or []]
    if args.cost_only and not args.config:
        parser.error("--cost-only needs --config")
    if args.cost_only:
        # Only the model shape (and decode.scan_layers, the layout costed) reach the cost analysis; any other
        # decode.* value would be ignored: its flags (--block-size, --cache-len, --proposal-sets) say what counts.
        ignored = [o for o in args.override if o.startswith("decode.") and not o.startswith("decode.scan_layers=")]
        if ignored:
            parser.error(f"--override {ignored[0]}: --cost-only costs the model's step shape, which decode.* does not "
                         "change (use --block-size, --cache-len, --batch-size, --proposal-sets)")
    if not args.cost_only and not args.checkpoint:
        parser.error("--checkpoint is required (or pass --cost-only --config PATH)")
    if args.skip_generation and args.skip_latency:
        parser.error("--skip-generation and --skip-latency together leave nothing to measure")
    return args


def _parse_set(parser, text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); argparse's one-line error otherwise (checked against K when the K is known)."""
    try:
        return tuple(int(j) for j in text.split(","))
    except ValueError:
        parser.error(f"--proposal-sets entries must be comma-separated integers like 1,2,4, got {text!r}")


def _set_name(lengths) -> str:
    return "tidar{" + ",".join(map(str, lengths)) + "}"


def _load(path: str, mesh, step: int | None = None, overrides: list[str] = ()):
    """The checkpoint at `path` (its `step`, default the latest) running with the execution-only `overrides`:
    model.attention_impl / model.compute_dtype, and decode.max_cache_len, the cache that bounds --max-new-tokens."""
    from infer.common import MODEL_OVERRIDES
    from tidar_jax.checkpoint.inference import load_for_inference, with_model
    from tidar_jax.checkpoint.store import step_path
    from tidar_jax.config import ConfigError, apply_overrides

    allowed = (*MODEL_OVERRIDES, "decode.max_cache_len")
    for item in overrides:
        if item.split("=", 1)[0] not in allowed:
            raise ConfigError(f"--override {item!r}: with --checkpoint only {', '.join(allowed)} can change")
    bundle = load_for_inference(step_path(path, step), mesh)
    if bundle.tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer.json next to its checkpoints")
    cfg = apply_overrides(bundle.config, list(overrides))
    bundle = with_model(bundle, cfg.model)
    return dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, decode=cfg.decode))


def _label(path: str, bundle) -> str:
    name = Path(path).name if Path(path).name not in ("checkpoints", "") else Path(path).parent.name
    return f"{name} ({bundle.config.train.objective}, K={bundle.config.model.block_size})"


def run_generation(args, bundles: dict, draft, prompts: list[list[int]], progress) -> list[dict]:
    """Every (checkpoint, K, batch) group; returns one record per group."""
    from infer.common import decode_room
    from tidar_jax.decoding import tuning
    from tidar_jax.decoding.buckets import bucket_for
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.decoding.spec_decode import SpecDecoder
    from tidar_jax.evals import agreement
    from tidar_jax.evals.method_timing import time_methods
    from tidar_jax.evals.step_cost import step_costs
    from tidar_jax.layout import proposals
    from tidar_jax.ops import kernel_choice

    # Every group's K and cache are checked before the first one runs: a refusal comes before any timing.
    groups = []
    for path, bundle in bundles.items():
        m = bundle.config.model
        for k in args.block_sizes or [m.block_size]:
            if k != m.block_size and not args.allow_block_size_mismatch:
                raise ValueError(f"--block-sizes {k} differs from the trained K={m.block_size} of {path}; pass "
                                 "--allow-block-size-mismatch to decode anyway (or train a checkpoint with that K)")
            dec = decode_room(bundle.config.decode, max(map(len, prompts)), args.max_new_tokens, k)
            # Batch buckets = the measured batch sizes, so no row of a measured batch is padding.
            dec = dataclasses.replace(dec, batch_buckets=tuple(sorted(set(args.batch_sizes))))
            groups.append((path, bundle, k, dec))
    records = []
    for path, bundle, k, dec in groups:
        m = bundle.config.model
        tokenizer_size = bundle.tokenizer.vocab_size if bundle.tokenizer is not None else None
        generator = Generator(bundle.graphdef, bundle.params, m, dec, allow_block_size_mismatch=True,
                              tokenizer_size=tokenizer_size)
        methods, shapes = {"ar": (generator, "ar")}, {"ar": (1, ())}  # shapes: (K, set) that the expected rate prices
        tuned = _tuning(bundle, progress)
        if bundle.config.train.objective == "tidar":
            methods["tidar"], shapes["tidar"] = (generator, "tidar"), (k, ())
            for lengths in args.proposal_sets:
                lengths = proposals.resolve_proposal_lengths(lengths, k, "--proposal-sets")
                methods[_set_name(lengths)] = (Generator(bundle.graphdef, bundle.params, m, dataclasses.replace(
                    dec, proposal_lengths=lengths), allow_block_size_mismatch=True, tokenizer_size=tokenizer_size),
                    "tidar")
                shapes[_set_name(lengths)] = (k, lengths)
            if tuned is not None and k == m.block_size:  # what decode.*=auto runs, per batch
                methods["tidar auto"] = (Generator(bundle.graphdef, bundle.params, m, dataclasses.replace(
                    dec, block_size="auto", proposal_lengths="auto"), tokenizer_size=tokenizer_size, tuning=tuned),
                    "tidar")
        if draft is not None and k >= 2:
            methods["spec"] = (SpecDecoder(bundle.graphdef, bundle.params, m, dec, draft.graphdef, draft.params,
                                           draft.config.model, k), "spec")
        bucket = bucket_for(max(map(len, prompts)), dec.prompt_buckets)
        for batch in args.batch_sizes:
            progress(f"generation: {_label(path, bundle)}, K={k}, batch {batch}: {', '.join(methods)}")
            cost = step_costs(m, k, dec.max_cache_len, batch, bucket, args.peak_tflops, args.bandwidth_gbs,
                              model=(bundle.graphdef, bundle.params))
            with agreement.matmul_precision(m.compute_dtype, args.matmul_precision):
                group = time_methods(methods, prompts, batch, args.max_new_tokens, args.repeats,
                                     args.near_tie_epsilon, tuple(args.cpu_kernels or [None]))
            if tuned is not None:  # expected tokens/s from the tuning's model, next to the measured ones
                if "tidar auto" in methods:
                    shapes["tidar auto"] = methods["tidar auto"][0].step_shape(batch)
                for name, s in group["methods"].items():
                    shape = shapes.get(name.split(" [")[0])
                    s["expected_tokens_per_second"] = shape and tuning.expected_rate(tuned, m, batch, *shape)
            records.append({"step_cost": cost, "checkpoint": path, "checkpoint_step": bundle.step,
                            "label": _label(path, bundle), "trained_block_size": m.block_size,
                            "objective": bundle.config.train.objective, "block_size": k, "batch_size": batch,
                            "compute_dtype": m.compute_dtype,
                            "matmul_precision": agreement.precision_name(m.compute_dtype, args.matmul_precision),
                            "methods": group["methods"], "ar_baseline": group["baseline"],
                            "auto_step": shapes.get("tidar auto"),
                            "cpu_kernels": kernel_choice.decisions()})
    return records


def _tuning(bundle, progress):
    """The checkpoint's decode tuning (auto row, expected rates); None without one or (reported) a bad one."""
    from tidar_jax.decoding import tuning

    if bundle.workdir is None or not tuning.tuning_path(bundle.workdir).is_file():
        return None
    try:
        tuned = tuning.read_tuning(bundle.workdir)
        tuning.check_model(tuned, bundle.config.model)
        return tuned
    except tuning.TuningError as e:
        progress(f"warning: {e}; no auto row or expected rates")
        return None


def run_latency(args, bundle, progress) -> dict:
    from tidar_jax.evals import benchmark

    queries = args.latency_queries or list(benchmark.DEFAULT_QUERY_COUNTS)
    for k in (4, 8, 16):  # the TiDAR step sizes the curve is read at
        if not args.latency_queries and k + k * k <= max(queries) and k + k * k not in queries:
            queries.append(k + k * k)
    queries = sorted(set(queries))
    curves = {}
    for prefix in args.latency_prefixes:
        curves[str(prefix)] = benchmark.forward_latency_curve(bundle.graphdef, bundle.params, bundle.config.model,
                                                              prefix, queries, repeats=args.latency_repeats,
                                                              progress=progress)
    return {"query_tokens": queries, "curves": curves}


def _check_outputs(args) -> None:
    """Refuses (ValueError) an unwritable --json or --plot-dir before anything is measured."""
    from infer.common import check_writable

    if args.json:
        check_writable(args.json, "--json")
    if args.plot_dir:
        check_writable(args.plot_dir, "--plot-dir", directory=True)


def run_cost_only(args) -> int:
    """--cost-only: the step-cost table (and --json) for --config's model shape; no checkpoint. With
    --proposal-sets, one more table per set (its TiDAR step has K + |A|*K rows)."""
    from infer.common import USER_ERRORS, fail, write_json
    from tidar_jax.config import load_config
    from tidar_jax.evals.benchmark import device_info
    from tidar_jax.evals.step_cost import format_costs, step_costs, time_steps
    from tidar_jax.layout import proposals

    tables, report = [], {}
    try:
        _check_outputs(args)
        config = load_config(args.config, args.override)
        cfg = config.model
        k = args.block_size or cfg.block_size
        for lengths in [None] + args.proposal_sets:
            if lengths is not None:
                lengths = proposals.resolve_proposal_lengths(lengths, k, "--proposal-sets")
            costs = step_costs(cfg, k, args.cache_len, args.batch_size, args.prompt_bucket, args.peak_tflops,
                               args.bandwidth_gbs, proposal_lengths=lengths)
            if args.time_steps:
                costs["measured"] = time_steps(dataclasses.replace(cfg, scan_layers=config.decode.scan_layers), k,
                                               args.cache_len, args.batch_size, args.prompt_bucket,
                                               args.repeats, proposal_lengths=lengths)
            name = "full proposal set" if lengths is None else f"proposal set {list(lengths)}"
            tables.append(format_costs(costs, f"{args.config}: K={k}, {name}, cache {args.cache_len}, batch "
                                              f"{args.batch_size}, prefill bucket {args.prompt_bucket}, "
                                              f"{costs['params'] / 1e6:.1f}M params"))
            if lengths is None:
                report["step_cost"] = costs
            else:
                report.setdefault("sparse_step_costs", {})[_set_name(lengths)] = costs
    except USER_ERRORS as e:
        return fail(e)
    print("\n\n".join(tables))
    if args.json:
        write_json(args.json, {"device": device_info(), "settings": dict(vars(args)), "block_size": k, **report})
    return 0


def main(argv=None) -> int:
    """The CLI; returns the exit code: 2 with one `error:` line on bad input, 130 on Ctrl-C (outputs are written
    only at the end, the JSON atomically, so an interrupted benchmark leaves no half-written report)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        from infer.common import interrupted

        return interrupted()


def _main(argv) -> int:
    args = parse_args(argv)
    from tidar_jax import caches

    caches.enable_compile_cache()  # before anything compiles: a repeated run loads its programs from disk
    if args.cost_only:
        return run_cost_only(args)
    import jax
    from tqdm.auto import tqdm

    from infer.common import USER_ERRORS, fail, prompt_set, write_json
    from tidar_jax.config import ConfigError, MeshConfig
    from tidar_jax.evals import bench_report
    from tidar_jax.evals.benchmark import device_info
    from tidar_jax.sharding import make_mesh

    def progress(message: str) -> None:
        if not args.no_progress:
            tqdm.write(message, file=sys.stderr)

    try:
        _check_outputs(args)
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        paths = list(dict.fromkeys(args.checkpoint + ([args.latency_checkpoint] if args.latency_checkpoint else [])))
        bundles = {p: _load(p, mesh, args.step, args.override) for p in paths}
        draft = _load(args.draft, mesh, overrides=args.override) if args.draft else None
        first = bundles[args.checkpoint[0]]
        fingerprint = first.tokenizer.fingerprint
        for path, b in list(bundles.items()) + ([(args.draft, draft)] if draft else []):
            if b.tokenizer.fingerprint != fingerprint:
                raise ConfigError(f"{path} uses another tokenizer than {args.checkpoint[0]}: one prompt set needs "
                                  "one tokenizer")
        report = {"device": device_info(), "settings": dict(vars(args))}
        with jax.set_mesh(mesh):
            if not args.skip_generation:
                # Batch 1 takes another prompt each round (so --repeats rounds see --repeats prompts).
                prompts = prompt_set(args.prompts, args.checkpoint[0], first, max(*args.batch_sizes, args.repeats),
                                     args.prompt_len)
                report["prompts"] = {"kind": args.prompts, "count": len(prompts), "prompt_len": max(map(len, prompts)),
                                     "first": first.tokenizer.decode(prompts[0])}
                gen_bundles = {p: bundles[p] for p in args.checkpoint}
                report["generation"] = run_generation(args, gen_bundles, draft, prompts, progress)
            if not args.skip_latency:
                path = args.latency_checkpoint or args.checkpoint[0]
                report["latency"] = {"checkpoint": path, "checkpoint_step": bundles[path].step,
                                     "label": _label(path, bundles[path]),
                                     **run_latency(args, bundles[path], progress)}
    except USER_ERRORS as e:
        return fail(e)
    if args.plot_dir:
        report["plots"] = bench_report.write_plots(report, args.plot_dir)
    print(bench_report.format_tables(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
