"""`aria-jax` console script. A user error prints one line naming the problem and exits 2."""

from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """A problem with what the user asked for, reported as one line without a traceback."""


def _load_sentencepiece(model_dir: str):
    import sentencepiece

    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no tokenizer.model (a sentencepiece model) next to the weights")
    return sentencepiece.SentencePieceProcessor(model_file=path)


def generate(args: argparse.Namespace) -> None:
    import numpy as np

    import aria_jax

    if not os.path.isdir(args.model):
        raise UserError(f"{args.model}: no such model directory")
    tokenizer = _load_sentencepiece(args.model)
    model = aria_jax.AriaTextForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError("--prompt is empty")
    tokens = model.generate(np.asarray([prompt_ids], np.int32), max_new_tokens=args.max_new_tokens)
    new_ids = [int(t) for t in tokens[0, len(prompt_ids):]]
    stops = set(model.config.eos_token_id)
    if stops & set(new_ids):
        new_ids = new_ids[: min(new_ids.index(s) for s in stops if s in new_ids)]
    print(tokenizer.decode(new_ids))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-jax", description="Aria in JAX: generation and weight conversion.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate", help="generate text from a prompt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("--model", required=True, help="hub-format model directory (config.json, safetensors, tokenizer.model)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate at most")
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
