"""`lm_eval` with the `tidar_jax` model registered: the same command line as lm-eval's own CLI.

    python -m tidar_jax.evals.lm_eval_cli --model tidar_jax --model_args checkpoint=runs/smollm2,mode=tidar \\
        --tasks arc_easy --batch_size 8 --output_path results/

lm-eval 0.4.13 resolves `--model NAME` only from its registry (its built-in table plus whatever was imported
before the lookup) and offers no entry-point group for third-party models, so a bare `lm_eval --model tidar_jax`
cannot find this backend. This wrapper imports `tidar_jax.evals.harness` (which registers it) and then hands
sys.argv to `lm_eval.__main__.cli_evaluate` unchanged; every lm-eval option works as documented there.

Unlike lm-eval's own CLI, a refused input (bad `--model_args`, a missing checkpoint) ends with one `error:` line
and exit code 2, Ctrl-C with exit code 130, and an `--output_path` that cannot be written is refused before the
evaluation starts (lm-eval only logs that it could not save the results, and exits 0).
"""

from __future__ import annotations

import argparse
import sys


def _output_path(argv: list[str]) -> str | None:
    """lm-eval's --output_path / -o in `argv` (the last one given), or None."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", "-o")
    return parser.parse_known_args(argv)[0].output_path


def main(argv: list[str] | None = None) -> int:
    """Runs lm-eval's CLI on `argv` (default: the command line) with `tidar_jax` registered; returns the exit
    code."""
    from infer.common import USER_ERRORS, check_writable, fail, interrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    output = _output_path(argv)
    try:
        if output:  # lm-eval writes a .json path as a file (with a date suffix), anything else as a folder
            check_writable(output, "--output_path", directory=not output.endswith(".json"))
        from lm_eval.__main__ import cli_evaluate

        import tidar_jax.evals.harness  # noqa: F401  (registers "tidar_jax" before lm-eval looks the name up)

        sys.argv = ["lm_eval", *argv]
        cli_evaluate()
    except USER_ERRORS as e:
        return fail(e)
    except KeyboardInterrupt:
        return interrupted("lm-eval saved no results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
