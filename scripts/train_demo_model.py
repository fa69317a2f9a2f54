"""Trains models/aria-jax-demo from scratch: a small model of the full Aria architecture (vision
tower, projector, MoE decoder with routed and shared experts) that answers questions about
synthetic images of coloured shapes (`aria_jax.demo_task`).

Every step goes through the library as a user would: the task's dataset is written in Aria's
fine-tuning format, the tokenizer is trained on the task's text, the random initial model is
saved in hub format, `aria_jax.finetune.finetune` trains it (all components), and the result is
scored on freshly drawn questions through processor -> generate -> decode.
Needs only the package's runtime dependencies; 25 minutes on 2 CPU cores.

Run from the repository root:  python scripts/train_demo_model.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np

import aria_jax
from aria_jax import demo_task
from aria_jax.config import AriaConfig, AriaTextConfig, AriaVisionConfig
from aria_jax.export import save_model_directory
from aria_jax.files import atomic_directory, holds_only
from aria_jax.finetune import RunSettings, finetune
from aria_jax.modeling import init_multimodal_params
from aria_jax.train import TrainConfig
from aria_jax.weights import RULE_FOR_PATH, flatten_tree, unflatten_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 112  # one crop size: 8 x 8 patches of 14 pixels
QUERIES = 16  # image tokens per crop
IM_END_ID = 4  # <|im_end|>: Aria's special tokens sit at ids 3..9
SEED = 0
INIT_STD = 0.02  # `init_multimodal_params`' normal initializer
POSITION_STD = 0.5  # the vision position table: on the patch embeddings' scale
EXAMPLE_SEED = 7


def demo_config(vocab_size: int) -> AriaConfig:
    text = AriaTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_num_experts=8,
        moe_topk=2,
        moe_num_shared_experts=2,
        rope_theta=10000.0,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=(2, IM_END_ID),
        pad_token_id=0,
    )
    vision = AriaVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    patches = (IMAGE_SIZE // 14) ** 2
    return AriaConfig(
        text_config=text,
        vision_config=vision,
        projector_patch_to_query=((patches, QUERIES),),
        image_token_index=demo_task.IMAGE_TOKEN_ID,
        pad_token_id=0,
    )


def fan_in_scaled(params: dict) -> dict:
    """Every matrix at std 1/sqrt(fan in) instead of the hub configs' 0.02: at widths of 64 and 128,
    0.02 shrinks each matmul's output ~6x, and the projector's four matmuls before its LayerNorm
    would leave features so small that its gradients swamp all others."""
    scaled = {}
    for path, value in flatten_tree(params).items():
        rule = RULE_FOR_PATH[path]
        first = 1 if rule.stacked else 0
        if rule.layout.kind == "linear":
            fan_in = math.prod(value.shape[first : first + rule.layout.linear_in_dims])
        elif rule.layout.kind == "conv":
            fan_in = math.prod(value.shape[:-1])
        elif path[-1].startswith("experts_"):
            fan_in = value.shape[-2]
        elif path[-1] == "position_embedding":  # at 0.02, positions would hardly register next to the patches
            scaled[path] = value / INIT_STD * POSITION_STD
            continue
        else:  # norms, biases, token embeddings and the projector's queries keep their initialization
            scaled[path] = value
            continue
        scaled[path] = value / INIT_STD / math.sqrt(fan_in)
    return unflatten_tree(scaled)


def write_initial_model(directory: str, config: AriaConfig) -> None:
    """Random weights, tokenizer and processor files: a hub-format checkpoint to fine-tune."""
    side_files = directory + ".tokenizer"
    shutil.rmtree(side_files, ignore_errors=True)
    demo_task.write_tokenizer_files(
        side_files, demo_task.task_texts(2000, SEED), demo_task.VOCAB_SIZE, IMAGE_SIZE, QUERIES
    )
    params = fan_in_scaled(init_multimodal_params(config, jax.random.key(SEED)))
    save_model_directory(params, config, directory, side_files_from=side_files, overwrite=True)
    shutil.rmtree(side_files)


def write_example_image(path: str) -> None:
    """examples/demo_shapes.png, the README's example: the first scene of EXAMPLE_SEED with three shapes."""
    rng = np.random.default_rng(EXAMPLE_SEED)
    while (scene := demo_task.sample_scene(rng, IMAGE_SIZE)).count != 3:
        pass
    demo_task.render(scene).save(path, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    parser.add_argument("--examples", type=int, default=40000, help="training examples to generate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--kind-weights",
        type=json.loads,
        help='how often each question type is asked, as JSON ({"shape": 2, "color": 1, "count": 2, "where": 2}); '
        "default: any type a scene allows, equally likely (1 in 12 questions is a where)",
    )
    parser.add_argument("--max-turns", type=int, default=1, help="training examples are chats of 1 to this many turns")
    parser.add_argument("--max-length", type=int, default=48, help="tokens per example (six-turn chats need 144)")
    parser.add_argument("--init", help="continue from this model directory instead of random weights")
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "demo"), help="dataset, checkpoints, logs")
    parser.add_argument("--out", default=os.path.join(ROOT, "models", "aria-jax-demo"))
    args = parser.parse_args()
    began = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)

    data_dir = os.path.join(args.work, "data")
    if not os.path.isdir(data_dir):
        demo_task.write_dataset(
            data_dir,
            args.examples,
            seed=SEED,
            size=IMAGE_SIZE,
            kind_weights=args.kind_weights,
            max_turns=args.max_turns,
        )
    initial = args.init
    if initial is None:
        initial = os.path.join(args.work, "initial")
        write_initial_model(initial, demo_config(demo_task.VOCAB_SIZE))
    print(f"data and initial model ready after {time.perf_counter() - began:.0f} s", flush=True)

    train_config = TrainConfig(
        learning_rate=args.lr, warmup_steps=min(100, args.steps // 10), total_steps=args.steps, weight_decay=0.05
    )
    settings = RunSettings(batch_size=args.batch_size, max_length=args.max_length, save_every=500, seed=SEED)
    result = finetune(initial, data_dir, os.path.join(args.work, "run"), train_config, settings)
    print(f"trained {result.steps} steps after {time.perf_counter() - began:.0f} s", flush=True)

    model = aria_jax.AriaForConditionalGeneration.from_pretrained(result.model_dir)
    processor = aria_jax.AriaProcessor.from_pretrained(result.model_dir)
    questions, seed = demo_task.EVALUATION_QUESTIONS, demo_task.EVALUATION_SEED
    scores = demo_task.evaluate(model, processor, questions, seed)
    by_type = demo_task.evaluate(model, processor, questions, seed, kinds=demo_task.QUESTION_TYPES)["by_type"]
    chats = demo_task.evaluate_chats(model, processor, 40, 6, seed=seed + 1)
    print(f"single questions: {scores['accuracy']:.1%}; {questions // 4} of each type: {by_type}")
    print(f"40 six-turn chats: by turn {chats['by_turn']}, by type {chats['by_type']}")
    for question, expected, answered in scores["failures"][:10]:
        print(f"  missed: {question!r} expected {expected!r}, answered {answered!r}")

    with atomic_directory(
        args.out,
        overwrite=True,
        what="the demo model's directory",
        replaceable=lambda directory: holds_only(directory, {"config.json", "model.safetensors"}),
    ) as partial:
        for name in os.listdir(result.model_dir):
            shutil.copy(os.path.join(result.model_dir, name), partial)
    write_example_image(os.path.join(ROOT, "examples", "demo_shapes.png"))
    size = sum(os.path.getsize(os.path.join(args.out, name)) for name in os.listdir(args.out))
    print(
        f"{args.out}: {size / 1e6:.1f} MB; accuracy {scores['accuracy']:.1%}; "
        f"{time.perf_counter() - began:.0f} s in all"
    )
    if scores["accuracy"] < 0.9:
        sys.exit(f"accuracy {scores['accuracy']:.1%} is below 90%")


if __name__ == "__main__":
    main()
