"""`aria-jax` console script. A user error prints one line naming the problem and exits 2."""

from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """A problem with what the user asked for, reported as one line without a traceback."""


def chat_prompt(processor, prompt: str, num_images: int) -> str:
    """One user turn: the images first, then the text, as Aria's own examples do."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def generate(args: argparse.Namespace) -> None:
    import aria_jax
    from aria_jax.config import is_multimodal, read_config_json

    if not os.path.isdir(args.model):
        raise UserError(f"{args.model}: no such model directory")
    multimodal = is_multimodal(read_config_json(args.model))
    if args.image and not multimodal:
        raise UserError(f"{args.model}: a text-only model; it takes no --image")
    processor = aria_jax.AriaProcessor.from_pretrained(args.model)
    inputs = processor(text=chat_prompt(processor, args.prompt, len(args.image)), images=args.image or None,
                       max_image_size=args.max_image_size, split_image=args.split_image)
    model_class = aria_jax.AriaForConditionalGeneration if multimodal else aria_jax.AriaTextForCausalLM
    model = model_class.from_pretrained(args.model, dtype=args.dtype)
    if not multimodal:
        inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    for piece in model.stream(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        print(piece, end="", flush=True)
    print()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-jax", description="Aria in JAX: generation and weight conversion.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate", help="answer a prompt about zero or more images, streaming the answer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("--model", required=True, help="hub-format model directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--max-image-size", type=_positive_int, default=None,
                     help="crop size in pixels (490 or 980 for Aria); default: the checkpoint's")
    gen.add_argument("--split-image", action="store_true", help="also feed high-resolution tiles of each image")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter and compute dtype")
    gen.set_defaults(run=generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from aria_jax import CheckpointError, ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"aria-jax: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
