"""The static description of a compiled decode loop (`DecodeSpec`: mode, K, greedy, capacity, proposal set, the
ids no output may be) and the block size a decode runs with. Hashable: one spec, one compiled program."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from tidar_jax.config import DecodeConfig, ModelConfig
from tidar_jax.config.schema import AUTO
from tidar_jax.layout import masks, proposals

MODES = ("tidar", "ar")
# Query rows (batch * (K + K*K)) from which a TiDAR step runs the LM head only on the rows it reads, in two passes
# over the head weight. Fewer rows: the head is bound by reading its [d, V] weight, so one pass over all rows is
# cheaper than two over fewer. Measured on a 2-core CPU with SmolLM2-135M (V = 49216, K = 4): two passes cost 1.4x
# one at 20 rows, 1.3x at 40, 0.9x at 80, 0.7x at 160. On accelerators the crossover is near the chip's
# FLOP/byte ridge (hundreds of rows in bf16), so raise it there.
SPLIT_HEAD_MIN_ROWS = 64


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Static (hashable) description of a compiled decode loop.

    num_drafts: K for TiDAR, 1 for AR; with_proposals: TiDAR (proposal blocks) vs AR; greedy: argmax vs
    speculative sampling; capacity: output buffer length (the largest max_new_tokens it can serve);
    split_head_min_rows: a TiDAR step with at least this many query rows (batch * Q, static) runs the LM head in
    two passes on the rows it reads (see `decode_step`); below it, one pass on every row; proposal_lengths: the
    proposal set A of a TiDAR step (proposals.py; `create` fills in all of 1..K by default, so the full set has
    one spelling and one compiled program), () for AR; token_limit, reserved: with the mask, the ids no output
    may be (`suppress_non_tokens`): ids >= token_limit (embedding rows past the tokenizer) and `reserved` (the pad).
    """

    num_drafts: int
    with_proposals: bool
    greedy: bool
    capacity: int
    mask_token_id: int
    eos_token_id: int
    split_head_min_rows: int = SPLIT_HEAD_MIN_ROWS
    proposal_lengths: tuple[int, ...] = ()
    token_limit: int | None = None
    reserved: tuple[int, ...] = ()

    @classmethod
    def create(cls, mode: str, block_size: int, greedy: bool, capacity: int, model_cfg: ModelConfig,
               split_head_min_rows: int | None = None, proposal_lengths: Sequence[int] | None = None,
               token_limit: int | None = None, reserved: Sequence[int] = ()) -> "DecodeSpec":
        """proposal_lengths: the TiDAR proposal set (None / empty = all of 1..K), validated against K; ignored
        for AR. token_limit (None: every embedding row is a token), reserved: see the class docstring."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        tidar = mode == "tidar"
        split = cls.split_head_min_rows if split_head_min_rows is None else split_head_min_rows
        lengths = proposals.resolve_proposal_lengths(proposal_lengths, block_size) if tidar else ()
        return cls(num_drafts=block_size if tidar else 1, with_proposals=tidar, greedy=greedy, capacity=capacity,
                   mask_token_id=model_cfg.mask_token_id, eos_token_id=model_cfg.eos_token_id,
                   split_head_min_rows=split, proposal_lengths=lengths,
                   token_limit=None if token_limit is None or token_limit >= model_cfg.vocab_size else token_limit,
                   reserved=tuple(sorted(set(reserved) - {model_cfg.mask_token_id})))

    @property
    def lengths(self) -> tuple[int, ...]:
        """A, the acceptance lengths whose proposal blocks a step computes (all of 1..K when the field is empty, as
        in a spec built without `create`); () for AR."""
        if not self.with_proposals:
            return ()
        return masks.proposal_set(self.num_drafts, self.proposal_lengths or None)

    @property
    def sparse(self) -> bool:
        """A TiDAR step that computes fewer than K proposal blocks (it verifies with beta = 1)."""
        return self.with_proposals and proposals.is_sparse(self.lengths, self.num_drafts)

    def for_prefill(self) -> "DecodeSpec":
        """The spec the prefill compiles with: it never reads the proposal set, so every set shares one program."""
        return dataclasses.replace(self, proposal_lengths=masks.proposal_set(self.num_drafts)
                                   if self.with_proposals else ())

    def check_beta(self, beta: float) -> None:
        """Raises ValueError unless beta = 1 for a sparse set (its step has no slot-1 rows to mix)."""
        if self.sparse:
            proposals.check_beta(beta, self.lengths, self.num_drafts)


def resolve_block_size(model_cfg: ModelConfig, decode_cfg: DecodeConfig, allow_mismatch: bool = False) -> int:
    """decode.block_size, or the trained model.block_size when it is 0 or "auto" (auto chooses some K' <= the trained
    K per batch bucket, decoding/tuning.py: the trained K is the largest block a step may hold). A different K than
    the trained one is an error unless `allow_mismatch` (the diffusion drafts were trained for one block size)."""
    k = model_cfg.block_size if decode_cfg.block_size == AUTO else decode_cfg.block_size or model_cfg.block_size
    if k != model_cfg.block_size and not allow_mismatch:
        raise ValueError(f"decode block size {k} differs from the model's trained block size "
                         f"{model_cfg.block_size}; pass --allow-block-size-mismatch (Python: "
                         "allow_block_size_mismatch=True) to decode anyway")
    return k
