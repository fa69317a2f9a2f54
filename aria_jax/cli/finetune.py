"""`aria-jax finetune`: full or LoRA fine-tuning on a dataset folder, resumable."""

from __future__ import annotations

import argparse
import os

from aria_jax.cli.options import UserError, add_command, parse_mesh, positive_int


def add(commands) -> None:
    command = add_command(
        commands,
        "finetune",
        "fine-tune (full or LoRA) on a dataset folder; resumes from the newest checkpoint in --out",
        description="Fine-tune a model, fully or with LoRA adapters, on a folder in the original Aria "
        "repository's dataset format (train.jsonl and its images). Checkpoints, metrics.jsonl and "
        "the final model (and adapters) are written to --out; a run started again with the same "
        "settings resumes from the newest checkpoint there. Shows a progress bar over steps.",
    )
    option = command.add_argument
    option("--model", required=True, help="model directory (hub format or converted)")
    option("--data", required=True, help="dataset folder with train.jsonl (Aria's format) and its images")
    option("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, model/ [, adapter/]")
    option("--steps", type=positive_int, default=1000, help="optimizer steps")
    option("--batch-size", type=positive_int, default=8, help="rows per micro-batch")
    option("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    option("--lr", type=float, default=5e-5, help="peak learning rate")
    option("--warmup-steps", type=int, default=0, help="linear warmup steps, then cosine decay to 0")
    option("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on norms and biases)")
    option("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm; 0: off")
    option("--z-loss-coeff", type=float, default=1e-5, help="router z-loss coefficient")
    option("--aux-loss-coeff", type=float, default=1e-3, help="router load-balancing loss coefficient")
    option("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank; 0: full fine-tuning")
    option("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / rank)")
    option(
        "--lora-targets",
        help="comma-separated weights to adapt (default: every projection of the decoder "
        "layers, routed experts included; also: lm_head)",
    )
    option("--freeze-vision", action="store_true", help="do not train the vision tower")
    option("--freeze-projector", action="store_true", help="do not train the projector")
    option("--freeze-language-model", action="store_true", help="do not train the text decoder")
    option("--remat", action="store_true", help="recompute activations in the backward pass (less memory)")
    option("--max-image-size", type=positive_int, default=None, help="crop size; default: the checkpoint's")
    option("--split-image", action="store_true", help="also feed high-resolution tiles of each image")
    option("--max-length", type=positive_int, default=2048, help="longest example in tokens")
    option("--save-every", type=positive_int, default=100, help="steps between checkpoints")
    option("--keep-checkpoints", type=positive_int, default=3, help="checkpoints kept")
    option("--seed", type=int, default=0, help="data order and adapter initialization")
    option("--dtype", choices=["float32", "bfloat16"], default="float32", help="param and compute dtype")
    option("--mesh", default=None, help="mesh axis sizes over all devices, e.g. data=4,expert=2")
    option("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    mesh_sizes = parse_mesh(args.mesh) if args.mesh else None
    from aria_jax.finetune import RunSettings, finetune
    from aria_jax.lora import DEFAULT_TARGETS, LoraConfig
    from aria_jax.sharding import make_mesh
    from aria_jax.train import TrainConfig

    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: no such directory")
    lora = None
    if args.lora_rank:
        targets = DEFAULT_TARGETS if args.lora_targets is None else tuple(args.lora_targets.split(","))
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=targets)
    train_config = TrainConfig(
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        total_steps=args.steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        z_loss_coeff=args.z_loss_coeff,
        aux_loss_coeff=args.aux_loss_coeff,
        grad_accum_steps=args.grad_accum,
        remat=args.remat,
        freeze_vision=args.freeze_vision,
        freeze_projector=args.freeze_projector,
        freeze_language_model=args.freeze_language_model,
        lora=lora,
    )
    settings = RunSettings(
        batch_size=args.batch_size,
        max_image_size=args.max_image_size,
        split_image=args.split_image,
        max_length=args.max_length,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
        dtype=args.dtype,
    )
    mesh = make_mesh(**mesh_sizes) if mesh_sizes else None
    result = finetune(args.model, args.data, args.out, train_config, settings, mesh=mesh, progress=not args.quiet)
    last = result.metrics[-1] if result.metrics else None
    summary = f"{result.steps} steps" + (f" (resumed at {result.resumed_from})" if result.resumed_from else "")
    if last:
        summary += f", final loss {last['loss']:.4f}"
    print(f"{summary}; model: {result.model_dir}" + (f"; adapters: {result.adapter_dir}" if result.adapter_dir else ""))
