"""`aria-jax serve`: an OpenAI-compatible HTTP server with continuous batching (`aria_jax.server`)."""

from __future__ import annotations

import argparse
import os
import sys

from aria_jax.cli.models import Family, check_family_options, load_model, load_processor, model_family, progress_line
from aria_jax.cli.options import (
    UserError,
    add_awaker_gate_option,
    add_command,
    add_kv_cache_dtype_option,
    parse_mesh,
    positive_int,
)


def add(commands) -> None:
    command = add_command(
        commands,
        "serve",
        "an OpenAI-compatible HTTP server with continuous batching",
        description="Serve a model (Aria, Qwen2-VL or Awaker2.5-VL, told apart by its config.json) over HTTP with OpenAI's API: POST /v1/chat/completions (text and image_url "
        "parts, images as data: URLs), POST /v1/completions, GET /v1/models, GET /health (200 once "
        "ready) and GET /metrics (Prometheus). Requests share --max-batch decode slots: each is "
        "prefilled into a free slot while the others keep decoding, and leaves it as soon as it "
        "ends. On several hosts run the same command on every process with --distributed; process "
        "0 serves HTTP.",
    )
    option = command.add_argument
    option("--model", required=True, help="model directory (hub format or converted), with its tokenizer")
    option("--host", default="127.0.0.1", help="address to listen on")
    option("--port", type=int, default=8000, help="port to listen on")
    option("--max-batch", type=positive_int, default=8, help="decode slots: requests answered at once")
    option(
        "--max-length",
        type=positive_int,
        default=None,
        help="cache positions per slot, prompt and answer (default: the model's context, at most 4096)",
    )
    option("--max-queue", type=int, default=64, help="requests waiting beyond it get 429")
    option("--decode-steps", type=positive_int, default=8, help="tokens per slot between admissions of new requests")
    option(
        "--served-model-name", default=None, help="the model id clients ask for (default: the model directory's name)"
    )
    option(
        "--allowed-media-dir",
        default=None,
        help="image_url may name local files under this directory (otherwise only data: URLs)",
    )
    option(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="param and compute dtype (bfloat16 on TPU and GPU)",
    )
    option("--quantize", choices=["int8", "int4"], default=None, help="quantize the decoder's weights as they load")
    add_kv_cache_dtype_option(command)
    add_awaker_gate_option(command)
    option("--mesh", default=None, help="mesh axis sizes over all devices, e.g. data=2,expert=4")
    option(
        "--distributed",
        action="store_true",
        help="several processes: jax.distributed.initialize (on TPU pods it reads the environment)",
    )
    option("--coordinator", default=None, help="with --distributed off TPU: process 0's host:port")
    option("--num-processes", type=int, default=None, help="with --distributed off TPU")
    option("--process-id", type=int, default=None, help="with --distributed off TPU")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Every process of a multi-host mesh runs this: process 0 serves HTTP and leads the
    engine's rounds, the others follow them (`aria_jax.engine`)."""
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
    import aria_jax

    if args.distributed:
        aria_jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from aria_jax.engine import Engine

    family = model_family(args.model)
    check_family_options(args, family)
    if args.allowed_media_dir is not None and not os.path.isdir(args.allowed_media_dir):
        raise UserError(f"--allowed-media-dir {args.allowed_media_dir}: no such directory")
    try:
        from aria_jax.server import create_app, default_model_name
        import uvicorn
    except ImportError as err:
        raise UserError(f"serving needs the serve extra (pip install 'aria-jax[serve]'): {err}") from None
    processor = load_processor(args.model, family)
    mesh = aria_jax.make_mesh(**mesh_sizes) if mesh_sizes else None
    model = load_model(args.model, family, args.dtype, args.quantize, mesh, gate=args.awaker_gate)
    engine = Engine(
        model,
        max_batch=args.max_batch,
        max_length=args.max_length,
        decode_steps=args.decode_steps,
        max_queue=args.max_queue,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if jax.process_index() != 0:
        engine.follow()
        return
    with progress_line("compiling"):
        warm_up(engine, processor, family)
    name = args.served_model_name or default_model_name(args.model)
    app = create_app(engine, processor, name, allowed_media_dir=args.allowed_media_dir)
    print(
        f"aria-jax: serving {name} on http://{args.host}:{args.port} ({args.max_batch} slots of "
        f"{engine.max_length} positions)",
        file=sys.stderr,
        flush=True,
    )
    with engine:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def warm_up(engine, processor, family: Family) -> None:
    """`engine.warm_up()`; for Awaker, whose routers read the prompt's chat turns
    (`qwen2_vl.awaker.prompt_spans`) and so refuse the one-token prompt that warms the others
    up, the same steps with the chat template's shortest prompt."""
    if not family.gates:
        engine.warm_up()
        return
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], True)
    handle = engine.submit(processor(text=prompt)["input_ids"], max_new_tokens=2, stop_strings=None)
    while engine.step():
        pass
    handle.result()
    engine.tokens_generated = 0
