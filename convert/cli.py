"""`aria-jax` console script. A user error prints one line naming the problem and exits 2."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings

from benchmarks.run import add_options as add_bench_options
from benchmarks.run import main as run_benchmarks


class UserError(Exception):
    """A problem with what the user asked for, reported as one line without a traceback."""


class CommandLineParser(argparse.ArgumentParser):
    """A mistake on the command line is one line too, like every other user error: the usage
    that argparse prints first is one --help away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: "off" for a flag, "none" for an option unset
    by default; not for required values, nor where the help explains the default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or not action.option_strings or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        if action.nargs == 0 and action.default is False:  # store_true
            return f"{text} (default: off)"
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def chat_prompt(processor, prompt: str, num_images: int) -> str:
    """One user turn: the images first, then the text, as Aria's own examples do."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def generate(args: argparse.Namespace) -> None:
    import aria_jax
    from aria_jax.tokenizer import check_text

    multimodal = takes_images(args.model)
    if args.image and not multimodal:
        raise UserError(f"{args.model}: a text-only model; it takes no --image")
    check_text(args.prompt, "--prompt")
    processor = aria_jax.AriaProcessor.from_pretrained(args.model)
    inputs = processor(text=chat_prompt(processor, args.prompt, len(args.image)), images=args.image or None,
                       max_image_size=args.max_image_size, split_image=args.split_image)
    check_sampling_options(args, inputs["input_ids"].shape[1], args.max_new_tokens)
    model = load_model(args.model, multimodal, args.dtype, args.quantize)
    if not multimodal:
        inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    for piece in model.stream(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              kv_cache_dtype=args.kv_cache_dtype):
        print(piece, end="", flush=True)
    print()


def chat(args: argparse.Namespace) -> None:
    import aria_jax
    from convert.chat import ChatSession, Settings, enable_line_editing

    multimodal = takes_images(args.model)
    check_sampling_options(args, 0, max_new_tokens=1)  # chat shortens answers to the context left
    processor = aria_jax.AriaProcessor.from_pretrained(args.model)
    if args.max_image_size is not None and args.max_image_size not in processor.allowed_sizes:
        allowed = ", ".join(str(size) for size in processor.allowed_sizes)
        raise UserError(f"max_image_size={args.max_image_size} is not allowed; use one of: {allowed}")
    model = load_model(args.model, multimodal, args.dtype, args.quantize)
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
    settings = Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, max_image_size=args.max_image_size, split_image=args.split_image,
                        kv_cache_dtype=args.kv_cache_dtype)
    ChatSession(model, processor, multimodal, settings, interactive=interactive).run()


def takes_images(model_dir: str) -> bool:
    """Whether the model in `model_dir` is multimodal; a UserError if there is no such directory."""
    from aria_jax.config import is_multimodal, read_config_json

    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such model directory")
    return is_multimodal(read_config_json(model_dir))


def check_sampling_options(args: argparse.Namespace, prompt_length: int, max_new_tokens: int) -> None:
    """The generation settings, checked before the weights load (which can take minutes) with
    the checks and messages of `model.generate`."""
    from aria_jax.config import text_config_from_pretrained
    from aria_jax.generator import check_request

    check_request(1, prompt_length, text_config_from_pretrained(args.model), None, max_new_tokens=max_new_tokens,
                  do_sample=args.temperature > 0, temperature=args.temperature, top_k=0, top_p=args.top_p,
                  seed=args.seed, stop_strings=None)


def load_model(model_dir: str, multimodal: bool, dtype: str, quantize: str | None = None, mesh=None):
    import aria_jax

    model_class = aria_jax.AriaForConditionalGeneration if multimodal else aria_jax.AriaTextForCausalLM
    with progress_line(f"loading {model_dir}"):
        return model_class.from_pretrained(model_dir, dtype=dtype, quantize=quantize, mesh=mesh)


def serve(args: argparse.Namespace) -> None:
    """Every process of a multi-host mesh runs this: process 0 serves HTTP and leads the
    engine's rounds, the others follow them (`aria_jax.engine`)."""
    import aria_jax

    if args.distributed:
        aria_jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from aria_jax.engine import Engine

    multimodal = takes_images(args.model)
    if args.allowed_media_dir is not None and not os.path.isdir(args.allowed_media_dir):
        raise UserError(f"--allowed-media-dir {args.allowed_media_dir}: no such directory")
    try:
        from aria_jax.server import create_app, default_model_name
        import uvicorn
    except ImportError as err:
        raise UserError(f"serving needs the serve extra (pip install 'aria-jax[serve]'): {err}") from None
    processor = aria_jax.AriaProcessor.from_pretrained(args.model)
    mesh = aria_jax.make_mesh(**args.mesh_sizes) if args.mesh_sizes else None
    model = load_model(args.model, multimodal, args.dtype, args.quantize, mesh)
    engine = Engine(model, max_batch=args.max_batch, max_length=args.max_length, decode_steps=args.decode_steps,
                    max_queue=args.max_queue, kv_cache_dtype=args.kv_cache_dtype)
    if jax.process_index() != 0:
        engine.follow()
        return
    with progress_line("compiling"):
        engine.warm_up()
    name = args.served_model_name or default_model_name(args.model)
    app = create_app(engine, processor, name, allowed_media_dir=args.allowed_media_dir)
    print(f"aria-jax: serving {name} on http://{args.host}:{args.port} ({args.max_batch} slots of "
          f"{engine.max_length} positions)", file=sys.stderr, flush=True)
    with engine:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


@contextlib.contextmanager
def progress_line(what: str):
    """"WHAT ... done in 2.0s" on stderr, so a slow step shows it is under way while stdout
    stays for the answer alone."""
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def _quiet_orbax() -> None:
    """Orbax logs routine steps of every save as absl warnings; the progress bar says enough."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def convert(args: argparse.Namespace) -> None:
    from convert.conversion import NonFiniteWarning, convert_checkpoint, nonfinite_message

    _quiet_orbax()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)  # said below, in one line
        summary = convert_checkpoint(args.source, args.destination, dtype=args.dtype, overwrite=args.overwrite,
                                     quiet=args.quiet, strict=args.strict, quantize=args.quantize,
                                     group_size=args.group_size, quantize_vision=args.quantize_vision)
    if summary.nonfinite:
        print(f"aria-jax: warning: {nonfinite_message(summary.nonfinite)} (--strict refuses them)", file=sys.stderr)
    print(summary.line())


def export(args: argparse.Namespace) -> None:
    from convert.conversion import export_checkpoint

    _quiet_orbax()
    summary = export_checkpoint(args.source, args.destination, overwrite=args.overwrite, quiet=args.quiet,
                                max_shard_bytes=args.max_shard_size)
    print(summary.line())


def plan(args: argparse.Namespace) -> None:
    import dataclasses

    from aria_jax.config import config_from_pretrained
    from aria_jax.pretrained import resolve_dtype
    from aria_jax.quantization import Quantization

    if not args.target and (args.json or args.dump_hlo):
        raise UserError("--json and --dump-hlo need --target (the host-CPU plan prints memory only)")
    config = config_from_pretrained(args.config)
    if args.moe_backend:
        config = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config,
                                                                             moe_backend=args.moe_backend))
    prompt_length = args.prompt_length or args.max_length // 2
    quantization = Quantization.of(args.quantize, args.group_size)
    if args.target:
        plan_for_target(args, config, resolve_dtype(args.dtype), prompt_length, quantization)
        return
    from aria_jax.plan import plan_memory
    from aria_jax.sharding import make_mesh

    mesh = make_mesh(**args.mesh_sizes)
    print(plan_memory(config, mesh, resolve_dtype(args.dtype), args.batch, args.max_length, prompt_length,
                      quantization, args.kv_cache_dtype).table())


def plan_for_target(args: argparse.Namespace, config, dtype, prompt_length: int, quantization=None) -> None:
    from aria_jax.accelerators import parse_target, prepare_environment, target_devices
    from aria_jax.plan import GenerationShape
    from aria_jax.plan_target import dump_hlo, plan_target, write_json
    from aria_jax.sharding import make_mesh

    target = parse_target(args.target)
    shape = GenerationShape.for_request(args.batch, prompt_length, args.max_length, args.kv_cache_dtype)
    prepare_environment(target)
    with native_stderr_discarded() if target.platform == "cuda" else contextlib.nullcontext():
        mesh = make_mesh(**args.mesh_sizes, devices=target_devices(target))
        result = plan_target(config, target, mesh, dtype, shape, quantization)
    print(result.table())
    if args.json:
        write_json(result, args.json)
    if args.dump_hlo:
        dump_hlo(result, args.dump_hlo)


def prepare_target_environment(target_name: str) -> None:
    """`plan --target` compiles for an accelerator this machine does not have: JAX itself runs on
    the CPU (with libtpu installed and no TPU, a TPU client would start and print a trace), and
    the target's compiler is reached through its topology. Read when JAX loads, so set before
    anything imports it."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if target_name.strip().lower().startswith("h100"):
        # The CUDA plugin refuses to load without CUDA libraries unless told that it only
        # compiles, and logs the missing driver on stderr whenever JAX loads it.
        os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
        with native_stderr_discarded():
            import jax  # noqa: F401  (loads the plugin now, quietly)


@contextlib.contextmanager
def native_stderr_discarded():
    """Drops what native libraries write to file descriptor 2 while this runs. Python errors
    are exceptions and still reach the one-line error report."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def finetune(args: argparse.Namespace) -> None:
    from aria_jax.finetune import RunSettings, finetune as run
    from aria_jax.lora import LoraConfig
    from aria_jax.sharding import make_mesh
    from aria_jax.train import TrainConfig

    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: no such directory")
    lora = None
    if args.lora_rank:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(args.lora_targets.split(",")))
    train_config = TrainConfig(
        learning_rate=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, z_loss_coeff=args.z_loss_coeff,
        aux_loss_coeff=args.aux_loss_coeff, grad_accum_steps=args.grad_accum, remat=args.remat,
        freeze_vision=args.freeze_vision, freeze_projector=args.freeze_projector,
        freeze_language_model=args.freeze_language_model, lora=lora,
    )
    settings = RunSettings(
        batch_size=args.batch_size, max_image_size=args.max_image_size, split_image=args.split_image,
        max_length=args.max_length, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, dtype=args.dtype,
    )
    mesh = make_mesh(**args.mesh_sizes) if args.mesh_sizes else None
    result = run(args.model, args.data, args.out, train_config, settings, mesh=mesh, progress=not args.quiet)
    last = result.metrics[-1] if result.metrics else None
    summary = f"{result.steps} steps" + (f" (resumed at {result.resumed_from})" if result.resumed_from else "")
    if last:
        summary += f", final loss {last['loss']:.4f}"
    print(f"{summary}; model: {result.model_dir}" + (f"; adapters: {result.adapter_dir}" if result.adapter_dir else ""))


def bench(args: argparse.Namespace) -> int:
    return run_benchmarks(bench_argv(args))


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The parsed `bench` options back as command-line arguments for `benchmarks.run.main`."""
    argv = []
    for name, value in vars(args).items():
        if name in ("command", "run") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def parse_mesh(text: str) -> dict[str, int]:
    """"expert=8,tensor=1" -> {"expert": 8, "tensor": 1}."""
    sizes = {}
    for part in filter(None, text.split(",")):
        name, _, value = (piece.strip() for piece in part.partition("="))
        if name not in ("data", "expert", "tensor") or not value.isdigit() or int(value) < 1:
            raise UserError(f"--mesh {text!r}: expected comma-separated data=N, expert=N, tensor=N (N >= 1)")
        sizes[name] = int(value)
    return sizes


def simulate_devices(mesh_text: str) -> dict[str, int]:
    """`plan` compiles for as many simulated CPU devices as the mesh has; JAX reads these
    settings when it starts, so they are made before anything imports JAX."""
    sizes = parse_mesh(mesh_text)
    devices = math.prod(sizes.values())
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return sizes


def _byte_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    size = int(upper) if upper.isdecimal() else 0
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdecimal():
            size = int(float(upper[: -len(unit)]) * scale)
            break
    if size < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (for example 5GB, 500MB or a number of bytes)")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0  # the same message as for 0 or a negative number
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_writing_options(command: argparse.ArgumentParser) -> None:
    """What convert and export share: a destination that may exist, and a progress bar."""
    command.add_argument("--overwrite", action="store_true",
                         help="replace the destination if it exists and is what this command writes (or empty)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_answer_options(command: argparse.ArgumentParser, max_new_tokens: int, max_new_tokens_help: str) -> None:
    """What generate and chat share: how an answer is sampled, how images are cropped, the dtypes."""
    command.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, help=max_new_tokens_help)
    command.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    command.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    command.add_argument("--seed", type=int, default=0, help="sampling seed, an integer in [0, 2**64)")
    command.add_argument("--max-image-size", type=_positive_int, default=None,
                         help="crop size in pixels (490 or 980 for Aria); default: the checkpoint's")
    command.add_argument("--split-image", action="store_true", help="also feed high-resolution tiles of each image")
    command.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                         help="parameter and compute dtype")
    command.add_argument("--quantize", choices=["int8", "int4"], default=None,
                         help="quantize the decoder's weights while loading (int4 in groups of 128 inputs)")
    _add_kv_cache_dtype_option(command)


def _add_kv_cache_dtype_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--kv-cache-dtype", choices=["int8"], default=None,
                         help="keep the KV cache in int8, a scale per token and head (about half the memory of "
                              "bfloat16); default: the compute dtype")


def _add_command(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every option's default."""
    return commands.add_parser(name, help=summary, description=description, formatter_class=HelpWithDefaults)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="aria-jax", description="Aria in JAX: generation, fine-tuning and checkpoint conversion.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = _add_command(
        commands, "generate", "answer a prompt about zero or more images, streaming the answer",
        description="Answer one prompt, about zero or more images, with a model directory in hub format "
                    "(or a converted checkpoint). The prompt is wrapped in the chat template as a user turn "
                    "with the images first; the answer streams to stdout as it is generated and stops at "
                    "<|im_end|>. Greedy unless --temperature is above 0. Loading progress goes to stderr.",
    )
    gen.add_argument("--model", required=True, help="hub-format model directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    _add_answer_options(gen, 32, "tokens to generate at most")
    gen.set_defaults(run=generate)

    ch = _add_command(
        commands, "chat", "a multi-turn conversation with a model, images attached with /image",
        description="Talk with a model, one line per message. Each turn the whole conversation, earlier "
                    "images and answers included, is rendered with the chat template, and the answer streams "
                    "to stdout. Commands: /image PATH attaches an image to the next message, /reset starts "
                    "over, /help lists the commands, /quit or end of input (Ctrl-D) leaves. On a terminal a "
                    "'> ' prompt is shown; with piped input stdout holds only the answers, one per question, "
                    "and errors are single lines on stderr.",
    )
    ch.add_argument("--model", required=True, help="hub-format model directory (config.json, safetensors, tokenizer)")
    _add_answer_options(ch, 256, "tokens per answer at most (fewer once the conversation nears the model's context)")
    ch.set_defaults(run=chat)

    conv = _add_command(
        commands, "convert", "convert a hub checkpoint (safetensors) into a self-contained orbax checkpoint",
        description="Convert a hub-format model directory (transformers or original rhymes-ai naming, one or "
                    "many safetensors files) into a self-contained directory: normalized config.json, the "
                    "tokenizer, processor and chat template files, and the params as orbax checkpoints, which "
                    "restore faster and straight into a device mesh. Shows a progress bar over bytes and ends "
                    "with a summary line.",
    )
    conv.add_argument("source", help="hub-format model directory (config.json, safetensors, tokenizer files)")
    conv.add_argument("destination", help="directory to create")
    conv.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                      help="dtype of the stored params (default: the source's)")
    conv.add_argument("--strict", action="store_true",
                      help="refuse weights holding NaN or infinite values instead of naming them in a warning")
    conv.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="store the decoder's linear weights quantized (int8 per output channel, int4 in groups), "
                           "scales beside them; from_pretrained loads them as stored")
    conv.add_argument("--group-size", type=_positive_int, default=128, help="int4: inputs per scale")
    conv.add_argument("--quantize-vision", action="store_true",
                      help="with --quantize: the vision tower's and projector's linear weights too")
    _add_writing_options(conv)
    conv.set_defaults(run=convert)

    exp = _add_command(
        commands, "export", "write a converted checkpoint back as hub-format safetensors that transformers loads",
        description="Write a checkpoint made by `aria-jax convert` back as a hub-format directory: sharded "
                    "safetensors with an index, config.json and the tokenizer files, which transformers' "
                    "from_pretrained loads. Shows a progress bar over bytes and ends with a summary line.",
    )
    exp.add_argument("source", help="converted checkpoint directory (made by `aria-jax convert`)")
    exp.add_argument("destination", help="directory to create")
    exp.add_argument("--max-shard-size", type=_byte_size, default="5GB", help="largest safetensors file")
    _add_writing_options(exp)
    exp.set_defaults(run=export)

    pl = _add_command(
        commands, "plan", "memory (and, with --target, estimated time) of generation, compiled without weights",
        description="Will it fit, and how fast will it run? Compile generate()'s prefill and decode for a model "
                    "config on a mesh, without loading any weights. Without --target: on simulated CPU devices, "
                    "a table of per-device memory (params, KV cache, the peaks of prefill and decode). With "
                    "--target (e.g. v5e:2x4, h100:8): with that accelerator's own compiler, on this machine, "
                    "per chip memory and whether it fits the chip's HBM, the compiler's estimated time (decode: "
                    "per token) and the roofline beside it. Times are compiler estimates, not timings.",
    )
    pl.add_argument("--config", default="configs/aria.json", help="config.json (or a model directory)")
    pl.add_argument("--mesh", default="expert=8", help="mesh axis sizes, e.g. data=2,expert=8,tensor=4")
    pl.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="param and compute dtype")
    pl.add_argument("--batch", type=_positive_int, default=8, help="rows generated together")
    pl.add_argument("--max-length", type=_positive_int, default=8192, help="KV cache length (prompt + new tokens)")
    pl.add_argument("--prompt-length", type=_positive_int, default=None,
                    help="prefill length, rounded up to its bucket as generate() pads it "
                         "(default: half of --max-length)")
    pl.add_argument("--target", default=None,
                    help="compile for this accelerator, e.g. v5e:2x4 (TPU: pip install 'aria-jax[tpu]') or h100:8 "
                         "(pip install 'aria-jax[gpu-compile]'); an unknown name lists the supported ones")
    pl.add_argument("--moe-backend", default=None,
                    help="routed-expert implementation to compile, as AriaTextConfig.moe_backend "
                         "(default: the config's)")
    _add_kv_cache_dtype_option(pl)
    pl.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="weights quantized as from_pretrained(quantize=...) stores them")
    pl.add_argument("--group-size", type=_positive_int, default=128, help="int4: inputs per scale")
    pl.add_argument("--json", default=None, metavar="PATH", help="with --target: write every figure to PATH as JSON")
    pl.add_argument("--dump-hlo", default=None, metavar="DIR",
                    help="with --target: write each compiled program's optimized HLO to DIR/<program>.txt")
    pl.set_defaults(run=plan)

    ft = _add_command(
        commands, "finetune", "fine-tune (full or LoRA) on a dataset folder; resumes from the newest checkpoint in --out",
        description="Fine-tune a model, fully or with LoRA adapters, on a folder in the original Aria "
                    "repository's dataset format (train.jsonl and its images). Checkpoints, metrics.jsonl and "
                    "the final model (and adapters) are written to --out; a run started again with the same "
                    "settings resumes from the newest checkpoint there. Shows a progress bar over steps.",
    )
    ft.add_argument("--model", required=True, help="model directory (hub format or converted)")
    ft.add_argument("--data", required=True, help="dataset folder with train.jsonl (Aria's format) and its images")
    ft.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, model/ [, adapter/]")
    ft.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps")
    ft.add_argument("--batch-size", type=_positive_int, default=8, help="rows per micro-batch")
    ft.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    ft.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps, then cosine decay to 0")
    ft.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on norms and biases)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm; 0: off")
    ft.add_argument("--z-loss-coeff", type=float, default=1e-5, help="router z-loss coefficient")
    ft.add_argument("--aux-loss-coeff", type=float, default=1e-3, help="router load-balancing loss coefficient")
    ft.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank; 0: full fine-tuning")
    ft.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / rank)")
    ft.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,shared_gate,shared_up,shared_down,"
                    "experts_gate_up,experts_down", help="comma-separated weights to adapt (also: lm_head)")
    ft.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    ft.add_argument("--freeze-projector", action="store_true", help="do not train the projector")
    ft.add_argument("--freeze-language-model", action="store_true", help="do not train the text decoder")
    ft.add_argument("--remat", action="store_true", help="recompute activations in the backward pass (less memory)")
    ft.add_argument("--max-image-size", type=_positive_int, default=None, help="crop size; default: the checkpoint's")
    ft.add_argument("--split-image", action="store_true", help="also feed high-resolution tiles of each image")
    ft.add_argument("--max-length", type=_positive_int, default=2048, help="longest example in tokens")
    ft.add_argument("--save-every", type=_positive_int, default=100, help="steps between checkpoints")
    ft.add_argument("--keep-checkpoints", type=_positive_int, default=3, help="checkpoints kept")
    ft.add_argument("--seed", type=int, default=0, help="data order and adapter initialization")
    ft.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="param and compute dtype")
    ft.add_argument("--mesh", default=None, help="mesh axis sizes over all devices, e.g. data=4,expert=2")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(run=finetune)

    sv = _add_command(
        commands, "serve", "an OpenAI-compatible HTTP server with continuous batching",
        description="Serve a model over HTTP with OpenAI's API: POST /v1/chat/completions (text and image_url "
                    "parts, images as data: URLs), POST /v1/completions, GET /v1/models, GET /health (200 once "
                    "ready) and GET /metrics (Prometheus). Requests share --max-batch decode slots: each is "
                    "prefilled into a free slot while the others keep decoding, and leaves it as soon as it "
                    "ends. On several hosts run the same command on every process with --distributed; process "
                    "0 serves HTTP.",
    )
    sv.add_argument("--model", required=True, help="model directory (hub format or converted), with its tokenizer")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument("--max-batch", type=_positive_int, default=8, help="decode slots: requests answered at once")
    sv.add_argument("--max-length", type=_positive_int, default=None,
                    help="cache positions per slot, prompt and answer (default: the model's context, at most 4096)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond it get 429")
    sv.add_argument("--decode-steps", type=_positive_int, default=8,
                    help="tokens per slot between admissions of new requests")
    sv.add_argument("--served-model-name", default=None, help="the model id clients ask for (default: the "
                    "model directory's name)")
    sv.add_argument("--allowed-media-dir", default=None,
                    help="image_url may name local files under this directory (otherwise only data: URLs)")
    sv.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="param and compute dtype (bfloat16 on TPU and GPU)")
    sv.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="quantize the decoder's weights as they load")
    _add_kv_cache_dtype_option(sv)
    sv.add_argument("--mesh", default=None, help="mesh axis sizes over all devices, e.g. data=2,expert=4")
    sv.add_argument("--distributed", action="store_true",
                    help="several processes: jax.distributed.initialize (on TPU pods it reads the environment)")
    sv.add_argument("--coordinator", default=None, help="with --distributed off TPU: process 0's host:port")
    sv.add_argument("--num-processes", type=int, default=None, help="with --distributed off TPU")
    sv.add_argument("--process-id", type=int, default=None, help="with --distributed off TPU")
    sv.set_defaults(run=serve)

    be = _add_command(
        commands, "bench", "benchmark against transformers on the same random weights; prints a markdown table",
        description="Benchmark aria_jax against transformers' PyTorch Aria on the same random weights (a "
                    "small bench config, saved once in --cache-dir), each side in its own subprocess: prefill, "
                    "decode and image prefill, and an MoE micro-benchmark, printed as a markdown table with the "
                    "machine's limits beside the numbers.",
    )
    add_bench_options(be)
    be.set_defaults(run=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan" and args.target:
            args.mesh_sizes = parse_mesh(args.mesh)
            prepare_target_environment(args.target)
        elif args.command == "plan":
            args.mesh_sizes = simulate_devices(args.mesh)
        if args.command in ("finetune", "serve"):
            args.mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
        code = args.run(args)  # None, or bench's exit code
    except (UserError, ValueError, OSError) as err:  # CheckpointError, ConfigError, LayoutError included
        print(f"aria-jax: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:  # Ctrl-C, e.g. while a model loads: no traceback
        print("aria-jax: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
