"""`aria-jax` console script. A user error prints one line naming the problem and exits 2."""

from __future__ import annotations

import argparse
import math
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


def _quiet_orbax() -> None:
    """Orbax logs routine steps of every save as absl warnings; the progress bar says enough."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def convert(args: argparse.Namespace) -> None:
    from convert.conversion import convert_checkpoint

    _quiet_orbax()
    summary = convert_checkpoint(args.source, args.destination, dtype=args.dtype, overwrite=args.overwrite,
                                 quiet=args.quiet)
    print(summary.line())


def export(args: argparse.Namespace) -> None:
    from convert.conversion import export_checkpoint

    _quiet_orbax()
    summary = export_checkpoint(args.source, args.destination, overwrite=args.overwrite, quiet=args.quiet,
                                max_shard_bytes=args.max_shard_size)
    print(summary.line())


def plan(args: argparse.Namespace) -> None:
    from aria_jax.config import config_from_pretrained
    from aria_jax.plan import plan_memory
    from aria_jax.pretrained import resolve_dtype
    from aria_jax.sharding import make_mesh

    config = config_from_pretrained(args.config)
    prompt_length = args.prompt_length or args.max_length // 2
    if prompt_length >= args.max_length:
        raise UserError(f"--prompt-length {prompt_length} leaves no room to generate in --max-length {args.max_length}")
    mesh = make_mesh(**args.mesh_sizes)
    print(plan_memory(config, mesh, resolve_dtype(args.dtype), args.batch, args.max_length, prompt_length).table())


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
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * scale)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (for example 5GB, 500MB or a number of bytes)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_writing_options(command: argparse.ArgumentParser) -> None:
    """What convert and export share: a destination that may exist, and a progress bar."""
    command.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-jax", description="Aria in JAX: generation, fine-tuning and checkpoint conversion.")
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

    conv = commands.add_parser(
        "convert", help="convert a hub checkpoint (safetensors) into a self-contained orbax checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    conv.add_argument("source", help="hub-format model directory (config.json, safetensors, tokenizer files)")
    conv.add_argument("destination", help="directory to create")
    conv.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                      help="dtype of the stored params (default: the source's)")
    _add_writing_options(conv)
    conv.set_defaults(run=convert)

    exp = commands.add_parser(
        "export", help="write a converted checkpoint back as hub-format safetensors that transformers loads",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exp.add_argument("source", help="converted checkpoint directory (made by `aria-jax convert`)")
    exp.add_argument("destination", help="directory to create")
    exp.add_argument("--max-shard-size", type=_byte_size, default="5GB", help="largest safetensors file")
    _add_writing_options(exp)
    exp.set_defaults(run=export)

    pl = commands.add_parser(
        "plan", help="per-device memory of prefill and decode for a config on a mesh, compiled without weights",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pl.add_argument("--config", default="configs/aria.json", help="config.json (or a model directory)")
    pl.add_argument("--mesh", default="expert=8", help="mesh axis sizes, e.g. data=2,expert=8,tensor=4")
    pl.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="param and compute dtype")
    pl.add_argument("--batch", type=_positive_int, default=8, help="rows generated together")
    pl.add_argument("--max-length", type=_positive_int, default=8192, help="KV cache length (prompt + new tokens)")
    pl.add_argument("--prompt-length", type=_positive_int, default=None, help="prefill length (default: half of --max-length)")
    pl.set_defaults(run=plan)

    ft = commands.add_parser(
        "finetune", help="fine-tune (full or LoRA) on a dataset folder; resumes from the newest checkpoint in --out",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            args.mesh_sizes = simulate_devices(args.mesh)
        if args.command == "finetune":
            args.mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
        args.run(args)
    except (UserError, ValueError, OSError) as err:  # CheckpointError, ConfigError, LayoutError included
        print(f"aria-jax: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
