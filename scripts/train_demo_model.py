"""Trains models/aria-jax-demo from scratch: a small model of the full Aria architecture (vision
tower, projector, MoE decoder with routed and shared experts) that answers questions about
synthetic images of coloured shapes (`aria_jax.demo_task`).

Every step goes through the library as a user would: the task's dataset is written in Aria's
fine-tuning format, the tokenizer is trained on the task's text, the random initial model is
saved in hub format, `aria_jax.finetune.finetune` trains it (all components), and the result is
scored on freshly drawn questions through processor -> generate -> decode.
Training runs in stages (`STAGES`), each on its own data set. Needs only the package's runtime
dependencies; about 30 minutes on 2 CPU cores.

Run from the repository root:  python scripts/train_demo_model.py [--stages JSON] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

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
SEED = 1
INIT_STD = 0.02  # `init_multimodal_params`' normal initializer
POSITION_STD = 0.5  # the vision position table's RMS: on the patch embeddings' scale
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
        intermediate_size=256,
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
        elif path[-1] == "position_embedding":
            scaled[path] = grid_positions(*value.shape).astype(value.dtype)
            continue
        else:  # norms, biases, token embeddings and the projector's queries keep their initialization
            scaled[path] = value
            continue
        scaled[path] = value / INIT_STD / math.sqrt(fan_in)
    return unflatten_tree(scaled)


def grid_positions(patches: int, width: int) -> np.ndarray:
    """The vision tower's initial position table, patches numbered row by row: sines and cosines
    of the patch centre's column (first half of the width) and row (second half), at frequencies
    from half a turn over the grid's side to a quarter turn per patch, scaled to an RMS of
    POSITION_STD. At the lowest frequency the cosine's sign is the side of the midline, so a
    shape's quadrant can be read from the table linearly from the first step. From a random
    table the model had to learn where each patch lies, and learned "where" only sometimes, and
    at the cost of shape and count."""
    side, quarter = math.isqrt(patches), width // 4
    frequencies = math.pi / side * (side / 2) ** (np.arange(quarter) / max(quarter - 1, 1))
    rows, columns = np.divmod(np.arange(patches), side)
    angles = [(index[:, None] + 0.5) * frequencies for index in (columns, rows)]
    table = np.concatenate([f(angle) for angle in angles for f in (np.sin, np.cos)], axis=1)
    return table * POSITION_STD / np.sqrt(np.mean(table**2))


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


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stretch of training on its own data set, continuing from the model the last one left."""

    steps: int
    lr: float
    examples: int
    kind_weights: dict[str, float] | None = None  # see demo_task.sample; None: any type a scene allows
    max_turns: int = 1  # examples are chats of 1 to max_turns turns about one image
    max_length: int = 40  # tokens per example: single questions need 38, six-turn chats 144


# "Where" is learned in the first 500 steps (at 2 questions in 7; the grid position table makes it
# easy: `grid_positions`); shape and count are then asked 3 times in 8 each, over a tail at half the
# learning rate too; a short stage of chats keeps answers steady over a conversation (trained on
# single questions only, they drift from turn two).
STAGES = (
    Stage(steps=500, lr=1e-3, examples=20000, kind_weights={"shape": 2, "color": 1, "count": 2, "where": 2}),
    Stage(steps=700, lr=1e-3, examples=28000, kind_weights={"shape": 3, "color": 1, "count": 3, "where": 1}),
    Stage(steps=500, lr=5e-4, examples=20000, kind_weights={"shape": 3, "color": 1, "count": 3, "where": 1}),
    Stage(
        steps=60,
        lr=2.5e-4,
        examples=4000,
        kind_weights={"shape": 3, "color": 1, "count": 3, "where": 1},
        max_turns=6,
        max_length=144,
    ),
)


def parse_stages(text: str) -> tuple[Stage, ...]:
    fields = {field.name for field in dataclasses.fields(Stage)}
    stages = json.loads(text)
    if not isinstance(stages, list) or not stages:
        raise argparse.ArgumentTypeError(f"the stages are a non-empty JSON list, got {text!r}")
    for stage in stages:
        if not isinstance(stage, dict) or set(stage) - fields:
            raise argparse.ArgumentTypeError(f"a stage is an object with keys among {sorted(fields)}, got {stage!r}")
    return tuple(Stage(**stage) for stage in stages)


def train(initial: str, stages: Sequence[Stage], work: str, batch_size: int, first: int = 0) -> str:
    """Runs stages[first:] one after another from the model `initial`; returns the last one's model
    directory. Stage k's data and data order depend on k alone, so a schedule continued from
    stage k's input gives what the whole schedule gives."""
    model_dir = initial
    for index, stage in enumerate(stages[first:], start=first):
        data_dir = os.path.join(work, f"data-{index}")
        if not os.path.isdir(data_dir):
            demo_task.write_dataset(
                data_dir,
                stage.examples,
                seed=SEED + index,
                size=IMAGE_SIZE,
                kind_weights=stage.kind_weights,
                max_turns=stage.max_turns,
            )
        train_config = TrainConfig(
            learning_rate=stage.lr, warmup_steps=min(100, stage.steps // 10), total_steps=stage.steps, weight_decay=0.05
        )
        settings = RunSettings(batch_size=batch_size, max_length=stage.max_length, save_every=500, seed=SEED + index)
        result = finetune(model_dir, data_dir, os.path.join(work, f"stage-{index}"), train_config, settings)
        model_dir = result.model_dir
        print(f"stage {index}: {result.steps} steps", flush=True)
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stages",
        type=parse_stages,
        default=STAGES,
        help="the training schedule as a JSON list of stages, each an object with the fields of this script's "
        "Stage (steps, lr, examples, kind_weights, max_turns, max_length); default: STAGES",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--init", help="continue from this model directory instead of random weights")
    parser.add_argument(
        "--from-stage",
        type=int,
        default=0,
        help="run the schedule from this stage on (0-based), starting from --init, the model the stage before left",
    )
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "demo"), help="data sets, checkpoints, logs")
    parser.add_argument("--out", default=os.path.join(ROOT, "models", "aria-jax-demo"))
    args = parser.parse_args()
    if args.from_stage and args.init is None:
        parser.error("--from-stage needs --init: the model the stage before it left")
    if not 0 <= args.from_stage < len(args.stages):
        parser.error(f"--from-stage {args.from_stage}: the schedule has stages 0 to {len(args.stages) - 1}")
    began = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)

    initial = args.init
    if initial is None:
        initial = os.path.join(args.work, "initial")
        write_initial_model(initial, demo_config(demo_task.VOCAB_SIZE))
    model_dir = train(initial, args.stages, args.work, args.batch_size, args.from_stage)
    print(f"trained after {time.perf_counter() - began:.0f} s", flush=True)

    model = aria_jax.AriaForConditionalGeneration.from_pretrained(model_dir)
    processor = aria_jax.AriaProcessor.from_pretrained(model_dir)
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
        for name in os.listdir(model_dir):
            shutil.copy(os.path.join(model_dir, name), partial)
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
