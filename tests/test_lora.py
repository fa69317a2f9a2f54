"""LoRA adapters (`aria_jax.lora`): fresh ones change nothing; merged ones are the unmerged ones
on every kind of target; training moves the adapters and nothing else; saved adapters load back
bit for bit, and a bad adapter directory fails with an AdapterError naming the file and key.

The model is a tiny multimodal one (tests/tiny_models.py defaults), loaded by aria_jax; its
forward is compiled once with adapters and once without.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

import aria_jax
from aria_jax import train
from aria_jax.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    TARGET_LAYOUT,
    AdapterError,
    LoraConfig,
    init_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
    scaled_adapters,
)
from aria_jax.modeling import AriaModel
from tiny_models import make_multimodal_model

from train_mesh_worker import IMAGE, make_batch, on_host

EVERY_TARGET = LoraConfig(rank=4, alpha=8, targets=tuple(TARGET_LAYOUT))  # lm_head too


@dataclasses.dataclass
class Tiny:
    config: aria_jax.AriaConfig
    params: dict
    batch: dict
    forward: object  # (params, batch) -> logits
    adapted_forward: object  # (params, scaled adapters, batch) -> logits

    def logits(self, params, adapters=None) -> np.ndarray:
        """The logits of `self.batch`, with `adapters` (of EVERY_TARGET) in the model if given."""
        if adapters is None:
            return np.asarray(self.forward(params, self.batch))
        return np.asarray(self.adapted_forward(params, scaled_adapters(adapters, EVERY_TARGET), self.batch))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    directory = tmp_path_factory.mktemp("tiny")
    make_multimodal_model(directory, seed=5)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(directory)
    batch = make_batch(0, [([3, IMAGE, 2, IMAGE, 4], 6), ([2, IMAGE, 3], 4)], crop_side=28, tokens_per_crop=4)
    aria = AriaModel(model.config)

    def apply(variables, batch):
        return aria.apply(
            variables, batch["input_ids"], batch["attention_mask"], None, batch["pixel_values"], batch["pixel_mask"]
        )

    return Tiny(
        model.config,
        model.params,
        batch,
        jax.jit(lambda params, batch: apply({"params": params}, batch)),
        jax.jit(lambda params, lora, batch: apply({"params": params, "lora": lora}, batch)),
    )


def random_b(adapters: dict, seed: int = 0) -> dict:
    """`adapters` with every B random (fresh ones are zero): A @ B moves each weight by ~25%
    (in norm)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32) if path[-1].key.endswith("_lora_b") else leaf

    return jax.tree_util.tree_map_with_path(draw, adapters)


def target_kinds(adapters: dict) -> set[str]:
    return {path.rsplit("/", 1)[1].removesuffix("_lora_a") for path in on_host(adapters) if path.endswith("_lora_a")}


def only_kind(adapters: dict, kind: str) -> dict:
    """`adapters` with every B zeroed but those of one target kind: only that kind adds anything."""

    def keep(path, leaf):
        name = path[-1].key
        return np.zeros_like(leaf) if name.endswith("_lora_b") and name != f"{kind}_lora_b" else leaf

    return jax.tree_util.tree_map_with_path(keep, adapters)


def assert_close(logits, expected, tolerance, what):
    diff, scale = float(np.abs(logits - expected).max()), max(1.0, float(np.abs(expected).max()))
    assert diff <= tolerance * scale, f"{what}: max |diff| {diff:.3g} at scale {scale:.3g}"


# ----------------------------------------------------------------------------- adapters in the model


def test_fresh_adapters_change_nothing(tiny):
    """init_adapters: A random, B zero on every target of the decoder (and lm_head when asked),
    so the logits with them are the logits without."""
    adapters = init_adapters(tiny.params, EVERY_TARGET, jax.random.key(0))
    assert set(adapters) == {"language_model"}  # never the vision tower or the projector
    assert target_kinds(adapters) == set(TARGET_LAYOUT)
    default_targets = init_adapters(tiny.params, LoraConfig(rank=4), jax.random.key(0))
    assert target_kinds(default_targets) == set(TARGET_LAYOUT) - {"lm_head"}
    for path, leaf in on_host(adapters).items():
        if path.endswith("_lora_a"):
            assert leaf.shape[-1] == EVERY_TARGET.rank and (leaf != 0).any(), path
        else:
            assert (leaf == 0).all(), path
    assert_close(tiny.logits(tiny.params, adapters), tiny.logits(tiny.params), 1e-6, "fresh adapters")


def test_merged_adapters_are_the_unmerged_ones(tiny):
    """With random B, folding the adapters into the weights (merge_adapters) gives the logits of
    the model reading them (the "lora" collection), far from the base logits. Every target kind
    on its own moves the logits, so the hook of each is checked; merging changes exactly the
    adapted weights."""
    adapters = random_b(init_adapters(tiny.params, EVERY_TARGET, jax.random.key(1)))
    merged = merge_adapters(tiny.params, adapters, EVERY_TARGET)
    base = tiny.logits(tiny.params)
    unmerged = tiny.logits(tiny.params, adapters)
    assert_close(tiny.logits(merged), unmerged, 1e-5, "merged vs unmerged")
    assert np.abs(unmerged - base).max() > 0.1 * np.abs(base).max()

    for kind in TARGET_LAYOUT:
        moved = np.abs(tiny.logits(merge_adapters(tiny.params, only_kind(adapters, kind), EVERY_TARGET)) - base).max()
        assert moved > 1e-3 * np.abs(base).max(), kind

    adapted = {path.removesuffix("_lora_a") for path in on_host(adapters) if path.endswith("_lora_a")}
    params, merged = on_host(tiny.params), on_host(merged)
    assert merged.keys() == params.keys()
    for path, value in params.items():
        assert merged[path].shape == value.shape and merged[path].dtype == value.dtype, path
        assert np.array_equal(merged[path], value) != (path in adapted), path


# ----------------------------------------------------------------------------- training


def test_lora_training_moves_only_the_adapters(tiny):
    """TrainConfig(lora=...): the trained state holds the adapters and no params; a few jitted
    steps lower the loss, move every adapter tensor and leave the base params bit-identical."""
    train_config = train.TrainConfig(learning_rate=1e-2, total_steps=5, lora=EVERY_TARGET)
    adapters = init_adapters(tiny.params, EVERY_TARGET, jax.random.key(2))
    trainable, frozen = train.split_params(tiny.params, train_config, adapters)
    assert trainable["params"] == {} and set(frozen) == set(train.COMPONENTS)
    state = train.init_state(trainable, train_config)
    adapters_before, base_before = on_host(adapters), on_host(frozen)
    step = train.jit_train_step(tiny.config, train_config)
    batches = train.stack_micro_batches([tiny.batch])
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, batches)
        losses.append(float(metrics["loss"]))
    assert state.trainable["params"] == {}
    assert losses[-1] < 0.9 * losses[0], losses
    adapters_after = on_host(state.trainable["lora"])
    assert adapters_after.keys() == adapters_before.keys()
    assert [path for path, value in adapters_after.items() if np.array_equal(value, adapters_before[path])] == []
    for path, value in on_host(frozen).items():
        np.testing.assert_array_equal(value, base_before[path], err_msg=path)


# ----------------------------------------------------------------------------- save and load


@pytest.fixture
def saved(tiny, tmp_path) -> tuple[str, dict]:
    """A directory written by save_adapters (adapters with random B), and the adapters."""
    adapters = random_b(init_adapters(tiny.params, EVERY_TARGET, jax.random.key(3)))
    directory = str(tmp_path / "adapters")
    save_adapters(adapters, EVERY_TARGET, directory)
    return directory, adapters


def test_saved_adapters_load_back_bit_for_bit(tiny, saved):
    """save_adapters writes the two files; load_adapters gives back every tensor bit for bit, and
    the config, whether or not it checks them against the model."""
    directory, adapters = saved
    assert sorted(os.listdir(directory)) == sorted([ADAPTER_FILE, CONFIG_FILE])
    for params in (tiny.params, None):  # checked against the model, or not
        loaded, config = load_adapters(directory, params)
        assert config == EVERY_TARGET
        expected, got = on_host(adapters), on_host(loaded)
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            assert got[path].dtype == value.dtype and np.array_equal(got[path], value), path


def edit_tensors(change):
    """A corruption: `change` applied to the saved tensors, {key: array}."""

    def corrupt(directory):
        path = os.path.join(directory, ADAPTER_FILE)
        tensors = safetensors.numpy.load_file(path)
        change(tensors)
        safetensors.numpy.save_file(tensors, path)

    return corrupt


def write_config(text: str):
    def corrupt(directory):
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            f.write(text)

    return corrupt


def remove(name: str):
    return lambda directory: os.remove(os.path.join(directory, name))


Q_A = "language_model.layers.self_attn.q_proj_lora_a"
ROUTER_A = "language_model.layers.mlp.router_lora_a"  # the router is never a target
CORRUPTIONS = {  # name: (corruption, the file the error names, what else it says)
    "wrong shape": (edit_tensors(lambda t: t.update({Q_A: t[Q_A][..., :2]})), ADAPTER_FILE, Q_A),
    "missing key": (edit_tensors(lambda t: t.pop(Q_A)), ADAPTER_FILE, Q_A),
    "unknown key": (edit_tensors(lambda t: t.update({ROUTER_A: t[Q_A]})), ADAPTER_FILE, ROUTER_A),
    "bad config JSON": (write_config("{not json"), CONFIG_FILE, "not a valid adapter config"),
    "config without rank": (write_config(json.dumps({"alpha": 8, "targets": ["q_proj"]})), CONFIG_FILE, "rank"),
    "config with rank 0": (
        write_config(json.dumps({"rank": 0, "alpha": 8, "targets": ["q_proj"]})),
        CONFIG_FILE,
        "rank",
    ),
    "no weights file": (remove(ADAPTER_FILE), ADAPTER_FILE, "not found"),
    "no config file": (remove(CONFIG_FILE), CONFIG_FILE, "not found"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_adapter_directories_fail_naming_file_and_key(tiny, saved, corruption):
    """Every way a directory can fail to fit the model is an AdapterError that names the file,
    and the key when one is at fault."""
    directory, _ = saved
    corrupt, file_name, detail = CORRUPTIONS[corruption]
    corrupt(directory)
    with pytest.raises(AdapterError) as excinfo:
        load_adapters(directory, tiny.params)
    message = str(excinfo.value)
    assert os.path.join(directory, file_name) in message and detail in message, message


def test_saving_over_a_directory_needs_overwrite_and_leaves_it_intact(tiny, saved):
    """save_adapters writes a whole directory or nothing: over an existing one it refuses,
    leaving it as it was, unless told to overwrite."""
    directory, adapters = saved

    def contents():
        return {name: Path(directory, name).read_bytes() for name in os.listdir(directory)}

    before = contents()
    other = random_b(adapters, seed=1)
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapters(other, EVERY_TARGET, directory)
    assert contents() == before
    assert sorted(os.listdir(os.path.dirname(directory))) == ["adapters"]  # nothing half-written beside it
    save_adapters(other, EVERY_TARGET, directory, overwrite=True)
    loaded, _ = load_adapters(directory, tiny.params)
    lm_head_b = "language_model/lm_head_lora_b"
    np.testing.assert_array_equal(on_host(loaded)[lm_head_b], on_host(other)[lm_head_b])


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=-2), "rank=-2"),
        (dict(rank=2.0), "rank=2.0"),
        (dict(targets=("q_proj", "gate_proj")), "gate_proj"),
        (dict(targets=()), "choose from"),
    ],
)
def test_lora_config_rejects_bad_settings(settings, message):
    """A rank that is not a positive integer, or targets that are unknown or none, are refused."""
    with pytest.raises(ValueError, match=message):
        LoraConfig(**settings)
