"""Per-device memory of the real train step, compiled ahead of time on simulated CPU devices (nothing allocated).

    python -m train.plan --config configs/small.yaml --devices 8 data.seq_len=1024 train.loss_chunk_rows=1024
    python -m train.plan --config configs/tiny.yaml --devices 4 --json

Lowers `Trainer.train_step` (the trainer's own step, shardings and donation) on `Trainer.abstract_state` and a
`[global_batch, seq_len]` ShapeDtypeStruct batch, compiles it and prints XLA's `memory_analysis()` per device:
arguments, outputs, temp (activations and other scratch) and their total less aliased (donated) bytes, plus the
compile time. `--devices N` sets `--xla_force_host_platform_device_count=N` before jax is imported, so the
figures are those of the CPU backend's plan for an N-device mesh; other backends fuse and schedule differently.
"""

from __future__ import annotations

import os
import sys


def _set_devices(argv: list[str]) -> None:
    """Must run before jax is imported: N simulated CPU devices from `--devices N` (default 8)."""
    n = "8"
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            n = argv[i + 1]
        elif arg.startswith("--devices="):
            n = arg.split("=", 1)[1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    _set_devices(sys.argv[1:])

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def memory_plan(cfg, devices=None) -> dict:
    """Compiles `Trainer(cfg, mesh).train_step` on abstract inputs over `devices` (default all); returns bytes per
    device: arguments, outputs, temp, alias (donated, counted once), total = arguments + outputs + temp - alias,
    and compile_s."""
    from tidar_jax.sharding import make_mesh
    from tidar_jax.training.trainer import Trainer

    mesh = make_mesh(cfg.mesh, devices)
    trainer = Trainer(cfg, mesh)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding),
             "valid": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=trainer.batch_sharding)}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    out = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
           "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] + out["temp"] - out["alias"]
    out["compile_s"] = round(compile_s, 2)
    out["devices"] = len(mesh.devices.flat)
    out["mesh"] = dict(mesh.shape)
    out["attention_impl"] = trainer.runtime["attention_impl"]  # what model.attention_impl=auto planned with
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/small.yaml")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (set before jax loads)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    from tidar_jax.config import ConfigError, load_config

    if args.devices < 1:  # before jax.devices(): the CPU backend cannot start with a device count below 1
        parser.error(f"--devices must be >= 1, got {args.devices}")
    devices = jax.devices()
    if len(devices) < args.devices:
        sys.exit(f"{args.devices} devices asked for but jax sees {len(devices)} (was jax imported before "
                 "train.plan could set XLA_FLAGS?)")
    try:
        plan = memory_plan(load_config(args.config, args.overrides), devices[:args.devices])
    except ConfigError as e:  # bad config, or one this backend cannot compile (e.g. cudnn attention on a CPU)
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan.update(config=args.config, overrides=args.overrides)
    if args.json:
        print(json.dumps(plan))
        return 0
    print(f"{args.config} {' '.join(args.overrides)}: {plan['devices']} devices, mesh {plan['mesh']}")
    for key in ("arguments", "outputs", "temp", "alias", "total"):
        print(f"  {key:<10} {plan[key] / 2**20:12.2f} MiB per device")
    print(f"  compile    {plan['compile_s']:12.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
