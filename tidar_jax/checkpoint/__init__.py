"""Orbax checkpoints of a run: async save with keep-latest-N, resume from `--workdir` alone, and a params-only
restore for inference, each onto whatever mesh the reader runs on.

Layout (Orbax `CheckpointManager`, default step names):
    WORKDIR/checkpoints/<step>/state    train state pytree {"step", "params" (nnx pure dict), "opt_state"};
                                        inference checkpoints hold {"step", "params"} only
    WORKDIR/checkpoints/<step>/data     grain iterator state (JSON), absent when none was given
    WORKDIR/checkpoints/<step>/config   `config.to_dict(Config)` (JSON), plus under "runtime" what the training
                                        process ran it with (backend, the concrete model.attention_impl that
                                        "auto" resolved to); readers drop it, so the config stays portable
    WORKDIR/tokenizer.json              the run's tokenizer (written by training/loop.py / save_inference_checkpoint)

Guarantees: a step is written to `<step>.orbax-checkpoint-tmp` and renamed into place only once complete, so a
process killed mid-save leaves every earlier step loadable (unfinished directories are never listed as steps, and
the writer removes them when it next opens the directory). An existing step is never overwritten; only the
keep-latest-N policy deletes steps. Arrays restore onto the shardings of the abstract target, so a checkpoint
written on one mesh loads on any other.
"""
