"""Generate text from a checkpoint with TiDAR (draft + verify in one forward) or plain AR decoding.

    python -m infer.generate --checkpoint runs/tiny --prompt "The market" --max-new-tokens 64
    python -m infer.generate --checkpoint runs/tiny --prompt-ids 464,1910 --mode ar --json
    python -m infer.generate --checkpoint runs/tiny --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1
    python -m infer.generate --checkpoint runs/tiny --prompt-ids 464 decode.max_cache_len=1024 "decode.prompt_buckets=[64]"
    python -m infer.generate --checkpoint runs/smollm2 --chat --prompt "What is the capital of France?" --mode ar
    python -m infer.generate --checkpoint runs/qwen --prompt "Hi" mesh.data=1 mesh.tensor=4

Text streams to stdout as tokens are accepted (statistics go to stderr); with --json one JSON object is printed at
the end instead: token_ids (the new tokens), text, forwards, tokens_per_forward, tokens_per_second and more.
Defaults for every knob come from the checkpoint's `decode` config section; `decode.field=value` overrides change it
(flags win over overrides). The block size defaults to the one the model was trained with. Decoding runs on one
device unless `mesh.*` overrides ask for a mesh (e.g. `mesh.data=1 mesh.tensor=4`: the first 4 devices; -1 = all
remaining devices): the heads, MLP, vocabulary and the KV cache's heads are split over `tensor`, rows over `data`.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a training WORKDIR (its latest step), its checkpoints/ directory or one step directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs WORKDIR/tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 464,1910,318")
    parser.add_argument("--chat", action="store_true",
                        help="wrap --prompt as one user message in the checkpoint's chat template (imported instruct "
                             "models keep theirs in WORKDIR/chat_template.jinja or tokenizer_config.json); "
                             "special-token strings inside the message (e.g. <|im_start|>) stay plain text")
    parser.add_argument("--chat-special-tokens", action="store_true",
                        help="with --chat: special-token strings typed in --prompt become those special tokens, so "
                             "the text can close the user turn and open others (system, assistant); trusted text "
                             "only")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: decode.max_new_tokens)")
    parser.add_argument("--mode", choices=("tidar", "ar"), default="tidar",
                        help="tidar: K drafts verified + K proposals drafted per forward; ar: one token per forward")
    parser.add_argument("--beta", type=float,
                        help="verifier logit mix beta*AR + (1-beta)*diffusion, in [0, 1]; 1 = exact AR output")
    parser.add_argument("--temperature", type=float, help="0 = greedy; > 0 samples (speculative sampling in tidar)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling, in [0, 2**32)")
    parser.add_argument("--block-size", type=int,
                        help="draft block size K (default: the trained one; another K needs the next flag)")
    parser.add_argument("--allow-block-size-mismatch", action="store_true",
                        help="decode with a block size other than the one the model was trained with")
    parser.add_argument("--step", type=int, help="load this saved step instead of the latest (e.g. after a "
                                                 "corrupt save)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with tokens and statistics")
    parser.add_argument("overrides", nargs="*", metavar="decode.field=value",
                        help="decode config overrides, e.g. decode.max_cache_len=1024 decode.prompt_buckets=[32,256]; "
                             "mesh.* overrides decode on a mesh, e.g. mesh.data=1 mesh.tensor=4; "
                             "model.attention_impl / model.compute_dtype (e.g. =xla / =float32) run a checkpoint "
                             "trained with cudnn on a CPU")
    args = parser.parse_args(argv)
    from infer.common import require_at_least
    from tidar_jax.data.tokenizer import check_text

    require_at_least(parser, args, max_new_tokens=1, block_size=1, top_k=0)
    if args.beta is not None and not 0 <= args.beta <= 1:
        parser.error(f"--beta must be in [0, 1], got {args.beta}")
    # Refused rather than ignored: an AR step has no diffusion logits to mix, so the output would not be the one
    # the flag asks for (drop it, or decode with --mode tidar).
    beta_override = next((o for o in args.overrides if o.startswith("decode.beta=")), None)
    if args.mode == "ar" and (args.beta is not None or beta_override):
        parser.error(f"{'--beta' if args.beta is not None else beta_override} mixes diffusion logits into TiDAR's "
                     "verifier; --mode ar has none, so it would be ignored: drop it or use --mode tidar")
    if not 0 <= args.seed < 2**32:  # the PRNG key takes 32 bits: larger seeds would collide or overflow
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.chat_special_tokens and not args.chat:
        parser.error("--chat-special-tokens only applies with --chat")
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        if args.prompt is not None:
            check_text(args.prompt, "--prompt")
        else:
            args.prompt_ids = _parse_ids(args.prompt_ids)
    except ValueError as e:  # TokenizerError is one
        parser.error(str(e))
    return args


def _parse_ids(text: str) -> list[int]:
    """--prompt-ids as ints; an empty or blank list gives [] (refused later as an empty prompt), an empty field
    (`3,,4`, `3,`) is an error rather than dropped."""
    if not text.strip():
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers with none left empty, got {text!r}") from None


def _check_prompt_ids(ids: list[int], bundle) -> None:
    """Raises ValueError for the pad id (unless it is also eos) in a prompt: the model takes it, but it marks
    padding, not text (the Generator refuses the mask and, given the tokenizer's size, ids past the tokenizer)."""
    model = bundle.config.model
    if model.pad_token_id != model.eos_token_id and model.pad_token_id in ids:
        raise ValueError(f"the prompt contains the pad id {model.pad_token_id}, which marks padding, not text")


def _decode_config(config, args: argparse.Namespace):
    """The checkpoint's config with decode.* overrides, then flags, applied (typed and validated)."""
    from infer.common import MODEL_OVERRIDES
    from tidar_jax.config import ConfigError, apply_overrides

    for item in args.overrides:
        if "=" not in item or not (item.startswith(("decode.", "mesh.")) or item.split("=", 1)[0] in MODEL_OVERRIDES):
            raise ConfigError(f"override {item!r} must look like decode.field=value or mesh.field=value (only "
                              f"decode.*, mesh.* and {', '.join(MODEL_OVERRIDES)} can change)")
    flags = {"max_new_tokens": args.max_new_tokens, "block_size": args.block_size, "beta": args.beta,
             "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    flag_overrides = [f"decode.{name}={value}" for name, value in flags.items() if value is not None]
    return apply_overrides(config, list(args.overrides) + flag_overrides)


def _mesh(args: argparse.Namespace):
    """The decoding mesh asked for by mesh.* overrides, or None: one device. Sizes default to MeshConfig's (data=-1
    takes every device left); with no -1 the mesh uses the first data * fsdp * tensor devices."""
    import math

    import jax

    from tidar_jax.config import load_config
    from tidar_jax.sharding import make_mesh

    mesh_overrides = [o for o in args.overrides if o.startswith("mesh.")]
    if not mesh_overrides:
        return None
    mesh_cfg = load_config(None, mesh_overrides).mesh
    sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    return make_mesh(mesh_cfg, jax.devices() if -1 in sizes else jax.devices()[:math.prod(sizes)])


def _prompt_ids(args: argparse.Namespace, bundle) -> list[int]:
    """Token ids of --prompt-ids, --prompt, or --prompt wrapped in the checkpoint's chat template (--chat)."""
    if args.prompt is None:
        if args.chat:
            raise ValueError("--chat needs --prompt TEXT (the template renders text)")
        ids = args.prompt_ids
    elif bundle.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json: pass the prompt as --prompt-ids")
    elif args.chat:
        from tidar_jax.data.chat import encode_chat

        ids = encode_chat(bundle.tokenizer.path.parent, [{"role": "user", "content": args.prompt}],
                          special_tokens_in_content=args.chat_special_tokens)
    else:
        ids = bundle.tokenizer.encode(args.prompt)
    _check_prompt_ids(ids, bundle)
    return ids


class _TextStream:
    """Prints the decoded text of the tokens so far, holding back an incomplete UTF-8 tail ('\ufffd')."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def __call__(self, new_tokens: list[list[int]]) -> None:
        self.ids += new_tokens[0]
        if self.tokenizer is None:
            if new_tokens[0]:
                self.out.write(" ".join(map(str, new_tokens[0])) + " ")
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
            self.out.write(text[self.printed:])
            self.printed = max(self.printed, len(text))
        self.out.flush()


def run(args: argparse.Namespace) -> dict:
    """Loads the checkpoint, generates, streams unless --json; returns the JSON summary."""
    from tidar_jax.checkpoint.inference import load_for_inference, with_model
    from tidar_jax.checkpoint.store import step_path
    from tidar_jax.decoding import tuning
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.layout.masks import step_query_count
    from tidar_jax.model.transformer import resolved_config
    from tidar_jax.ops import kernel_choice
    from tidar_jax.ops.attention import auto_uses_kernel

    mesh = _mesh(args)
    bundle = load_for_inference(step_path(args.checkpoint, args.step), mesh)  # restored straight onto the mesh
    cfg = _decode_config(bundle.config, args)
    bundle = with_model(bundle, cfg.model)
    tokenizer = bundle.tokenizer
    prompt_ids = _prompt_ids(args, bundle)
    generator = Generator(bundle.graphdef, bundle.params, cfg.model, cfg.decode,
                          allow_block_size_mismatch=args.allow_block_size_mismatch, mesh=mesh,
                          tokenizer_size=None if tokenizer is None else tokenizer.vocab_size,
                          tuning=tuning.for_decode(cfg.decode, bundle.workdir, bundle.step))
    stream = None if args.json else _TextStream(tokenizer, sys.stdout)
    result = generator.generate([prompt_ids], args.mode, seed=args.seed, on_tokens=stream)
    tokens = result.tokens[0]
    m = generator.model_cfg
    step_tokens = 1 if args.mode == "ar" else step_query_count(result.block_size, True, result.proposal_lengths)
    return {
        "token_ids": tokens,
        "text": None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True),
        "prompt_ids": prompt_ids, "mode": args.mode, "block_size": result.block_size,
        "proposal_lengths": list(result.proposal_lengths),
        "forwards": result.forwards, "tokens_per_forward": result.tokens_per_forward,
        "tokens_per_second": result.tokens_per_second, "wall_time_s": result.wall_time_s,
        "compile_time_s": result.compile_time_s, "acceptance_histogram": result.acceptance_histogram,
        "finish_reason": result.finish_reasons[0], "checkpoint_step": bundle.step,
        # What ran, as resolved for this backend: "auto" becomes a concrete attention implementation, and the layer
        # layout is decode.scan_layers's, whatever the checkpoint's.
        "attention_impl": resolved_config(generator.model_cfg).attention_impl,
        "compute_dtype": generator.model_cfg.compute_dtype,
        "scan_layers": generator.model_cfg.scan_layers,
        # Whether the decode step's attention ran on the CPU kernel (never in mesh programs; in mode auto, where it
        # was measured faster), and every kernel choice this process measured or read.
        "cpu_attention_kernel": mesh is None and auto_uses_kernel(m.head_dim, m.n_heads, step_tokens, m.compute_dtype)
        and (kernel_choice.mode() == "on" or any(key.startswith("attention") and c["choice"] == "kernel"
                                                 for key, c in kernel_choice.decisions()["choices"].items())),
        "cpu_kernels": kernel_choice.decisions(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from tidar_jax import caches

    caches.enable_compile_cache()  # before anything compiles: a repeated run loads its programs from disk
    from infer.common import USER_ERRORS, fail

    try:
        summary = run(args)
    except USER_ERRORS as e:
        return fail(e)
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        print(f"[{len(summary['token_ids'])} tokens, {summary['forwards']} forwards, "
              f"{summary['tokens_per_forward']:.2f} tokens/forward, {summary['tokens_per_second']:.1f} tokens/s, "
              f"finished by {summary['finish_reason']}; {summary['attention_impl']} attention"
              f"{' (CPU kernel)' if summary['cpu_attention_kernel'] else ''}, {summary['compute_dtype']}, "
              f"{'scanned' if summary['scan_layers'] else 'unrolled'} layers]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
