"""Paper-style evaluations: HumanEval pass@1 with sandboxed execution, and an lm-evaluation-harness backend."""
