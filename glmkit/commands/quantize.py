"""Quantize a checkpoint's weights to int8 or int4 and write them as a new checkpoint.

    glmkit quantize --model THUDM/chatglm3-6b --mode int4 --out chatglm3-6b-int4
    glmkit chat --model chatglm3-6b-int4

The float checkpoint is read tensor by tensor and each weight is quantized as it is read, so memory
holds the quantized model, never the float one. The output folder holds config.json and safetensors
files that both record the quantization (mode, group size, symmetry, how the embedding and output
layer are stored), and a copy of tokenizer.model; `glmkit chat` / `glmkit.load` / `load_model` load it
by memory-mapping, without converting anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import CommandError

LAYER_MODES = ["int8", "int4", "none"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, metavar="PATH_OR_ID",
                        help="the float checkpoint: a folder or a Hugging Face Hub id")
    parser.add_argument("--mode", required=True, choices=["int8", "int4"],
                        help="how the transformer blocks' weights are stored")
    parser.add_argument("--group-size", default=None, type=group_size, metavar="G",
                        help="inputs per scale: 32, 64, 128 or 256, or 'channel' for one scale per output row "
                             "(int8 only). Smaller groups are more accurate and a little larger "
                             "(default: int8 channel, int4 128)")
    parser.add_argument("--asymmetric", action="store_true",
                        help="a zero point per group besides the scale (default: symmetric)")
    parser.add_argument("--embedding", choices=LAYER_MODES, default="int8",
                        help="how the input embedding is stored (default: int8)")
    parser.add_argument("--output-layer", choices=LAYER_MODES, default="int8",
                        help="how the output layer is stored (default: int8; it is sensitive to int4)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype of what stays floating point (norms, biases) and of the activations "
                             "(default: bfloat16, what the CPU kernels take)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, metavar="GB",
                        help="largest safetensors file to write (default: 2)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write the checkpoint to")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: one per core)")


def group_size(text: str) -> int:
    if text == "channel":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a group size: use 32, 64, 128, 256 or channel") from None


def main(args: argparse.Namespace) -> int:
    import torch

    from glmkit.loader import TOKENIZER, load_model, resolve_model_dir, save_model
    from glmkit.quant import QuantConfig, QuantConfigError
    from glmkit.quant.checkpoint import describe

    try:
        quant = QuantConfig(args.mode, args.group_size, not args.asymmetric, args.embedding, args.output_layer)
    except QuantConfigError as e:
        raise CommandError(str(e)) from None
    if args.max_shard_gb <= 0:
        raise CommandError(f"--max-shard-gb {args.max_shard_gb} must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        source = resolve_model_dir(args.model)
        if out.exists() and out.resolve() == source.resolve():
            raise CommandError("--out is the source checkpoint's folder: write the quantized one elsewhere")
        model = load_model(source, dtype=args.dtype, quantize=quant, progress=sys.stderr.isatty())
        tokenizer = source / TOKENIZER
        save_model(model, out, max_shard_bytes=int(args.max_shard_gb * 1e9),
                   tokenizer_path=tokenizer if tokenizer.is_file() else None)
    except (OSError, ValueError, RuntimeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommandError(f"cannot quantize {args.model!r}: {message}") from None
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {describe(quant)}, {size / 1e9:.2f} GB of weights "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
