"""Wall time of the real train step (`Trainer.train_step`) on one device, for attention implementations side by side.

Each implementation gets its own Trainer from the same config (plus `model.attention_impl=IMPL`), the same initial
params and the same random batch; every step is compiled ahead of time (`lower(...).compile()`, whose XLA memory
plan gives the step's temp memory) and run once, then `--repeats` rounds time one step of each in alternating order
(load on a shared machine moves every variant alike). Prints the medians, the ratio to the first implementation,
the temp memory and, as a check that they compute the same step, each one's loss.

    python benchmarks/train_step_speed.py --config configs/small.yaml --impls xla blockwise data.seq_len=512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from tidar_jax.config import ATTENTION_IMPLS, ConfigError, load_config, replace
from tidar_jax.sharding import make_global_batch, make_mesh
from tidar_jax.training.trainer import Trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/small.yaml")
    parser.add_argument("--impls", nargs="+", default=["xla", "blockwise"], help="model.attention_impl values")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    bad = [i for i in args.impls if i not in ATTENTION_IMPLS]
    if bad or args.repeats < 1:
        parser.error(f"--impls must be among {ATTENTION_IMPLS}, got {bad}" if bad else "--repeats must be >= 1")
    try:
        base = replace(load_config(args.config, args.overrides), mesh={"data": 1, "fsdp": 1, "tensor": 1})
    except ConfigError as e:
        parser.error(str(e))
    mesh = make_mesh(base.mesh, jax.devices()[:1])
    rng = np.random.default_rng(0)
    shape = (base.data.global_batch_size, base.data.seq_len)
    batch = make_global_batch({"tokens": rng.integers(3, base.model.vocab_size, shape).astype(np.int32),
                               "valid": np.ones(shape, bool)}, mesh)
    trainers = {impl: Trainer(replace(base, model={"attention_impl": impl}), mesh) for impl in args.impls}
    params = jax.device_get(trainers[args.impls[0]].init_state()["params"])  # host copy: steps donate the state
    states, losses, times, steps, temps = {}, {}, {impl: [] for impl in args.impls}, {}, {}
    with jax.set_mesh(mesh):
        for impl, trainer in trainers.items():  # compile (the trainer's jitted step, its shardings and donation)
            states[impl] = trainer.init_state(params)
            start = time.perf_counter()
            steps[impl] = trainer.train_step.lower(states[impl], batch).compile()
            memory = steps[impl].memory_analysis()
            temps[impl] = float("nan") if memory is None else memory.temp_size_in_bytes / 2**20
            # Printed as it goes, so a run cut short by a timeout still shows what compiled.
            print(f"  compiled {impl}: {time.perf_counter() - start:.1f} s, temp {temps[impl]:.1f} MiB", flush=True)
            states[impl], metrics = steps[impl](states[impl], batch)  # warm up
            losses[impl] = float(metrics["loss"])
        for _ in range(args.repeats):
            for impl in args.impls:
                start = time.perf_counter()
                states[impl], metrics = steps[impl](states[impl], batch)
                jax.block_until_ready(metrics)
                times[impl].append(time.perf_counter() - start)
    ref = statistics.median(times[args.impls[0]])
    print(f"{args.config} {' '.join(args.overrides)}: train step, 1 device, median of {args.repeats}")
    for impl in args.impls:
        med = statistics.median(times[impl])
        print(f"  {impl:<14} {med * 1e3:9.1f} ms  x{med / ref:.3f}  temp {temps[impl]:8.1f} MiB  "
              f"first-step loss {losses[impl]:.6f}  "
              f"(all: {' '.join(f'{t * 1e3:.0f}' for t in times[impl])})")


if __name__ == "__main__":
    sys.exit(main())
