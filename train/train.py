"""Train a TiDAR (or plain AR baseline) model on a device mesh, with checkpoints, resume and held-out eval.

    python -m train.train --config configs/tiny.yaml --workdir runs/tiny                 # new run (or resume)
    python -m train.train --config configs/tiny.yaml --workdir runs/tiny train.steps=200 data.seq_len=128
    python -m train.train --workdir runs/tiny                                             # resume, saved config
    python -m train.train --workdir runs/tiny train.steps=400                             # resume and extend

Overrides are `section.field=value` (sections: model, data, train, mesh, decode), e.g. train.steps=100,
train.objective=ar, mesh.data=2 mesh.tensor=4. A WORKDIR that already holds checkpoints resumes from its latest
step; a config that changes the model, the data, the objective or the tokenizer of that run is refused (choose
another --workdir).

Starting from a pretrained model: `train.init_from=DIR` (e.g. an import from train.import_checkpoint) takes the
architecture, token ids, tokenizer and chat template from DIR (a preset may restate them); add
`train.adaptation=adapters model.adapter_rank=16` to train only mask-gated adapters, leaving the AR model exact:

    python -m train.train --config configs/smollm2-tidar.yaml --workdir runs/smollm2-tidar Outputs: WORKDIR/checkpoints/<step>, WORKDIR/metrics.jsonl,
WORKDIR/tokenizer.json (and WORKDIR/tensorboard when tensorboardX is installed).

Several hosts: run the same command on every host with --distributed (or mesh.distributed=true); on GPU/TPU
clusters jax.distributed.initialize() finds the coordinator itself, elsewhere give --coordinator,
--num-processes and --process-id.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (e.g. configs/tiny.yaml). Omit it to resume WORKDIR with the "
                                         "config saved in its latest checkpoint")
    parser.add_argument("--workdir", required=True,
                        help="run directory: checkpoints, metrics.jsonl and tokenizer.json go here; resumed from "
                             "its latest checkpoint when it has one")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides applied after the preset (or the saved config), e.g. "
                             "train.steps=100 train.objective=ar mesh.data=-1")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process run: call jax.distributed.initialize() before anything else (also "
                             "enabled by mesh.distributed=true in the config or overrides)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 for jax.distributed.initialize (needed on "
                                              "CPU; auto-detected on most GPU/TPU clusters)")
    parser.add_argument("--num-processes", type=int, help="total number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's index in [0, num-processes)")
    parser.add_argument("--stop-at-step", type=int,
                        help="stop (with a checkpoint) after this step although train.steps is larger, as a "
                             "preempted job would; the learning-rate schedule still spans train.steps")
    parser.add_argument("--step", type=int,
                        help="resume from this saved step instead of the latest (e.g. after a corrupt save); "
                             "later steps must first be moved out of WORKDIR/checkpoints (nothing is deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args = parser.parse_args(argv)
    for name in ("stop_at_step", "step"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _wants_distributed(args: argparse.Namespace) -> bool:
    """--distributed, or mesh.distributed=true in the preset / overrides (decided before jax starts)."""
    if args.distributed:
        return True
    if args.config:
        from tidar_jax.config import load_config

        return load_config(args.config, args.overrides).mesh.distributed
    return any(o.replace(" ", "").lower() in ("mesh.distributed=true", "mesh.distributed=1") for o in args.overrides)


def _start_distributed(args: argparse.Namespace) -> None:
    import jax

    # CPU backends need a collectives implementation for cross-process arrays; GPU/TPU ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
              "process_id": args.process_id}
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def _after_interrupt(workdir: str) -> str:
    """What a run stopped by Ctrl-C leaves: `train` closes its checkpointer on the way out, which finishes a save
    already written in the background; a save cut in its first phase stays a *.orbax-checkpoint-tmp folder, which
    is no checkpoint and which the next run deletes. So the newest finished step is where the run resumes."""
    from tidar_jax.checkpoint.store import saved_steps

    steps = saved_steps(workdir)
    if not steps:
        return f"no checkpoint was saved in {workdir}"
    return f"the newest checkpoint in {workdir} is step {steps[-1]}; the same command resumes from it"


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for a record that carries a KeyboardInterrupt."""
    return not (record.exc_info and record.exc_info[0] is KeyboardInterrupt)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Ctrl-C while Orbax waits for a background save makes it log the KeyboardInterrupt's traceback as an error;
    # the interrupt is reported once, by the line below.
    logging.getLogger("absl").addFilter(_not_an_interrupt)
    try:
        return _main(args)
    except KeyboardInterrupt:
        from infer.common import interrupted

        return interrupted(_after_interrupt(args.workdir))


def _main(args: argparse.Namespace) -> int:
    from tidar_jax.config import ConfigError

    try:
        distributed = _wants_distributed(args)
        given = [f"--{n.replace('_', '-')}" for n in ("coordinator", "num_processes", "process_id")
                 if getattr(args, n) is not None]
        if given and not distributed:
            raise ConfigError(f"{', '.join(given)}: these flags set up a multi-process run, which needs "
                              "--distributed (or mesh.distributed=true)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed:
        _start_distributed(args)  # before any other jax call (plan_run reads checkpoints via Orbax)

    from infer.common import OutputError, check_writable
    from tidar_jax.checkpoint.store import CheckpointError
    from tidar_jax.config import to_yaml
    from tidar_jax.data.corpora import DataError
    from tidar_jax.data.tokenizer import TokenizerError

    try:
        from tidar_jax.training.run_setup import plan_run

        plan = plan_run(args.workdir, preset=args.config, overrides=args.overrides, step=args.step)
        cfg = plan.config
        if cfg.mesh.distributed and not distributed:
            raise ConfigError(f"the run in {args.workdir} is multi-process (mesh.distributed=true): pass "
                              "--distributed so that jax.distributed.initialize() runs first")
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        # A read-only WORKDIR (or parent) fails now rather than at the first metrics line; nothing is created yet.
        check_writable(args.workdir, "--workdir", directory=True, create=False)
        from tidar_jax.training.loop import train

        result = train(plan, stop_at_step=args.stop_at_step, progress=not args.no_progress)
    except (ConfigError, CheckpointError, DataError, TokenizerError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = next((r for r in reversed(result.records) if "loss" in r), None)
    summary = f"step {result.step}/{cfg.train.steps}"
    if last is not None:
        terms = ", ".join(f"{name} {last[key]:.4f}" for name, key in (("ar", "ar_loss"), ("diff", "diff_loss"))
                          if key in last)
        summary += f": loss {last['loss']:.4f} ({terms})"
    print(f"{summary}; checkpoints in {args.workdir}/checkpoints", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
