"""`aria-jax chat`: a conversation with a model (the session itself is `chat_session`)."""

from __future__ import annotations

import argparse
import sys

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
        "chat",
        "a multi-turn conversation with a model, images attached with /image",
        description="Talk with a model, one line per message. Each turn the whole conversation, earlier "
        "images and answers included, is rendered with the chat template, and the answer streams "
        "to stdout. Commands: /image PATH attaches an image to the next message, /reset starts "
        "over, /help lists the commands, /quit or end of input (Ctrl-D) leaves. On a terminal a "
        "'> ' prompt is shown; with piped input stdout holds only the answers, one per question, "
        "and errors are single lines on stderr.",
    )
    command.add_argument(
        "--model", required=True, help="hub-format model directory (config.json, safetensors, tokenizer)"
    )
    add_answer_options(
        command, 256, "tokens per answer at most (fewer once the conversation nears the model's context)"
    )
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from aria_jax.cli.chat_session import ChatSession, Settings, enable_line_editing

    family = model_family(args.model)
    check_family_options(args, family)
    check_sampling_options(args, 0, max_new_tokens=1)  # chat shortens answers to the context left
    processor = load_processor(args.model, family)
    if args.max_image_size is not None and args.max_image_size not in processor.allowed_sizes:
        allowed = ", ".join(str(size) for size in processor.allowed_sizes)
        raise UserError(f"max_image_size={args.max_image_size} is not allowed; use one of: {allowed}")
    model = load_model(args.model, family, args.dtype, args.quantize, gate=args.awaker_gate)
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
    settings = Settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        image_options=image_options(args),
        kv_cache_dtype=args.kv_cache_dtype,
    )
    ChatSession(model, processor, family.multimodal, settings, interactive=interactive).run()
