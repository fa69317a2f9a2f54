"""The hub checkpoint loader: key generations, sharding, bf16, lazy reads, and precise errors.

The source of truth is a tiny random transformers `AriaTextForCausalLM` saved with
`save_pretrained` (tiny_models.make_text_model: the real hub key names). Other key generations
are produced by renaming its tensors, so every load must give bit-identical params.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import aria_jax
from aria_jax import AriaTextForCausalLM, CheckpointError
from aria_jax.pretrained import param_shapes
from aria_jax.safetensors_io import SafetensorsFile
from aria_jax.weights import HubCheckpoint, load_params
from tiny_models import make_text_model

# Non-square everywhere (hidden 32, expert width 8 -> gate_up 16, shared width 16, GQA 4/2 heads
# of 8, vocab 128) so that a missing or extra transpose cannot go unnoticed.
TINY = dict(
    hidden_size=32,
    intermediate_size=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_num_experts=4,
    moe_topk=2,
    vocab_size=128,
    num_hidden_layers=2,
)
NUM_LAYERS = TINY["num_hidden_layers"]
PROMPT = np.array([[1, 5, 9, 33, 64, 100, 127, 2]], np.int32)


# ----------------------------------------------------------------------------- helpers


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, copied out of the memory map (any dtype, bf16 too)."""
    f = SafetensorsFile(str(path))
    return {key: np.array(f.get(key)) for key in f.keys()}


def write_checkpoint(directory, tensors: dict[str, np.ndarray], config: dict, shards: int = 1):
    """A hub-format directory: config.json plus one safetensors file or `shards` files + index."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        safetensors.numpy.save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return directory


def copy_with(src, dst, drop=(), add=None, replace=None):
    """A copy of the single-file checkpoint `src` with tensors dropped, added or replaced."""
    tensors = read_tensors(os.path.join(src, "model.safetensors"))
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    tensors.update(replace or {})
    return write_checkpoint(dst, tensors, load_json(os.path.join(src, "config.json")))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def flat_params(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_params_identical(actual, expected):
    a, e = flat_params(actual), flat_params(expected)
    assert sorted(a) == sorted(e)
    for key in e:
        assert a[key].dtype == e[key].dtype, key
        assert a[key].shape == e[key].shape, key
        assert np.array_equal(a[key], e[key]), key


def expected_params(tensors: dict[str, np.ndarray], prefix: str = "model.") -> dict:
    """Our params tree, built by hand from text-only hub tensors (torch Linear weights are
    (out, in); our kernels are (in..., out...); experts are already (E, in, out))."""
    d, n, k = TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_key_value_heads"]
    h = d // n

    def layer(name):
        return [tensors[f"{prefix}layers.{i}.{name}"] for i in range(NUM_LAYERS)]

    def stack(name, fn=lambda w: w):
        return np.stack([fn(w) for w in layer(name)])

    return {
        "embed_tokens": tensors[f"{prefix}embed_tokens.weight"],
        "norm": {"scale": tensors[f"{prefix}norm.weight"]},
        "lm_head": tensors["lm_head.weight"].T,
        "layers": {
            "input_layernorm": {"scale": stack("input_layernorm.weight")},
            "post_attention_layernorm": {"scale": stack("post_attention_layernorm.weight")},
            "self_attn": {
                "q_proj": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h)),
                "k_proj": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h)),
                "v_proj": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h)),
                "o_proj": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d)),
            },
            "mlp": {
                "router": stack("mlp.router.weight", lambda w: w.T),
                "experts_gate_up": stack("mlp.experts.fc1.weight"),
                "experts_down": stack("mlp.experts.fc2.weight"),
                "shared_gate": stack("mlp.shared_experts.gate_proj.weight", lambda w: w.T),
                "shared_up": stack("mlp.shared_experts.up_proj.weight", lambda w: w.T),
                "shared_down": stack("mlp.shared_experts.down_proj.weight", lambda w: w.T),
            },
        },
    }


def original_format_config(text_config: dict) -> dict:
    """The remote-code multimodal config.json: aria_moe_lm with the real expert width in
    moe_intermediate_size and an unused intermediate_size."""
    text = {
        k: v
        for k, v in text_config.items()
        if k not in ("architectures", "rope_parameters", "transformers_version", "dtype")
    }
    text.update(
        model_type="aria_moe_lm",
        moe_intermediate_size=text_config["intermediate_size"],
        intermediate_size=999,
        rope_theta=text_config["rope_parameters"]["rope_theta"],
        architectures=["AriaForCausalLM"],
    )
    return {
        "architectures": ["AriaForConditionalGeneration"],
        "model_type": "aria",
        "image_token_index": 9,
        "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
        "text_config": text,
        "vision_config": {
            "model_type": "aria_vision_model",
            "hidden_size": 1152,
            "image_size": 980,
            "intermediate_size": 4304,
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
        },
    }


def transformers_multimodal_config(text_config: dict) -> dict:
    return {
        "architectures": ["AriaForConditionalGeneration"],
        "model_type": "aria",
        "image_token_index": 9,
        "pad_token_id": 2,
        "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
        "text_config": {k: v for k, v in text_config.items() if k != "architectures"},
        "vision_config": {
            "model_type": "idefics3_vision",
            "image_size": 980,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "patch_size": 14,
        },
    }


def error_message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"multi-line error message: {message!r}"
    return message


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, torch model) of a float32 text-only checkpoint."""
    directory = tmp_path_factory.mktemp("tiny_f32")
    model = make_text_model(directory, seed=3, dtype=torch.float32, **TINY)
    return directory, model


@pytest.fixture(scope="module")
def tiny_dir(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def tiny_tensors(tiny_dir):
    return read_tensors(os.path.join(tiny_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return AriaTextForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_bf16")
    model = make_text_model(directory, seed=4, dtype=torch.bfloat16, **TINY)
    return directory, model


@pytest.fixture
def bad(tmp_path):
    return tmp_path / "bad"


# ----------------------------------------------------------------------------- the baseline


def test_text_only_checkpoint_layout(tiny_model, tiny_tensors, tiny):
    """The loader puts every hub tensor where the hand-written layout says (float32, exact)."""
    _, torch_model = tiny
    assert_params_identical(tiny_model.params, expected_params(tiny_tensors))
    # ...and the saved file is the torch model's weights (so the expectation is not circular)
    state = torch_model.state_dict()
    np.testing.assert_array_equal(
        tiny_tensors["model.layers.1.mlp.experts.fc1.weight"], state["model.layers.1.mlp.experts.gate_up_proj"].numpy()
    )
    np.testing.assert_array_equal(
        tiny_tensors["model.layers.0.self_attn.k_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"].numpy()
    )


# ----------------------------------------------------------------------------- key generations


def test_original_rhymes_naming_and_config(tiny_dir, tiny_tensors, tiny_model, tmp_path):
    tensors = {"language_model." + key: value for key, value in tiny_tensors.items()}
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    for i in range(NUM_LAYERS):
        inv_freq = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
        tensors[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    # components the text loader must leave alone
    tensors["vision_tower.vision_model.embeddings.patch_embedding.bias"] = np.zeros(3, np.float32)
    tensors["multi_modal_projector.ffn.linear_in.weight"] = np.zeros((2, 3), np.float32)
    assert "language_model.model.layers.0.mlp.experts.fc1.weight" in tensors
    assert "language_model.lm_head.weight" in tensors

    config = original_format_config(load_json(os.path.join(tiny_dir, "config.json")))
    directory = write_checkpoint(tmp_path / "original", tensors, config)
    model = AriaTextForCausalLM.from_pretrained(directory)
    assert model.config == tiny_model.config
    assert model.config.intermediate_size == TINY["intermediate_size"]
    assert_params_identical(model.params, tiny_model.params)


def test_transformers_in_memory_naming(tiny_dir, tiny_tensors, tiny_model, tmp_path):
    tensors = {}
    for key, value in tiny_tensors.items():
        key = key.replace("mlp.experts.fc1.weight", "mlp.experts.gate_up_proj")
        key = key.replace("mlp.experts.fc2.weight", "mlp.experts.down_proj")
        if key.startswith("model."):
            key = "model.language_model." + key[len("model.") :]
        tensors[key] = value
    tensors["model.vision_tower.post_layernorm.weight"] = np.zeros(5, np.float32)
    tensors["model.multi_modal_projector.query"] = np.zeros((2, 5), np.float32)
    assert "model.language_model.layers.1.mlp.experts.down_proj" in tensors
    assert "lm_head.weight" in tensors
    assert not any(".fc1." in k or ".fc2." in k for k in tensors)

    config = transformers_multimodal_config(load_json(os.path.join(tiny_dir, "config.json")))
    directory = write_checkpoint(tmp_path / "in_memory", tensors, config)
    model = AriaTextForCausalLM.from_pretrained(directory)
    assert model.config == tiny_model.config
    assert_params_identical(model.params, tiny_model.params)


def test_text_only_state_dict_saved_raw(tiny, tiny_model, tmp_path):
    """transformers' own in-memory names of the text-only model (experts.gate_up_proj, no .weight)."""
    directory, torch_model = tiny
    tensors = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    out = write_checkpoint(tmp_path / "raw", tensors, load_json(os.path.join(directory, "config.json")))
    assert_params_identical(AriaTextForCausalLM.from_pretrained(out).params, tiny_model.params)


# ----------------------------------------------------------------------------- sharding


def test_sharded_checkpoint(tiny_dir, tiny_tensors, tiny_model, tmp_path):
    directory = write_checkpoint(
        tmp_path / "sharded", tiny_tensors, load_json(os.path.join(tiny_dir, "config.json")), shards=3
    )
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # stacked params really come from several files
    index = load_json(os.path.join(directory, "model.safetensors.index.json"))["weight_map"]
    assert (
        len(
            {index[f"model.layers.{i}.input_layernorm.weight"] for i in range(NUM_LAYERS)}
            | {index["lm_head.weight"], index["model.embed_tokens.weight"]}
        )
        > 1
    )
    assert_params_identical(AriaTextForCausalLM.from_pretrained(directory).params, tiny_model.params)


def test_index_lists_a_missing_shard(tiny_dir, tiny_tensors, tmp_path):
    directory = write_checkpoint(
        tmp_path / "sharded", tiny_tensors, load_json(os.path.join(tiny_dir, "config.json")), shards=3
    )
    os.remove(os.path.join(directory, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(directory)
    assert "model-00002-of-00003.safetensors" in error_message(err)


def test_same_key_in_two_shards(tiny_dir, tiny_tensors, tmp_path):
    directory = write_checkpoint(
        tmp_path / "sharded", tiny_tensors, load_json(os.path.join(tiny_dir, "config.json")), shards=3
    )
    index = load_json(os.path.join(directory, "model.safetensors.index.json"))["weight_map"]
    key = "model.layers.1.mlp.router.weight"
    other = next(n for n in sorted(set(index.values())) if n != index[key])
    path = os.path.join(directory, other)
    part = read_tensors(path)
    part[key] = tiny_tensors[key]
    safetensors.numpy.save_file(part, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(directory)
    message = error_message(err)
    assert key in message
    assert "duplicate" in message
    assert os.path.join(directory, index[key]) in message or path in message


def test_several_files_without_index_rejected(tiny_dir, tiny_tensors, tmp_path):
    directory = write_checkpoint(
        tmp_path / "sharded", tiny_tensors, load_json(os.path.join(tiny_dir, "config.json")), shards=2
    )
    os.remove(os.path.join(directory, "model.safetensors.index.json"))
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(directory)
    assert "model.safetensors.index.json" in error_message(err)


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_checkpoint(tiny_bf16, dtype):
    directory, torch_model = tiny_bf16
    model = AriaTextForCausalLM.from_pretrained(directory, dtype=dtype)
    state = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
    assert all(v.dtype == torch.bfloat16 for v in torch_model.state_dict().values())
    params = flat_params(model.params)
    assert {leaf.dtype for leaf in params.values()} == {np.dtype(dtype)}
    got = {k: v.astype(np.float32) for k, v in params.items()}  # bf16 -> f32 is exact

    d, n, h = TINY["hidden_size"], TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    np.testing.assert_array_equal(got["['embed_tokens']"], state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["['lm_head']"], state["lm_head.weight"].T)
    np.testing.assert_array_equal(
        got["['layers']['mlp']['experts_gate_up']"],
        np.stack([state[f"model.layers.{i}.mlp.experts.gate_up_proj"] for i in range(NUM_LAYERS)]),
    )
    np.testing.assert_array_equal(
        got["['layers']['self_attn']['q_proj']"],
        np.stack([state[f"model.layers.{i}.self_attn.q_proj.weight"].T.reshape(d, n, h) for i in range(NUM_LAYERS)]),
    )
    # every leaf, by the hand-written layout (from the torch state_dict, saved-file names)
    hub_names = {
        k.replace("mlp.experts.gate_up_proj", "mlp.experts.fc1.weight").replace(
            "mlp.experts.down_proj", "mlp.experts.fc2.weight"
        ): v
        for k, v in state.items()
    }
    assert len(hub_names) == len(state)
    expected = flat_params(expected_params(hub_names))
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # bf16 params are bit-identical to the file (no round trip through another dtype)
    if dtype == "bfloat16":
        raw = read_tensors(os.path.join(directory, "model.safetensors"))
        assert raw["model.norm.weight"].dtype == np.dtype(jax.numpy.bfloat16)
        assert np.array_equal(params["['norm']['scale']"].view(np.uint16), raw["model.norm.weight"].view(np.uint16))


# ----------------------------------------------------------------------------- errors


def test_missing_key(tiny_dir, bad):
    key = "model.layers.1.mlp.router.weight"
    copy_with(tiny_dir, bad, drop=[key])
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    message = error_message(err)
    assert key in message and "missing" in message
    assert str(bad) in message


def test_extra_unknown_key(tiny_dir, bad):
    key = "model.layers.0.mlp.bogus.weight"
    copy_with(tiny_dir, bad, add={key: np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    message = error_message(err)
    assert key in message and "unknown" in message
    assert os.path.join(bad, "model.safetensors") in message


@pytest.mark.parametrize(
    "key,make",
    [
        ("model.layers.0.mlp.router.weight", lambda w: np.ascontiguousarray(w.T)),  # transposed
        ("model.layers.1.self_attn.k_proj.weight", lambda w: np.ascontiguousarray(w.T)),  # (32,16) vs (16,32)
        ("model.layers.1.mlp.experts.fc2.weight", lambda w: np.ascontiguousarray(w.transpose(0, 2, 1))),
        ("model.embed_tokens.weight", lambda w: np.concatenate([w, w[:1]])),  # resized
        ("model.norm.weight", lambda w: w[:-1].copy()),
    ],
)
def test_wrong_shape(tiny_dir, tiny_tensors, bad, key, make):
    replacement = make(tiny_tensors[key])
    assert replacement.shape != tiny_tensors[key].shape
    copy_with(tiny_dir, bad, replace={key: replacement})
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    message = error_message(err)
    assert key in message
    assert str(tuple(replacement.shape)) in message
    assert os.path.join(bad, "model.safetensors") in message


def test_truncated_file(tiny_dir, bad):
    shutil.copytree(tiny_dir, bad)
    path = os.path.join(bad, "model.safetensors")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    data_size = size - 10 - 8 - header_len
    cut = {key for key, info in header.items() if info["data_offsets"][1] > data_size}
    assert cut
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    message = error_message(err)
    assert path in message
    assert "truncated" in message
    assert any(key in message for key in cut), message


def test_truncated_inside_header(tiny_dir, bad):
    shutil.copytree(tiny_dir, bad)
    path = os.path.join(bad, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    assert path in error_message(err)


def test_gate_up_under_both_names(tiny_dir, tiny_tensors, bad):
    fc1 = "model.layers.0.mlp.experts.fc1.weight"
    alias = "model.layers.0.mlp.experts.gate_up_proj"
    copy_with(tiny_dir, bad, add={alias: tiny_tensors[fc1].copy()})
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    message = error_message(err)
    assert "duplicate" in message
    assert fc1 in message and alias in message
    assert os.path.join(bad, "model.safetensors") in message


@pytest.mark.parametrize(
    "layers,expected",
    [
        (1, ("unknown", "model.layers.1.")),  # the checkpoint has a layer the config does not
        (3, ("missing", "model.layers.2.")),  # the config has a layer the checkpoint does not
    ],
)
def test_layer_count_mismatch(tiny_dir, bad, layers, expected):
    shutil.copytree(tiny_dir, bad)
    config = load_json(os.path.join(bad, "config.json"))
    config["num_hidden_layers"] = layers
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(bad)
    message = error_message(err)
    assert all(part in message for part in expected), message
    assert str(bad) in message


def test_checkpoint_error_is_exported():
    assert aria_jax.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError)


# ----------------------------------------------------------------------------- pickle checkpoints


class _Bait:
    """Unpickling this calls open(marker, "w"): the marker file appears iff it was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_checkpoint(directory, marker, tiny_dir):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(tiny_dir, "config.json"), os.path.join(directory, "config.json"))
    path = os.path.join(directory, "pytorch_model.bin")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "bait": _Bait(marker)}, path)
    return path


def test_pickle_bait_works(tiny_dir, tmp_path):
    """Control: the bait does create its marker when unpickled."""
    marker = tmp_path / "control_marker"
    path = _pickle_checkpoint(tmp_path / "control", marker, tiny_dir)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickle_checkpoint_directory_refused(tiny_dir, tmp_path):
    marker = tmp_path / "marker"
    path = _pickle_checkpoint(tmp_path / "bin", marker, tiny_dir)
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(tmp_path / "bin")
    message = error_message(err)
    assert "pickle" in message and "pytorch_model.bin" in message
    assert path in message
    assert not marker.exists()


def test_pickle_file_path_refused_by_loader(tiny_dir, tmp_path):
    marker = tmp_path / "marker"
    path = _pickle_checkpoint(tmp_path / "bin", marker, tiny_dir)
    config = aria_jax.config.text_config_from_pretrained(tmp_path / "bin")
    with pytest.raises(CheckpointError) as err:
        load_params(
            path, {"language_model": param_shapes(config, np.float32)}, np.float32, components=("language_model",)
        )
    message = error_message(err)
    assert "pickle" in message and "pytorch_model.bin" in message
    with pytest.raises(CheckpointError):
        HubCheckpoint(path)
    assert not marker.exists()


def test_pickle_file_path_refused_by_from_pretrained(tiny_dir, tmp_path):
    marker = tmp_path / "marker"
    path = _pickle_checkpoint(tmp_path / "bin", marker, tiny_dir)
    with pytest.raises(CheckpointError) as err:
        AriaTextForCausalLM.from_pretrained(path)
    message = error_message(err)
    assert "pickle" in message and "pytorch_model.bin" in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- robustness


def test_model_usable_after_rejected_loads(tiny_dir, tiny_model, tmp_path):
    before = np.asarray(tiny_model(PROMPT).logits)
    assert np.isfinite(before).all() and before.shape == (1, PROMPT.shape[1], TINY["vocab_size"])
    params_before = jax.tree_util.tree_map(np.array, tiny_model.params)

    copy_with(tiny_dir, tmp_path / "missing", drop=["model.layers.1.mlp.router.weight"])
    with pytest.raises(CheckpointError):
        AriaTextForCausalLM.from_pretrained(tmp_path / "missing")
    _pickle_checkpoint(tmp_path / "bin", tmp_path / "marker", tiny_dir)
    with pytest.raises(CheckpointError):
        AriaTextForCausalLM.from_pretrained(tmp_path / "bin")

    after = np.asarray(tiny_model(PROMPT).logits)
    np.testing.assert_array_equal(after, before)
    assert_params_identical(tiny_model.params, params_before)
    # and a fresh good load still works and agrees
    again = AriaTextForCausalLM.from_pretrained(tiny_dir)
    np.testing.assert_array_equal(np.asarray(again(PROMPT).logits), before)


# ----------------------------------------------------------------------------- lazy reading


def _bases(array):
    while array is not None:
        yield array
        array = array.base


def test_safetensors_get_is_a_memmap_view(tiny_dir, tiny_bf16):
    path = os.path.join(tiny_dir, "model.safetensors")
    f = SafetensorsFile(path)
    reference = safetensors.numpy.load_file(path)
    assert sorted(f.keys()) == sorted(reference)
    for key in ("model.layers.1.mlp.experts.fc1.weight", "lm_head.weight", "model.norm.weight"):
        array = f.get(key)
        assert any(isinstance(a, np.memmap) for a in _bases(array)), key
        assert not array.flags.writeable
        assert not array.flags.owndata
        assert array.shape == f.shape(key) == reference[key].shape
        assert array.dtype == f.dtype(key) == reference[key].dtype
        np.testing.assert_array_equal(array, reference[key])
    # bf16 files are viewed in place too (safetensors' numpy backend cannot read them at all)
    bf16_dir, torch_model = tiny_bf16
    f16 = SafetensorsFile(os.path.join(bf16_dir, "model.safetensors"))
    array = f16.get("model.embed_tokens.weight")
    assert any(isinstance(a, np.memmap) for a in _bases(array))
    assert array.dtype == np.dtype(jax.numpy.bfloat16)
    np.testing.assert_array_equal(
        array.astype(np.float32), torch_model.state_dict()["model.embed_tokens.weight"].float().numpy()
    )
