"""`aria-jax convert` / `aria-jax export`: hub safetensors -> converted (orbax) checkpoint -> hub again.

The source of truth is tiny random transformers models saved with `save_pretrained`
(tiny_models.py). A round trip through convert and export must give transformers a model whose
state dict is bit-identical to the original's (except the vision tower's unused post_layernorm,
which export writes as zeros) and whose logits are bit-identical (torch.equal), in float32 and in
bfloat16; restoring a converted checkpoint (on one device, or straight into an 8-device expert
sharding) must give the params the hub loader gives; and the command line must refuse bad input
with one line, never leave a half-written destination, and recover from a killed run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import aria_jax
from aria_jax.checkpoint import MANIFEST, restore_params
from aria_jax.config import config_from_pretrained
from aria_jax.modeling import multimodal_param_shapes
from aria_jax.pretrained import shape_tree
from aria_jax.safetensors_io import SafetensorsFile
from aria_jax.weights import load_params
from convert.conversion import convert_checkpoint, export_checkpoint
from cli_helpers import assert_one_line_error, partial_of, run_cli, run_main
from tiny_models import make_multimodal_model, make_text_model
from repo_paths import ROOT, SHAPES_PNG, TINY_RANDOM


PAD_ID = 2  # pad_token_id and eos_token_id of the tiny configs
FIRST_TEXT_ID = 3  # prompt text uses ids >= 3, never the image token
IMAGE_TOKEN_ID = 9
IMAGE_SIDE = 28  # tiny_models.VISION_DEFAULTS: 28-pixel crops of 2x2 patches -> 4 queries
QUERIES_PER_CROP = 4
# Non-square everywhere (hidden 32, expert width 8 -> gate_up (E, 32, 16), GQA 4/2 heads of 8,
# vocab 128), so that a missing or extra transpose on the way back cannot go unnoticed.
TEXT = dict(intermediate_size=8, num_attention_heads=4, num_key_value_heads=2)
# transformers' names of the two tensors Aria never uses; export writes them as zeros.
POST_LAYERNORM = {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}


# One torch thread: torch's OpenMP workers and XLA's thread pool oversubscribe a small machine.
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_tensors(path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(str(path))
    return {key: np.array(f.get(key)) for key in f.keys()}


def write_checkpoint(directory, tensors: dict[str, np.ndarray], config: dict):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def load_torch(directory, cls=transformers.AriaForConditionalGeneration, dtype=torch.float32):
    return cls.from_pretrained(directory, dtype=dtype, experts_implementation="eager").eval()


def assert_state_dicts_identical(actual: torch.nn.Module, expected: torch.nn.Module, except_keys=frozenset()):
    a, e = actual.state_dict(), expected.state_dict()
    assert sorted(a) == sorted(e)
    assert len(a) > 10
    for key in e:
        if key in except_keys:
            continue
        assert a[key].dtype == e[key].dtype and a[key].shape == e[key].shape, key
        assert torch.equal(a[key], e[key]), key


def assert_post_layernorm_zeros(exported: torch.nn.Module, original: torch.nn.Module):
    """The only expected difference: export writes the unused post_layernorm as zeros."""
    a, e = exported.state_dict(), original.state_dict()
    for key in POST_LAYERNORM:
        assert a[key].shape == e[key].shape and a[key].dtype == e[key].dtype, key
        assert not a[key].any(), key
        assert e[key].any(), key  # random in the original: the difference is real, and only here


def flat_params(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def assert_params_identical(actual, expected):
    a, e = flat_params(actual), flat_params(expected)
    assert sorted(a) == sorted(e)
    assert len(e) > 10
    for key in e:
        assert a[key].dtype == e[key].dtype, (key, a[key].dtype, e[key].dtype)
        assert a[key].shape == e[key].shape, key
        # bitwise (NaN-safe, and -0.0 != 0.0)
        assert a[key].tobytes() == e[key].tobytes(), key


def multimodal_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two left-padded rows: row 0 holds two images (one of them valid on its top patch row
    only), row 1 one image. 4 image tokens per 28-pixel crop."""
    rng = np.random.default_rng(seed)

    def text(n):
        ids = rng.integers(FIRST_TEXT_ID, 128, size=n)
        return list(np.where(ids == IMAGE_TOKEN_ID, IMAGE_TOKEN_ID + 1, ids))

    image = [IMAGE_TOKEN_ID] * QUERIES_PER_CROP
    rows = [text(3) + image + text(2) + image + text(3), text(2) + image + text(4)]
    width = max(map(len, rows))
    ids = np.full((2, width), PAD_ID, np.int64)
    mask = np.zeros((2, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    pixel_values = rng.standard_normal((3, 3, IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32)
    pixel_mask = np.ones((3, IMAGE_SIDE, IMAGE_SIDE), bool)
    pixel_mask[1, IMAGE_SIDE // 2 :] = False
    pixel_values[1][:, IMAGE_SIDE // 2 :] = 0.0
    position_ids = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    assert (ids == IMAGE_TOKEN_ID).sum() == len(pixel_values) * QUERIES_PER_CROP
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(position_ids),
        "pixel_values": torch.from_numpy(pixel_values),
        "pixel_mask": torch.from_numpy(pixel_mask),
    }


def torch_logits(model, batch, dtype=None) -> torch.Tensor:
    batch = dict(batch)
    if dtype is not None and "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with torch.no_grad():
        return model(**batch).logits


def assert_logits_identical(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(expected).all()
    assert torch.equal(actual, expected), float((actual.float() - expected.float()).abs().max())


def hub_shapes(directory) -> dict:
    return shape_tree(multimodal_param_shapes(config_from_pretrained(directory)))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mm_f32(tmp_path_factory) -> str:
    """A float32 tiny multimodal hub directory."""
    directory = tmp_path_factory.mktemp("mm_f32") / "hub"
    make_multimodal_model(directory, seed=11, **TEXT)
    return str(directory)


@pytest.fixture(scope="module")
def mm_f32_converted(mm_f32, tmp_path_factory) -> str:
    destination = tmp_path_factory.mktemp("mm_f32_converted") / "converted"
    summary = convert_checkpoint(mm_f32, destination)
    assert summary.destination == str(destination)
    return str(destination)


@pytest.fixture(scope="module")
def mm_f32_exported(mm_f32_converted, tmp_path_factory) -> str:
    destination = tmp_path_factory.mktemp("mm_f32_exported") / "exported"
    export_checkpoint(mm_f32_converted, destination)
    return str(destination)


@pytest.fixture(scope="module")
def mm_f32_reference(mm_f32):
    return load_torch(mm_f32)


@pytest.fixture(scope="module")
def batch():
    return multimodal_batch()


# ----------------------------------------------------------------------------- round trips


def test_converted_directory_layout(mm_f32, mm_f32_converted):
    """Self-contained: config, manifest, orbax pieces and side files; no safetensors."""
    names = set(os.listdir(mm_f32_converted))
    assert {"config.json", MANIFEST, "params", "generation_config.json"} <= names
    assert not any(name.endswith(".safetensors") or name.endswith(".partial") for name in names), names
    assert not os.path.exists(partial_of(mm_f32_converted))
    manifest = load_json(os.path.join(mm_f32_converted, MANIFEST))
    assert manifest["dtype"] == "float32"
    assert load_json(os.path.join(mm_f32_converted, "config.json"))["dtype"] == "float32"
    pieces = {piece["directory"] for piece in manifest["pieces"]}
    for piece in pieces:
        assert os.path.isdir(os.path.join(mm_f32_converted, "params", piece)), piece
    on_disk = {
        f"{component}/{name}"
        for component in os.listdir(os.path.join(mm_f32_converted, "params"))
        for name in os.listdir(os.path.join(mm_f32_converted, "params", component))
    }
    assert on_disk == pieces  # no orbax temporaries left behind
    assert {piece["component"] for piece in manifest["pieces"]} == {
        "vision_tower",
        "multi_modal_projector",
        "language_model",
    }
    num_layers = load_json(os.path.join(mm_f32, "config.json"))["text_config"]["num_hidden_layers"]
    text_layers = {p["layer"] for p in manifest["pieces"] if p["component"] == "language_model"}
    assert text_layers == {None, *range(num_layers)}


def test_multimodal_round_trip_float32(mm_f32, mm_f32_exported, mm_f32_reference, batch):
    assert sorted(n for n in os.listdir(mm_f32_exported) if "safetensors" in n) == ["model.safetensors"]
    exported = load_torch(mm_f32_exported)
    assert_state_dicts_identical(exported, mm_f32_reference, except_keys=POST_LAYERNORM)
    assert_post_layernorm_zeros(exported, mm_f32_reference)
    # the exported file has the hub's own key names: exactly those of the source file
    assert sorted(SafetensorsFile(os.path.join(mm_f32_exported, "model.safetensors")).keys()) == sorted(
        SafetensorsFile(os.path.join(mm_f32, "model.safetensors")).keys()
    )

    expected = torch_logits(mm_f32_reference, batch)
    assert_logits_identical(torch_logits(exported, batch), expected)
    # Not blind: the images matter to these logits.
    blank = torch_logits(mm_f32_reference, {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
    assert (blank - expected)[batch["attention_mask"].bool()].abs().max() > 1e-3


def test_text_only_round_trip_float32(tmp_path):
    source = tmp_path / "hub"
    make_text_model(source, seed=12, **TEXT)
    convert_checkpoint(source, tmp_path / "converted")
    export_checkpoint(tmp_path / "converted", tmp_path / "exported")
    assert load_json(tmp_path / "exported" / "config.json")["architectures"] == ["AriaTextForCausalLM"]
    assert sorted(SafetensorsFile(tmp_path / "exported" / "model.safetensors").keys()) == sorted(
        SafetensorsFile(source / "model.safetensors").keys()
    )

    original = load_torch(source, transformers.AriaTextForCausalLM)
    exported = load_torch(tmp_path / "exported", transformers.AriaTextForCausalLM)
    assert_state_dicts_identical(exported, original)
    ids = torch.from_numpy(np.random.default_rng(1).integers(FIRST_TEXT_ID, 128, size=(2, 9)))
    assert_logits_identical(torch_logits(exported, {"input_ids": ids}), torch_logits(original, {"input_ids": ids}))
    # and ours loads the converted text-only checkpoint as it loads the hub one
    assert_params_identical(
        aria_jax.AriaTextForCausalLM.from_pretrained(tmp_path / "converted").params,
        aria_jax.AriaTextForCausalLM.from_pretrained(source).params,
    )


def test_multimodal_round_trip_bfloat16(tmp_path, batch):
    source = tmp_path / "hub"
    make_multimodal_model(source, seed=13, dtype=torch.bfloat16, **TEXT)
    assert SafetensorsFile(source / "model.safetensors").dtype("language_model.lm_head.weight") == np.dtype(
        ml_dtypes.bfloat16
    )
    convert_checkpoint(source, tmp_path / "converted")  # default: the source's dtype
    assert load_json(tmp_path / "converted" / MANIFEST)["dtype"] == "bfloat16"
    assert load_json(tmp_path / "converted" / "config.json")["dtype"] == "bfloat16"
    export_checkpoint(tmp_path / "converted", tmp_path / "exported")
    exported_file = SafetensorsFile(tmp_path / "exported" / "model.safetensors")
    assert {exported_file.dtype(key) for key in exported_file.keys()} == {np.dtype(ml_dtypes.bfloat16)}

    original = load_torch(source, dtype=torch.bfloat16)
    exported = load_torch(tmp_path / "exported", dtype=torch.bfloat16)
    assert {v.dtype for v in original.state_dict().values()} == {torch.bfloat16}
    assert_state_dicts_identical(exported, original, except_keys=POST_LAYERNORM)
    assert_post_layernorm_zeros(exported, original)
    assert_logits_identical(
        torch_logits(exported, batch, torch.bfloat16), torch_logits(original, batch, torch.bfloat16)
    )


def test_float32_converted_to_bfloat16(mm_f32, tmp_path, capsys):
    """--dtype bfloat16 rounds each float32 weight to nearest (ml_dtypes), as the hub loader does."""
    result = run_main(capsys, "convert", "--quiet", "--dtype", "bfloat16", mm_f32, str(tmp_path / "bf16"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("converted ") and str(tmp_path / "bf16") in result.stdout
    assert load_json(tmp_path / "bf16" / MANIFEST)["dtype"] == "bfloat16"
    shapes = hub_shapes(mm_f32)

    restored = flat_params(restore_params(tmp_path / "bf16", shapes, jnp.bfloat16))
    direct = flat_params(load_params(mm_f32, shapes, jnp.bfloat16))
    float32 = flat_params(load_params(mm_f32, shapes, jnp.float32))
    assert sorted(restored) == sorted(direct) == sorted(float32)
    inexact = 0
    for key, value in float32.items():
        assert value.dtype == np.float32
        rounded = value.astype(ml_dtypes.bfloat16)
        assert restored[key].dtype == direct[key].dtype == np.dtype(ml_dtypes.bfloat16), key
        assert restored[key].shape == value.shape, key
        assert restored[key].view(np.uint16).tobytes() == rounded.view(np.uint16).tobytes(), key
        assert restored[key].view(np.uint16).tobytes() == direct[key].view(np.uint16).tobytes(), key
        inexact += int((rounded.astype(np.float32) != value).sum())
    assert inexact > 1000  # the weights really were rounded (random float32 values)
    # Not truncation: some weights round up, away from zero, not to the truncated bit pattern.
    key = "['language_model']['layers']['mlp']['experts_gate_up']"
    truncated = (float32[key].view(np.uint32) >> 16).astype(np.uint16)
    assert (restored[key].view(np.uint16) != truncated).any()
    # restored as float32, the stored bf16 values are widened exactly
    widened = flat_params(restore_params(tmp_path / "bf16", shapes, jnp.float32))
    for key, value in float32.items():
        np.testing.assert_array_equal(widened[key], value.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)


def test_sharded_export(mm_f32, mm_f32_converted, mm_f32_exported, mm_f32_reference, batch, tmp_path, capsys):
    """--max-shard-size 50KB: several model-0000k-of-0000n files + an index; transformers loads it."""
    destination = tmp_path / "sharded"
    max_bytes = 50_000
    result = run_main(capsys, "export", "--quiet", "--max-shard-size", "50KB", mm_f32_converted, str(destination))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("exported ")
    files = sorted(n for n in os.listdir(destination) if n.endswith(".safetensors"))
    count = len(files)
    assert count >= 3, files
    assert files == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    index = load_json(destination / "model.safetensors.index.json")
    weight_map = index["weight_map"]

    in_files, total = {}, 0
    for name in files:
        f = SafetensorsFile(destination / name)
        keys = list(f.keys())
        assert keys, name
        shard_bytes = sum(f.nbytes(key) for key in keys)
        assert shard_bytes <= max_bytes or len(keys) == 1, (name, shard_bytes)
        total += shard_bytes
        for key in keys:
            assert key not in in_files, f"{key} in {name} and {in_files[key]}"
            in_files[key] = name
    assert weight_map == in_files  # every key, in the file the index says
    assert sorted(weight_map) == sorted(SafetensorsFile(os.path.join(mm_f32, "model.safetensors")).keys())
    assert index["metadata"]["total_size"] == total
    # the same tensors as the unsharded export, bit for bit
    single = read_tensors(os.path.join(mm_f32_exported, "model.safetensors"))
    for key, name in weight_map.items():
        assert SafetensorsFile(destination / name).get(key).tobytes() == single[key].tobytes(), key

    exported = load_torch(destination)
    assert_state_dicts_identical(exported, mm_f32_reference, except_keys=POST_LAYERNORM)
    assert_logits_identical(torch_logits(exported, batch), torch_logits(mm_f32_reference, batch))


# ----------------------------------------------------------------------------- restoring


def test_cli_converts_quantized_and_export_refuses_it(mm_f32, tmp_path, capsys):
    """`aria-jax convert --quantize int8`: the manifest says so, the model loads as stored (the
    arrays of quantizing while reading the hub files), and `aria-jax export` refuses it in one line."""
    import aria_jax

    destination = tmp_path / "int8"
    result = run_main(capsys, "convert", "--quiet", "--quantize", "int8", mm_f32, str(destination))
    assert result.returncode == 0, result.stderr
    assert load_json(destination / MANIFEST)["quantization"] == {"scheme": "int8", "group_size": 128, "vision": False}
    stored = aria_jax.AriaForConditionalGeneration.from_pretrained(destination).params
    from_hub = aria_jax.AriaForConditionalGeneration.from_pretrained(mm_f32, quantize="int8").params
    assert stored["language_model"]["layers"]["mlp"]["experts_gate_up"]["values"].dtype == np.int8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), stored, from_hub)
    assert_one_line_error(
        run_main(capsys, "export", "--quiet", str(destination), str(tmp_path / "hub")), "export the float conversion"
    )
    assert not (tmp_path / "hub").exists()


def test_from_pretrained_converted_equals_hub(mm_f32, mm_f32_converted):
    hub = aria_jax.AriaForConditionalGeneration.from_pretrained(mm_f32)
    converted = aria_jax.AriaForConditionalGeneration.from_pretrained(mm_f32_converted)
    assert converted.config == hub.config
    assert {leaf.dtype for leaf in flat_params(converted.params).values()} == {np.dtype(np.float32)}
    assert_params_identical(converted.params, hub.params)
    # the text model alone, from the multimodal converted checkpoint
    text_hub = aria_jax.AriaTextForCausalLM.from_pretrained(mm_f32)
    text_converted = aria_jax.AriaTextForCausalLM.from_pretrained(mm_f32_converted)
    assert text_converted.config == text_hub.config
    assert_params_identical(text_converted.params, text_hub.params)


MESH_CHECK = r"""
import sys
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from aria_jax.checkpoint import restore_params
from aria_jax.config import config_from_pretrained
from aria_jax.modeling import multimodal_param_shapes
from aria_jax.pretrained import shape_tree
from aria_jax.weights import load_params

hub, converted = sys.argv[1:3]
assert jax.device_count() == 8, jax.devices()
config = config_from_pretrained(hub)
E = config.text_config.moe_num_experts
assert E == 8, E
boxed = multimodal_param_shapes(config)
shapes = shape_tree(boxed)


def flat(tree, is_leaf=None):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


specs = flat(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
assert specs[("language_model", "layers", "mlp", "experts_gate_up")] == P("layers", "experts", "expert_embed", "expert_mlp")
mesh = jax.make_mesh((8,), ("expert",))
requested = {path: NamedSharding(mesh, P(*("expert" if name == "experts" else None for name in spec)))
             for path, spec in specs.items()}
calls = []


def sharding_for(path):
    calls.append(path)
    return requested[path]


reference = {p: np.asarray(v) for p, v in flat(load_params(hub, shapes, jnp.float32)).items()}
results = {
    "restore_params": flat(restore_params(converted, shapes, jnp.float32, sharding_for=sharding_for)),
    "load_params": flat(load_params(hub, shapes, jnp.float32, sharding_for=sharding_for)),
}
assert sorted(set(calls)) == sorted(requested), "sharding_for not asked about every param"
assert sorted(reference) == sorted(requested) == sorted(flat(shapes, is_leaf=lambda x: isinstance(x, tuple)))
sharded = 0
for how, params in results.items():
    assert sorted(params) == sorted(reference), how
    for path, value in params.items():
        where = (how,) + path
        assert value.dtype == jnp.float32 and value.shape == reference[path].shape, where
        assert value.sharding == requested[path], (where, value.sharding, requested[path])
        assert np.asarray(value).tobytes() == reference[path].tobytes(), where
    for name in ("experts_gate_up", "experts_down"):
        path = ("language_model", "layers", "mlp", name)
        value = params[path]
        assert value.shape[1] == E, value.shape
        assert value.sharding.spec[1] == "expert", value.sharding
        shards = value.addressable_shards
        assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices()), (how, name)
        experts = []
        for shard in shards:
            assert shard.data.shape[1] == E // 8, (how, name, shard.data.shape)
            assert shard.data.shape[0] == value.shape[0] and shard.data.shape[2:] == value.shape[2:]
            np.testing.assert_array_equal(np.asarray(shard.data), reference[path][shard.index])
            experts.append(shard.index[1].start)
        assert sorted(experts) == list(range(E)), experts  # each device holds another expert
        sharded += 1
    # something else is replicated: every device holds all of it
    embed = params[("language_model", "embed_tokens")]
    assert all(s.data.shape == embed.shape for s in embed.addressable_shards)
assert sharded == 4

# bfloat16 straight into the sharding: as the hub loader rounds it
restored = flat(restore_params(converted, shapes, jnp.bfloat16, sharding_for=sharding_for))
loaded = flat(load_params(hub, shapes, jnp.bfloat16, sharding_for=sharding_for))
for path in reference:
    assert restored[path].dtype == jnp.bfloat16 and restored[path].sharding == requested[path], path
    assert np.asarray(restored[path]).tobytes() == np.asarray(loaded[path]).tobytes(), path
print("MESH OK")
"""


@pytest.fixture(scope="module")
def mm_8_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm_8_experts")
    make_multimodal_model(root / "hub", seed=14, moe_num_experts=8, moe_topk=2, num_hidden_layers=3, **TEXT)
    convert_checkpoint(root / "hub", root / "converted")
    return str(root / "hub"), str(root / "converted")


def test_restore_into_expert_sharded_mesh(mm_8_experts):
    """On 8 CPU devices, experts sharded over an 'expert' mesh axis, everything else replicated:
    restore_params and load_params give the same arrays, each in the requested sharding, and
    each device holds one expert of the stacked expert weights."""
    hub, converted = mm_8_experts
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", MESH_CHECK, hub, converted],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "MESH OK" in result.stdout


# ----------------------------------------------------------------------------- processor and tokenizer


@pytest.fixture(scope="module")
def tiny_random_converted(tmp_path_factory) -> str:
    destination = tmp_path_factory.mktemp("tiny_random") / "converted"
    convert_checkpoint(TINY_RANDOM, destination)
    return str(destination)


def test_processor_and_generation_from_converted_dir(tiny_random_converted):
    side_files = [
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ]
    for name in side_files:
        with (
            open(os.path.join(TINY_RANDOM, name), "rb") as a,
            open(os.path.join(tiny_random_converted, name), "rb") as b,
        ):
            assert a.read() == b.read(), name

    hub_processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    processor = aria_jax.AriaProcessor.from_pretrained(tiny_random_converted)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hub_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|img|>" in text
    inputs = processor(text=text, images=[SHAPES_PNG])
    hub_inputs = hub_processor(text=text, images=[SHAPES_PNG])
    assert sorted(inputs) == sorted(hub_inputs)
    for key in hub_inputs:
        np.testing.assert_array_equal(np.asarray(inputs[key]), np.asarray(hub_inputs[key]), err_msg=key)
    assert (np.asarray(inputs["input_ids"]) == IMAGE_TOKEN_ID).sum() > 0

    hub_model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(tiny_random_converted)
    assert model.tokenizer is not None  # stop strings and streaming need the copied tokenizer
    assert_params_identical(model.params, hub_model.params)
    tokens = model.generate(**inputs, max_new_tokens=8)
    np.testing.assert_array_equal(tokens, hub_model.generate(**hub_inputs, max_new_tokens=8))
    new = tokens[0, inputs["input_ids"].shape[1] :].tolist()
    assert processor.decode(new) == hub_processor.decode(new)
    assert processor.tokenizer.encode("a shape") == hub_processor.tokenizer.encode("a shape")


# ----------------------------------------------------------------------------- safety


def test_existing_destination_refused_then_overwritten(mm_f32, mm_f32_converted, tmp_path, capsys):
    """Refused by a real `aria-jax` process (exit status 2, one line, nothing touched); with
    --overwrite still refused while it is a folder of the user's, replaced once it is a
    converted checkpoint (and likewise for export)."""
    destination = tmp_path / "dst"
    destination.mkdir()
    (destination / "keep.txt").write_text("precious")
    result = run_cli("convert", "--quiet", mm_f32, str(destination))
    assert_one_line_error(result, str(destination), "already exists", "--overwrite")
    result = run_main(capsys, "convert", "--quiet", "--overwrite", mm_f32, str(destination))
    assert_one_line_error(result, str(destination), "is not a checkpoint written by `aria-jax convert`")
    assert os.listdir(destination) == ["keep.txt"]
    assert (destination / "keep.txt").read_text() == "precious"
    assert not os.path.exists(partial_of(destination))

    os.remove(destination / "keep.txt")
    shutil.copytree(mm_f32_converted, destination, dirs_exist_ok=True)
    (destination / "stale.json").write_text("{}")  # a side file: replaced with the rest
    result = run_main(capsys, "convert", "--quiet", "--overwrite", mm_f32, str(destination))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("converted ") and str(destination) in result.stdout
    assert not (destination / "stale.json").exists()
    assert (destination / MANIFEST).is_file()
    assert not os.path.exists(partial_of(destination))
    assert not os.path.exists(partial_of(destination) + ".replaced")
    # the same conversion as the fixture's (whose params test_from_pretrained_converted_equals_hub checks)
    assert load_json(destination / MANIFEST) == load_json(os.path.join(mm_f32_converted, MANIFEST))
    for name in ("config.json", "generation_config.json"):
        assert (destination / name).read_bytes() == open(os.path.join(mm_f32_converted, name), "rb").read(), name

    # export too: refused while it is the user's folder, then replaced once it is an export
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        export_checkpoint(mm_f32_converted, exported)
    with pytest.raises(FileExistsError, match="is not a model directory written by aria-jax"):
        export_checkpoint(mm_f32_converted, exported, overwrite=True)
    assert os.listdir(exported) == ["keep.txt"]
    os.remove(exported / "keep.txt")
    export_checkpoint(mm_f32_converted, exported, overwrite=True)  # empty: replaced
    export_checkpoint(mm_f32_converted, exported, overwrite=True)  # an export: replaced
    assert sorted(os.listdir(exported)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_killed_conversion_leaves_no_destination(tmp_path, capsys):
    """SIGKILL mid-way: the destination does not exist, the hidden .partial does; the next run
    removes it and succeeds."""
    source = tmp_path / "hub"
    layers = 12  # 13 orbax pieces of ~0.1 s each: plenty of time to kill it after the second
    make_text_model(source, seed=15, num_hidden_layers=layers, **TEXT)
    destination = tmp_path / "converted"
    partial = partial_of(destination)
    pieces_dir = os.path.join(partial, "params", "language_model")

    process = subprocess.Popen(
        [sys.executable, "-m", "aria_jax.cli", "convert", "--quiet", str(source), str(destination)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.isdir(pieces_dir) and len(os.listdir(pieces_dir)) >= 2:
                break
            time.sleep(0.005)
        assert process.poll() is None, (
            "the conversion ended before it could be killed (make the model bigger)",
            process.returncode,
            process.stderr.read(),
        )
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(destination)
    assert os.path.isdir(partial)  # killed mid-way: the leftovers are there
    assert len(os.listdir(pieces_dir)) >= 2  # and it was really mid-way: pieces written, no manifest
    assert not os.path.exists(os.path.join(partial, MANIFEST))
    # a stale file in the leftovers must not make it into the result
    with open(os.path.join(partial, "stale.json"), "w") as f:
        f.write("{}")

    result = run_main(capsys, "convert", "--quiet", str(source), str(destination))
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(partial)
    assert not os.path.exists(os.path.join(destination, "stale.json"))
    manifest = load_json(os.path.join(destination, MANIFEST))
    assert len({p["layer"] for p in manifest["pieces"]}) == layers + 1
    assert_params_identical(
        aria_jax.AriaTextForCausalLM.from_pretrained(destination).params,
        aria_jax.AriaTextForCausalLM.from_pretrained(source).params,
    )


# ----------------------------------------------------------------------------- command-line errors


class _Bait:
    """Unpickling this calls open(marker, "w"): the marker file appears iff it was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


MISSING_KEY = "language_model.model.layers.1.mlp.router.weight"
UNKNOWN_KEY = "language_model.model.layers.0.mlp.bogus.weight"
MISSHAPED_KEY = "language_model.model.norm.weight"


@pytest.fixture(scope="module")
def bad_sources(mm_f32, tmp_path_factory) -> dict:
    """{case: (argv before DST, expected parts of the message)} for every error case; the
    pickle's unpickling marker under "pickle_marker"."""
    root = tmp_path_factory.mktemp("cli_errors")
    tensors = read_tensors(os.path.join(mm_f32, "model.safetensors"))
    config = load_json(os.path.join(mm_f32, "config.json"))
    assert tensors[MISSHAPED_KEY].shape == (32,) and MISSING_KEY in tensors and UNKNOWN_KEY not in tensors

    cases = {}
    src = write_checkpoint(root / "missing", {k: v for k, v in tensors.items() if k != MISSING_KEY}, config)
    cases["missing_key"] = (["convert", src], [src, MISSING_KEY, "missing"])
    src = write_checkpoint(root / "unknown", {**tensors, UNKNOWN_KEY: np.zeros((4, 4), np.float32)}, config)
    cases["unknown_key"] = (["convert", src], [os.path.join(src, "model.safetensors"), UNKNOWN_KEY, "unknown"])
    src = write_checkpoint(root / "misshaped", {**tensors, MISSHAPED_KEY: tensors[MISSHAPED_KEY][:-1].copy()}, config)
    cases["misshaped_key"] = (["convert", src], [os.path.join(src, "model.safetensors"), MISSHAPED_KEY, "(31,)"])
    src = str(root / "truncated")
    shutil.copytree(mm_f32, src)
    path = os.path.join(src, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 10)
    cases["truncated"] = (["convert", src], [path, "truncated"])
    src = str(root / "pickle")
    os.makedirs(src)
    shutil.copy(os.path.join(mm_f32, "config.json"), src)
    torch.save(
        {"language_model.lm_head.weight": torch.zeros(2, 2), "bait": _Bait(root / "unpickled")},
        os.path.join(src, "pytorch_model.bin"),
    )
    cases["pickle"] = (["convert", src], [os.path.join(src, "pytorch_model.bin"), "pickle"])
    cases["export_not_converted"] = (["export", mm_f32], [mm_f32, "not a converted checkpoint"])
    cases["no_such_source"] = (["convert", str(root / "no_such_dir")], [str(root / "no_such_dir")])
    cases["export_no_such_source"] = (["export", str(root / "no_such_dir")], [str(root / "no_such_dir")])
    cases["no_such_destination_parent"] = (["convert", mm_f32], [str(root / "no_such_parent")])
    cases["pickle_marker"] = root / "unpickled"
    cases["root"] = root
    return cases


CLI_ERROR_CASES = [
    "missing_key",
    "unknown_key",
    "misshaped_key",
    "truncated",
    "pickle",
    "export_not_converted",
    "no_such_source",
    "export_no_such_source",
    "no_such_destination_parent",
]


@pytest.mark.parametrize("case", CLI_ERROR_CASES)
def test_cli_error_is_one_line(bad_sources, case, capsys):
    """Exit status 2, one `aria-jax: error:` line naming the problem, no traceback, nothing
    written (neither DST nor its .partial)."""
    (command, *source), expected = bad_sources[case]
    root = bad_sources["root"]
    parent = root / "no_such_parent" if case == "no_such_destination_parent" else root
    destination = parent / f"out_{case}"
    result = run_main(capsys, command, "--quiet", *source, str(destination))
    assert_one_line_error(result, *expected)
    assert result.stdout == ""
    assert not os.path.exists(destination)
    assert not os.path.exists(partial_of(destination))
    assert not os.path.exists(bad_sources["pickle_marker"])  # the pickle was never unpickled


def test_concurrent_run_into_the_same_destination_is_refused(mm_f32, tmp_path, capsys):
    """While one run holds the destination, a second one is refused and touches nothing."""
    import fcntl

    destination = tmp_path / "dst"
    partial = partial_of(destination)
    os.makedirs(partial)
    (tmp_path / ".dst.partial" / "in-progress").write_text("another run's work")
    with open(partial + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_main(capsys, "convert", "--quiet", mm_f32, str(destination))
        assert_one_line_error(result, str(destination), "being written by another run")
        assert os.listdir(partial) == ["in-progress"]
        assert not destination.exists()
    result = run_main(capsys, "convert", "--quiet", mm_f32, str(destination))
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(partial) and not os.path.exists(partial + ".lock")


def test_kill_between_the_final_renames_keeps_the_old_checkpoint(mm_f32, mm_f32_converted, tmp_path, capsys):
    """A run killed after moving the old destination aside but before moving the new one in:
    the next run puts the old one back before deciding anything."""
    destination = tmp_path / "dst"
    shutil.copytree(mm_f32_converted, partial_of(destination) + ".replaced")
    result = run_main(capsys, "convert", "--quiet", mm_f32, str(destination))
    assert_one_line_error(result, str(destination), "already exists")
    assert (destination / MANIFEST).is_file()
    assert not os.path.exists(partial_of(destination) + ".replaced")


def test_params_in_memory_export_like_the_converted_checkpoint(mm_f32, mm_f32_exported, tmp_path):
    """`save_hub_weights` (what fine-tuned params are exported with) writes the same tensors, bit
    for bit, as exporting the converted checkpoint (in another order: one piece per layer); with
    a small shard size, the same tensors over several shards."""
    from aria_jax.export import save_hub_weights

    model = aria_jax.AriaForConditionalGeneration.from_pretrained(mm_f32)
    save_hub_weights(model.params, model.config, str(tmp_path))
    expected = read_tensors(os.path.join(mm_f32_exported, "model.safetensors"))
    written = read_tensors(tmp_path / "model.safetensors")
    assert set(written) == set(expected)
    for key in expected:
        assert written[key].dtype == expected[key].dtype and np.array_equal(written[key], expected[key]), key

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_hub_weights(model.params, model.config, str(sharded), max_shard_bytes=20_000)
    index = load_json(sharded / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1
    gathered = {}
    for name in sorted(set(index["weight_map"].values())):
        gathered.update(read_tensors(sharded / name))
    assert set(gathered) == set(expected)
    assert all(np.array_equal(gathered[key], expected[key]) for key in expected)
