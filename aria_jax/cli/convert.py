"""`aria-jax convert` and `aria-jax export`: the commands of the checkpoint converter, which lives
in the `convert` package and is imported only when one of them runs."""

from __future__ import annotations

import argparse
import sys
import warnings

from aria_jax.cli.options import add_command, byte_size, positive_int


def add(commands) -> None:
    conv = add_command(
        commands,
        "convert",
        "convert a hub checkpoint (safetensors) into a self-contained orbax checkpoint",
        description="Convert a hub-format model directory (transformers or original rhymes-ai naming, one or "
        "many safetensors files) into a self-contained directory: normalized config.json, the "
        "tokenizer, processor and chat template files, and the params as orbax checkpoints, which "
        "restore faster and straight into a device mesh. Shows a progress bar over bytes and ends "
        "with a summary line.",
    )
    conv.add_argument("source", help="hub-format model directory (config.json, safetensors, tokenizer files)")
    conv.add_argument("destination", help="directory to create")
    conv.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="dtype of the stored params (default: the source's)",
    )
    conv.add_argument(
        "--strict",
        action="store_true",
        help="refuse weights holding NaN or infinite values instead of naming them in a warning",
    )
    conv.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="store the decoder's linear weights quantized (int8 per output channel, int4 in groups), "
        "scales beside them; from_pretrained loads them as stored",
    )
    conv.add_argument("--group-size", type=positive_int, default=128, help="int4: inputs per scale")
    conv.add_argument(
        "--quantize-vision",
        action="store_true",
        help="with --quantize: the vision tower's and projector's linear weights too",
    )
    conv.add_argument(
        "--awaker",
        metavar="PYTORCH_MODEL_BIN",
        default=None,
        help="build Awaker2.5-VL from its pytorch_model.bin (read without running its pickle); SOURCE is then "
        "the Qwen2-VL base directory (config, tokenizer and processor files)",
    )
    conv.add_argument(
        "--awaker-lora-alpha",
        type=float,
        default=None,
        help="the adapters' alpha, which the .bin does not store (default: twice their rank, as released)",
    )
    add_writing_options(conv)
    conv.set_defaults(run=run_convert)

    exp = add_command(
        commands,
        "export",
        "write a converted checkpoint back as hub-format safetensors that transformers loads",
        description="Write a checkpoint made by `aria-jax convert` back as a hub-format directory: sharded "
        "safetensors with an index, config.json and the tokenizer files, which transformers' "
        "from_pretrained loads. Shows a progress bar over bytes and ends with a summary line.",
    )
    exp.add_argument("source", help="converted checkpoint directory (made by `aria-jax convert`)")
    exp.add_argument("destination", help="directory to create")
    exp.add_argument("--max-shard-size", type=byte_size, default="5GB", help="largest safetensors file")
    add_writing_options(exp)
    exp.set_defaults(run=run_export)


def add_writing_options(command: argparse.ArgumentParser) -> None:
    """What convert and export share: a destination that may exist, and a progress bar."""
    command.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the destination if it exists and is what this command writes (or empty)",
    )
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def run_convert(args: argparse.Namespace) -> None:
    from convert.conversion import NonFiniteWarning, convert_checkpoint, nonfinite_message

    quiet_orbax()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)  # said below, in one line
        summary = convert_checkpoint(
            args.source,
            args.destination,
            dtype=args.dtype,
            overwrite=args.overwrite,
            quiet=args.quiet,
            strict=args.strict,
            quantize=args.quantize,
            group_size=args.group_size,
            quantize_vision=args.quantize_vision,
            awaker=args.awaker,
            awaker_lora_alpha=args.awaker_lora_alpha,
        )
    if summary.nonfinite:
        print(f"aria-jax: warning: {nonfinite_message(summary.nonfinite)} (--strict refuses them)", file=sys.stderr)
    print(summary.line())


def run_export(args: argparse.Namespace) -> None:
    from convert.conversion import export_checkpoint

    quiet_orbax()
    summary = export_checkpoint(
        args.source, args.destination, overwrite=args.overwrite, quiet=args.quiet, max_shard_bytes=args.max_shard_size
    )
    print(summary.line())


def quiet_orbax() -> None:
    """Orbax logs routine steps of every save as absl warnings; the progress bar says enough."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
