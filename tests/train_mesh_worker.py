"""The mesh run of test_train.py, in its own process: XLA_FLAGS (the number of fake CPU devices)
must be set before JAX starts, and the pytest process has one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_mesh_worker.py MODEL_DIR

MODEL_DIR is a tiny multimodal model (tests/tiny_models.py defaults: 4 experts). The worker runs
`loss_and_grads` and one `train_step` twice, on one device and on a data=2 x expert=2 mesh of 4
devices, and prints one line `RESULT <json>` (last line of stdout): how the batch and the experts
were placed, both runs' metrics, and how far apart their grads and updated params are; the test
asserts on them.

`make_batch` (numpy only) also builds the batches of test_train.py and test_lora.py.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import aria_jax
from aria_jax import train

IMAGE_TOKEN_ID = 9
PAD_ID = 2
FIRST_TEXT_ID = 10  # random text ids stay clear of the special ids and the image token
IGNORE_INDEX = -100
IMAGE = "image"  # a prompt segment: one crop, as its image tokens


def make_batch(
    seed: int,
    rows,
    *,
    crop_side: int,
    tokens_per_crop: int,
    padding: str = "right",
    padding_crops: int = 0,
    vocab_size: int = 128,
) -> dict[str, np.ndarray]:
    """A batch as `aria_jax.train` takes it. `rows`: per row, (prompt, answer): prompt is a list
    of segments, an int n for n random text tokens or IMAGE for one crop; answer is the number of
    random tokens that end the row, the only labelled ones (labels -100 on the prompt, its image
    tokens and the padding). Rows are padded with PAD_ID to the longest, on the `padding` side.
    Every other crop is valid on a top band only (pixel_mask; zero pixels outside, as the
    processor pads), so some patches are masked; `padding_crops` blank, fully valid crops end
    the crop list."""
    rng = np.random.default_rng(seed)
    token_rows, label_rows, pixels, pixel_masks = [], [], [], []
    for prompt, answer in rows:
        tokens = []
        for segment in prompt:
            if segment == IMAGE:
                mask = np.ones((crop_side, crop_side), bool)
                if len(pixels) % 2:
                    mask[crop_side * 5 // 14 :] = False  # 28 px: the bottom row of 14-px patches
                pixels.append(rng.standard_normal((3, crop_side, crop_side)).astype(np.float32) * mask)
                pixel_masks.append(mask)
                tokens += [IMAGE_TOKEN_ID] * tokens_per_crop
            else:
                tokens += rng.integers(FIRST_TEXT_ID, vocab_size, segment).tolist()
        answer_tokens = rng.integers(FIRST_TEXT_ID, vocab_size, answer).tolist()
        token_rows.append(tokens + answer_tokens)
        label_rows.append([IGNORE_INDEX] * len(tokens) + answer_tokens)
    length = max(map(len, token_rows))
    batch = {
        "input_ids": np.full((len(rows), length), PAD_ID, np.int32),
        "attention_mask": np.zeros((len(rows), length), np.int32),
        "labels": np.full((len(rows), length), IGNORE_INDEX, np.int32),
    }
    for row, (tokens, labels) in enumerate(zip(token_rows, label_rows)):
        span = slice(length - len(tokens), length) if padding == "left" else slice(0, len(tokens))
        batch["input_ids"][row, span] = tokens
        batch["attention_mask"][row, span] = 1
        batch["labels"][row, span] = labels
    blank = np.zeros((padding_crops, 3, crop_side, crop_side), np.float32)
    batch["pixel_values"] = np.concatenate([np.stack(pixels), blank])
    batch["pixel_mask"] = np.concatenate([np.stack(pixel_masks), np.ones((padding_crops, crop_side, crop_side), bool)])
    return batch


def mesh_micro_batches() -> list[dict[str, np.ndarray]]:
    """Two micro-batches of 4 rows (so data x expert = 4 splits them), of different lengths,
    with text-only rows, and 4 crops each (the second padded with blank crops)."""
    crops = dict(crop_side=28, tokens_per_crop=4)
    first = make_batch(1, [([3, IMAGE, 2, IMAGE, 2], 5), ([2, IMAGE, 4], 3), ([6], 4), ([1, IMAGE, 1], 6)], **crops)
    second = make_batch(2, [([2, IMAGE, 2], 4), ([5], 2), ([3, IMAGE], 5), ([7], 3)], padding_crops=2, **crops)
    return [first, second]


# Nonzero router-loss coefficients: the router losses run on the mesh too. lr 1e-3 moves the
# params far more than the comparison's tolerance. Adam's first step is lr x g / (|g| + eps), so
# a gradient within rounding of 0 (the key biases': attention ignores them) moves its param by up
# to +-lr at random; eps 1e-6 instead of 1e-8 damps that 100-fold.
TRAIN_CONFIG = train.TrainConfig(
    learning_rate=1e-3, adam_eps=1e-6, z_loss_coeff=1e-3, aux_loss_coeff=1e-2, grad_accum_steps=2
)


def on_host(tree) -> dict[str, np.ndarray]:
    """{"a/b/c": array copied to the host} for every leaf of `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(key.key) for key in path): np.array(leaf) for path, leaf in flat}


def step_results(model, batches) -> dict:
    """On the devices of `model` and `batches`: the step's metrics and grads (`loss_and_grads`),
    and one `train_step` from the same params: its metrics and the params before and after."""
    trainable, frozen = train.split_params(model.params, TRAIN_CONFIG)
    options = dict(config=model.config, train_config=TRAIN_CONFIG)

    @jax.jit  # both in one jit: one compilation instead of two, for the same computations
    def grads_and_step(state, frozen, batches):
        return (
            train.loss_and_grads(state.trainable, frozen, batches, **options),
            train.train_step(state, frozen, batches, **options),
        )

    (metrics, grads), (state, step_metrics) = grads_and_step(train.init_state(trainable, TRAIN_CONFIG), frozen, batches)
    return {
        "metrics": jax.tree.map(float, metrics),
        "grads": on_host(grads),
        "step_metrics": jax.tree.map(float, step_metrics),
        "before": on_host(trainable),
        "after": on_host(state.trainable),
    }


def compare(mesh_run: dict, one_device: dict) -> dict:
    """What the test asserts on: metrics as [one device, mesh]; per grad,
    [max |mesh - one device|, max |one device|]; per param after the step, the 2-norms
    [|mesh - one device|, |one device|, |update on one device|]."""

    def pairs(name):
        return {key: [one_device[name][key], mesh_run[name][key]] for key in one_device[name]}

    def norm(x):
        return float(np.linalg.norm(x.ravel()))

    return {
        "metrics": pairs("metrics"),
        "step_metrics": pairs("step_metrics"),
        "grads": {
            path: [float(np.abs(mesh_run["grads"][path] - grad).max()), float(np.abs(grad).max())]
            for path, grad in one_device["grads"].items()
        },
        "params": {
            path: [norm(mesh_run["after"][path] - after), norm(after), norm(after - one_device["before"][path])]
            for path, after in one_device["after"].items()
        },
    }


def run(model_dir: str) -> dict:
    batches = train.stack_micro_batches(mesh_micro_batches())
    one_device = step_results(aria_jax.AriaForConditionalGeneration.from_pretrained(model_dir), batches)
    mesh = aria_jax.make_mesh(data=2, expert=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        model = aria_jax.AriaForConditionalGeneration.from_pretrained(model_dir, mesh=mesh)
        placed = train.batch_to_mesh(batches, mesh)
        experts = model.params["language_model"]["layers"]["mlp"]["experts_gate_up"]
        placement = {
            name: {
                "shape": list(array.shape),
                "shard_shapes": [list(shard.data.shape) for shard in array.addressable_shards],
            }
            for name, array in [("input_ids", placed["input_ids"]), ("experts_gate_up", experts)]
        }
        on_mesh = step_results(model, placed)
    return {
        "device_count": jax.device_count(),
        "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))),
        "placement": placement,
        **compare(on_mesh, one_device),
    }


if __name__ == "__main__":
    # Half the compile time; both runs are compiled alike, and the partitioning is not skipped.
    jax.config.update("jax_disable_most_optimizations", True)
    print("RESULT " + json.dumps(run(sys.argv[1])), flush=True)
