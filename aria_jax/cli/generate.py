"""`aria-jax generate`: one prompt about zero or more images, the answer streamed to stdout."""

from __future__ import annotations

import argparse

from aria_jax.cli.models import (
    check_family_options,
    check_sampling_options,
    image_options,
    load_model,
    load_processor,
    model_family,
)
from aria_jax.cli.options import UserError, add_answer_options, add_command


def add(commands) -> None:
    command = add_command(
        commands,
        "generate",
        "answer a prompt about zero or more images, streaming the answer",
        description="Answer one prompt, about zero or more images, with a model directory in hub format "
        "(or a converted checkpoint) of Aria, Qwen2-VL or Awaker2.5-VL, told apart by its config.json. "
        "The prompt is wrapped in the chat template as a user turn with the images first; the answer "
        "streams to stdout as it is generated and stops at <|im_end|>. Greedy unless --temperature is "
        "above 0. Loading progress goes to stderr.",
    )
    command.add_argument(
        "--model", required=True, help="hub-format model directory (config.json, safetensors, tokenizer)"
    )
    command.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    command.add_argument("--prompt", required=True, help="the question or instruction")
    add_answer_options(command, 32, "tokens to generate at most")
    command.set_defaults(run=run)


def chat_prompt(processor, prompt: str, num_images: int) -> str:
    """One user turn: the images first, then the text, as Aria's and Qwen2-VL's own examples do."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def run(args: argparse.Namespace) -> None:
    from aria_jax.tokenizer import check_text

    family = model_family(args.model)
    if args.image and not family.multimodal:
        raise UserError(f"{args.model}: a text-only model; it takes no --image")
    check_family_options(args, family)
    check_text(args.prompt, "--prompt")
    processor = load_processor(args.model, family)
    inputs = processor(
        text=chat_prompt(processor, args.prompt, len(args.image)), images=args.image or None, **image_options(args)
    )
    check_sampling_options(args, inputs["input_ids"].shape[1], args.max_new_tokens)
    model = load_model(args.model, family, args.dtype, args.quantize, gate=args.awaker_gate)
    if not family.multimodal:
        inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    for piece in model.stream(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        kv_cache_dtype=args.kv_cache_dtype,
    ):
        print(piece, end="", flush=True)
    print()
