"""Counts the compilations (traces) and compile time of a sweep of batch sizes x max_new_tokens, greedy TiDAR and
AR, with a random-init model of a preset on the local device: what a caller with varying request shapes pays.

    python benchmarks/compile_count.py --config configs/tiny.yaml --batch-sizes 1 2 3 4 5 6 7 8 \\
        --max-new-tokens 8 12 16 24 32

Prints one line per mode: calls, traces of each decode function, total compile seconds (from GenerationResult).
Dotted `--override`s change the preset, e.g. the decoding layer layout of a deep model:

    python benchmarks/compile_count.py --config configs/smollm2-135m.yaml --batch-sizes 1 --max-new-tokens 8 \\
        --override decode.scan_layers=true
"""

from __future__ import annotations

import argparse
import itertools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--override", nargs="*", default=[], metavar="section.field=value",
                        help="dotted config overrides, e.g. decode.scan_layers=true")
    args = parser.parse_args()

    from flax import nnx

    from tidar_jax.config import load_config
    from tidar_jax.decoding import generation
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.model.transformer import create_model

    cfg = load_config(args.config, args.override)
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
    gen = Generator(graphdef, params, cfg.model, cfg.decode)
    prompt = [3 + i % 50 for i in range(args.prompt_len)]
    for mode in ("tidar", "ar"):
        before = dict(generation.TRACE_COUNTS)
        compile_s, calls = 0.0, 0
        for batch, new in itertools.product(args.batch_sizes, args.max_new_tokens):
            compile_s += gen.generate([prompt] * batch, mode, new).compile_time_s
            calls += 1
        traces = {k: v - before.get(k, 0) for k, v in generation.TRACE_COUNTS.items() if v != before.get(k, 0)}
        print(f"{mode}: {calls} calls (batch {args.batch_sizes} x max_new_tokens {args.max_new_tokens}), "
              f"traces {traces}, compile {compile_s:.1f} s")


if __name__ == "__main__":
    main()
