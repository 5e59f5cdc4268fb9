"""Tokens per forward of sparse proposal sets on a model whose drafts are often accepted (CPU, seconds).

    python benchmarks/sparse_sets_markov.py

The model is the test suite's tiny TiDAR transformer (configs/tiny.yaml) trained for 100 Adam steps on a Markov
chain (tests/markov.py), so multi-token steps are common. 16 prompts, 64 greedy new tokens each, K = 4, one batch,
for the full set and a few sparse ones: tokens per forward, the acceptance histogram (a = 1..K), the modelled loss
`proposals.lost_token_fraction` from the full set's histogram, and the lossless check against AR decoding.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from markov import trained_model  # noqa: E402

from tidar_jax import config as config_lib  # noqa: E402
from tidar_jax.decoding.generation import Generator  # noqa: E402
from tidar_jax.layout import proposals

SETS = [(), (1,), (1, 2), (1, 2, 3), (1, 4)]


def main() -> None:
    cfg = config_lib.load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                                 ["decode.max_cache_len=128", "decode.prompt_buckets=[8]"])
    model = trained_model(cfg.model, "tidar", seed=0, steps=100)
    prompts = [[3 + i % 8, 3 + (i * 5) % 8] for i in range(16)]
    ar = Generator(*model, cfg.model, cfg.decode).generate(prompts, "ar", 64)
    full_hist = None
    for lengths in SETS:
        gen = Generator(*model, cfg.model, dataclasses.replace(cfg.decode, proposal_lengths=lengths))
        r = gen.generate(prompts, "tidar", 64)
        full_hist = full_hist or r.acceptance_histogram  # SETS[0] is the full set
        k = len(full_hist) - 1
        lengths = lengths or tuple(range(1, k + 1))
        mean = sum(a * n for a, n in enumerate(full_hist)) / sum(full_hist)
        loss = proposals.lost_tokens(full_hist, lengths) / mean
        print(f"{str(list(lengths)):<14} Q={k + k * len(lengths):<4} T/F {r.tokens_per_forward:.3f}  "
              f"hist {r.acceptance_histogram[1:]}  modelled loss {loss:.1%}  same as AR {r.tokens == ar.tokens}")


if __name__ == "__main__":
    main()
