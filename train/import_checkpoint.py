"""Import a pretrained Hugging Face or GGUF model as a tidar_jax checkpoint, or export one back to Hugging Face.

    python -m train.import_checkpoint --from hf ~/models/Qwen2.5-0.5B --out runs/qwen-import --block-size 8
    python -m train.import_checkpoint --from gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    python -m train.import_checkpoint --export-hf exported/ --checkpoint runs/smollm2-tidar
    python -m train.import_checkpoint --from gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2-tidar \
        --adapters adapters/smollm2-135m-k4
    python -m train.import_checkpoint --export-adapters my-pack/ --checkpoint runs/smollm2-adapters

Import writes OUT/checkpoints/0 (a params-only checkpoint that infer/*.py and train.init_from read),
OUT/tokenizer.json (with the added <|mask|> / <|pad|> tokens), OUT/tokenizer_config.json and OUT/chat_template.jinja
(when the model has a chat template) and OUT/hf_config.json (the source architecture, reused by --export-hf).
Supported: Qwen2 / Qwen2.5 / Qwen3 / Llama / Ministral-3 (config.json + safetensors, sharded or not; a mistral3
directory as its text decoder),
Nemotron-Labs-Diffusion (model_type nemotron_labs_diffusion: its trained mask row, e.g. id 100, and its tokenizer
are kept; model.block_size defaults to 4, the trained block 32 stays in OUT/hf_config.json;
tidar_jax/interop/nemotron_diffusion.py) and llama-architecture GGUF files (dequantised to float32). Otherwise the
diffusion mask token takes the first unused embedding row, or the embedding grows to the next multiple of 64 (see
tidar_jax/interop/hf.py). Export writes config.json + model.safetensors (every
embedding row, mask included) + the tokenizer files, loadable by transformers.AutoModelForCausalLM. Needs the
`interop` extra (transformers, torch CPU, safetensors, gguf); transformers is run offline.

Adapter packs (tidar_jax/interop/adapter_pack.py): `--adapters PACK` attaches a pack of mask-gated TiDAR adapters
to the model being imported (the pack's block size becomes model.block_size; a pack trained on another base model
is refused, naming the field), so the checkpoint drafts with them while its AR output stays the base model's;
`--export-adapters DIR --checkpoint WORKDIR` writes the adapters of an adapter-trained run as such a pack
(bfloat16 unless --adapters-dtype float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every input is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TOKENIZER_EXTRAS = ("tokenizer_config.json", "chat_template.jinja")
HF_CONFIG_FILE = "hf_config.json"
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.import_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=("hf", "gguf"),
                        help="import mode: 'hf' = a Hugging Face model directory (config.json + *.safetensors), "
                             "'gguf' = a llama.cpp .gguf file; give its PATH as the positional argument")
    parser.add_argument("path", nargs="?", metavar="PATH", help="the model directory (hf) or .gguf file (gguf)")
    parser.add_argument("--out", help="new workdir to create for the imported checkpoint (must not exist, or be "
                                      "empty)")
    parser.add_argument("--block-size", type=int,
                        help="draft block size K recorded in the config (model.block_size, the K decoding uses "
                             "by default); default: the tidar_block_size of a checkpoint exported by --export-hf, "
                             "else 4 (Nemotron-Labs-Diffusion included, whose trained block is 32)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="import: parameter dtype of the checkpoint; export: dtype of the safetensors. "
                             "Default float32")
    parser.add_argument("--compute-dtype", choices=DTYPES,
                        help="model.compute_dtype recorded in the imported config (default: same as --dtype)")
    parser.add_argument("--eos-token-id", type=int,
                        help="end-of-sequence id when config.json / the GGUF metadata has none (or to override it)")
    parser.add_argument("--export-hf", metavar="DIR",
                        help="export mode: write the checkpoint given by --checkpoint as a Hugging Face model "
                             "directory DIR (must not exist, or be empty)")
    parser.add_argument("--checkpoint", metavar="WORKDIR",
                        help="with --export-hf / --export-adapters: a workdir (latest step) or one checkpoint step "
                             "directory")
    parser.add_argument("--adapters", metavar="PACK",
                        help="import: attach this adapter pack (adapters.json + tidar_adapters.safetensors)")
    parser.add_argument("--export-adapters", metavar="DIR",
                        help="export mode: write the adapters of the adapter-trained --checkpoint as a pack in DIR")
    parser.add_argument("--adapters-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="with --export-adapters: dtype of the pack's tensors (default bfloat16)")
    args = parser.parse_args(argv)
    exports = [flag for flag, value in (("--export-hf", args.export_hf), ("--export-adapters", args.export_adapters))
               if value]
    if len(exports) > 1:
        parser.error("choose one of --export-hf and --export-adapters")
    if exports:
        if args.source or args.path or args.out or args.adapters:
            parser.error(f"{exports[0]} takes --checkpoint WORKDIR, not --from / PATH / --out / --adapters")
        if not args.checkpoint:
            parser.error(f"{exports[0]} needs --checkpoint WORKDIR")
    else:
        if not (args.source and args.path and args.out):
            parser.error("import needs --from {hf,gguf} PATH --out DIR (or use --export-hf DIR --checkpoint WORKDIR)")
        if args.block_size is not None and args.block_size <= 0:
            parser.error(f"--block-size must be positive, got {args.block_size}")
        if args.adapters and args.block_size is not None:
            parser.error("--adapters sets the block size the adapters were trained for: drop --block-size")
        if args.adapters and not Path(args.adapters).is_dir():
            parser.error(f"--adapters {args.adapters}: not a directory")
        if not Path(args.path).exists():
            parser.error(f"--from {args.source} {args.path}: the path does not exist")
    return args


def _require_fresh(path: Path) -> None:
    """Refuses an existing PATH unless it is a directory holding nothing (but our own lock file)."""
    from tidar_jax.workdir_lock import LOCK_NAME

    if path.exists() and (not path.is_dir() or any(p.name != LOCK_NAME for p in path.iterdir())):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (choose a new directory)")


def _copy_extras(src: Path, dst: Path) -> None:
    for name in TOKENIZER_EXTRAS:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _run_config(model_cfg):
    from tidar_jax.config import Config, DataConfig, validate

    k = model_cfg.block_size
    return validate(Config(model=model_cfg, data=DataConfig(seq_len=-(-64 // k) * k)))


def run_import(args: argparse.Namespace) -> Path:
    """Imports args.path into the new workdir args.out, holding its lock (`workdir_lock`) throughout: a second
    import (or a training run) on OUT is refused, naming the holder."""
    from tidar_jax.workdir_lock import workdir_lock

    out = Path(args.out)
    created = not out.exists()
    with workdir_lock(out):  # before the freshness check, so that a running import is named as the holder
        _require_fresh(out)
        return _import(args, out, created)


def _import(args: argparse.Namespace, out: Path, created: bool) -> Path:
    from tidar_jax.checkpoint.inference import save_inference_checkpoint
    from tidar_jax.interop import hf

    kwargs = dict(block_size=args.block_size, param_dtype=args.dtype, compute_dtype=args.compute_dtype,
                  eos_token_id=args.eos_token_id)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.source == "hf":
            src = Path(args.path)
            imported = hf.import_hf_checkpoint(src, **kwargs)
            hf_config = json.loads((src / "config.json").read_text())
            extras_dir = src
        else:
            from tidar_jax.interop.gguf import import_gguf_checkpoint

            imported, hf_config = import_gguf_checkpoint(args.path, scratch, **kwargs)
            extras_dir = scratch
        print(f"read {args.path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        config = _run_config(imported.config)
        tokenizer_file = None
        if imported.tokenizer_json is not None:
            tokenizer_file = scratch / "tokenizer.with_mask.json"
            tokenizer_file.write_text(imported.tokenizer_json)
        params = imported.params
        if args.adapters:
            config, params = _attached(config, params, tokenizer_file, args.adapters)
        try:
            save_inference_checkpoint(out, config, params, tokenizer_file)
            _copy_extras(extras_dir, out)
            (out / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        except BaseException:
            if created:  # leave no half-written workdir behind
                shutil.rmtree(out, ignore_errors=True)
            raise
    m = config.model
    from tidar_jax.model.transformer import count_params

    adapters = f", adapters {args.adapters} (rank {m.adapter_rank})" if args.adapters else ""
    print(f"wrote {out}: {count_params(imported.params) / 1e6:.1f}M params, {m.n_layers} layers, vocab {m.vocab_size}, "
          f"mask id {m.mask_token_id}, eos id {m.eos_token_id}, block size {m.block_size}{adapters} "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return out


def _attached(config, params, tokenizer_file: Path | None, pack: str):
    """(config, params) of the imported model with the adapter pack attached (interop/adapter_pack.py)."""
    from tidar_jax.checkpoint.inference import InferenceBundle
    from tidar_jax.data.tokenizer import Tokenizer
    from tidar_jax.interop.adapter_pack import attach_adapter_pack
    from tidar_jax.model.init import abstract_model

    tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file is not None else None
    base = InferenceBundle(config=config, graphdef=abstract_model(config.model)[0], params=params,
                           tokenizer=tokenizer, step=0)
    adapted = attach_adapter_pack(base, pack)
    return _run_config(adapted.config.model), adapted.params


def run_export_adapters(args: argparse.Namespace) -> Path:
    from tidar_jax.checkpoint.inference import load_for_inference
    from tidar_jax.interop.adapter_pack import export_adapter_pack

    bundle = load_for_inference(args.checkpoint)
    out = export_adapter_pack(bundle, args.export_adapters, args.adapters_dtype)
    m = bundle.config.model
    print(f"exported the adapters (rank {m.adapter_rank}, block size {m.block_size}) of step {bundle.step} of "
          f"{args.checkpoint} to {out}", file=sys.stderr)
    return out


def run_export(args: argparse.Namespace) -> Path:
    from tidar_jax.checkpoint.inference import load_for_inference
    from tidar_jax.interop import hf

    out = Path(args.export_hf)
    _require_fresh(out)
    t0 = time.perf_counter()
    bundle = load_for_inference(args.checkpoint)
    workdir = Path(args.checkpoint)
    workdir = next((p for p in (workdir, *workdir.parents) if (p / "checkpoints").is_dir()), workdir)
    base = workdir / HF_CONFIG_FILE
    hf.export_hf_checkpoint(out, bundle.config.model, bundle.params, args.dtype,
                                 json.loads(base.read_text()) if base.is_file() else None)
    if (workdir / "tokenizer.json").is_file():
        shutil.copyfile(workdir / "tokenizer.json", out / "tokenizer.json")
    _copy_extras(workdir, out)
    print(f"exported step {bundle.step} of {args.checkpoint} to {out} ({time.perf_counter() - t0:.1f}s)",
          file=sys.stderr)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from tidar_jax.checkpoint.store import CheckpointError
    from tidar_jax.config import ConfigError
    from tidar_jax.interop.hf import ConversionError

    try:
        if args.export_hf:
            run_export(args)
        elif args.export_adapters:
            run_export_adapters(args)
        else:
            run_import(args)
    except (ConversionError, CheckpointError, ConfigError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
