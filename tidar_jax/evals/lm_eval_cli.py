"""`lm_eval` with the `tidar_jax` model registered: the same command line as lm-eval's own CLI.

    python -m tidar_jax.evals.lm_eval_cli --model tidar_jax --model_args checkpoint=runs/smollm2,mode=tidar \\
        --tasks arc_easy --batch_size 8 --output_path results/

lm-eval 0.4.13 resolves `--model NAME` only from its registry (its built-in table plus whatever was imported
before the lookup) and offers no entry-point group for third-party models, so a bare `lm_eval --model tidar_jax`
cannot find this backend. This wrapper imports `tidar_jax.evals.harness` (which registers it) and then hands
sys.argv to `lm_eval.__main__.cli_evaluate` unchanged; every lm-eval option works as documented there.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import tidar_jax.evals.harness  # noqa: F401  (registers "tidar_jax" before lm-eval looks the name up)

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
