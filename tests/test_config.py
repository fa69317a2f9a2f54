"""Config parsing: both on-disk generations of Aria's config.json, validation, hashing, round trips.

HUB_CONFIG and ORIGINAL_CONFIG are the two generations of the hub repo rhymes-ai/Aria's config.json:
the current transformers-native one and the one of the remote-code revisions before it.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import pytest
import transformers

import aria_jax
from aria_jax import AriaConfig, AriaTextConfig, AriaVisionConfig, ConfigError
from aria_jax.config import config_from_pretrained, text_config_from_pretrained
from aria_jax.families import config_from_directory
from repo_paths import DEMO_MODEL, ROOT

CONFIGS_DIR = os.path.join(ROOT, "configs")

# rhymes-ai/Aria config.json, transformers-native format.
HUB_CONFIG = {
    "architectures": ["AriaForConditionalGeneration"],
    "model_type": "aria",
    "image_token_index": 9,
    "pad_token_id": 2,
    "ignore_index": -100,
    "initializer_range": 0.02,
    "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
    "vision_feature_layer": -1,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "aria_text",
        "hidden_size": 2560,
        "intermediate_size": 1664,
        "moe_intermediate_size": 1664,
        "max_position_embeddings": 65536,
        "moe_num_experts": 64,
        "moe_topk": 6,
        "num_experts_per_tok": 6,
        "num_attention_heads": 20,
        "num_hidden_layers": 28,
        "num_key_value_heads": 20,
        "rope_theta": 5000000,
        "vocab_size": 100352,
    },
    "vision_config": {
        "model_type": "idefics3_vision",
        "attention_heads": 16,
        "image_size": 980,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "_flash_attn_2_enabled": True,
        "architectures": ["AriaVisionModel"],
    },
}

# rhymes-ai/Aria's original remote-code config.json. intermediate_size 13568 is unused; the
# expert width is moe_intermediate_size; rope_theta sits at the top level of text_config.
ORIGINAL_CONFIG = {
    "architectures": ["AriaForConditionalGeneration"],
    "auto_map": {
        "AutoConfig": "configuration_aria.AriaConfig",
        "AutoModelForCausalLM": "modeling_aria.AriaForConditionalGeneration",
    },
    "model_type": "aria",
    "ignore_index": -100,
    "image_token_index": 9,
    "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
    "torch_dtype": "bfloat16",
    "text_config": {
        "architectures": ["AriaForCausalLM"],
        "model_type": "aria_moe_lm",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": 2560,
        "intermediate_size": 13568,
        "max_position_embeddings": 65536,
        "moe_intermediate_size": 1664,
        "moe_num_experts": 64,
        "moe_topk": 6,
        "moe_num_shared_experts": 2,
        "moe_z_loss_coeff": 1e-5,
        "moe_aux_loss_coeff": 1e-3,
        "num_attention_heads": 20,
        "num_hidden_layers": 28,
        "num_key_value_heads": 20,
        "rope_theta": 5000000,
        "vocab_size": 100352,
        "torch_dtype": "bfloat16",
    },
    "vision_config": {
        "_flash_attn_2_enabled": True,
        "_attn_implementation": "flash_attention_2",
        "architectures": ["AriaVisionModel"],
        "model_type": "aria_vision_model",
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}

TINY_TEXT = {
    "model_type": "aria_text",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "moe_num_experts": 4,
    "moe_topk": 2,
    "moe_num_shared_experts": 2,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}


def text_dict(**changes):
    d = copy.deepcopy(HUB_CONFIG["text_config"])
    for key, value in changes.items():
        if value is _DELETE:
            del d[key]
        else:
            d[key] = value
    return d


_DELETE = object()


def assert_full_size_text(text: AriaTextConfig) -> None:
    assert text.hidden_size == 2560
    assert text.intermediate_size == 1664
    assert text.num_hidden_layers == 28
    assert text.num_attention_heads == 20
    assert text.num_key_value_heads == 20
    assert text.head_dim == 128
    assert text.moe_num_experts == 64
    assert text.moe_topk == 6
    assert text.moe_num_shared_experts == 2
    assert text.shared_expert_size == 3328
    assert text.rope_theta == 5e6
    assert isinstance(text.rope_theta, float)
    assert text.rms_norm_eps == 1e-6
    assert text.vocab_size == 100352
    assert text.max_position_embeddings == 65536


# ----------------------------------------------------------------------------- full-size configs


def test_hub_config_full_size_values():
    config = AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG))
    assert_full_size_text(config.text_config)
    vision = config.vision_config
    assert vision.hidden_size == 1152
    assert vision.num_hidden_layers == 27
    assert vision.num_attention_heads == 16
    assert vision.head_dim == 72
    assert vision.intermediate_size == 4304
    assert vision.patch_size == 14
    assert vision.image_size == 980
    assert vision.num_patches_per_side == 70
    assert config.projector_patch_to_query == ((1225, 128), (4900, 256))
    assert config.max_queries == 256
    assert config.image_token_index == 9
    assert config.pad_token_id == 2


def test_vision_attention_heads_key_is_ignored():
    d = copy.deepcopy(HUB_CONFIG)
    d["vision_config"]["attention_heads"] = 7  # would not even divide 1152 if it were read
    config = AriaConfig.from_hf_dict(d)
    assert config.vision_config.num_attention_heads == 16


def test_original_remote_code_config_gives_the_same_text_config():
    original = AriaConfig.from_hf_dict(copy.deepcopy(ORIGINAL_CONFIG))
    native = AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG))
    assert_full_size_text(original.text_config)
    assert original.text_config.intermediate_size == 1664  # not 13568
    assert original.text_config == native.text_config
    assert original.vision_config == native.vision_config
    assert original.projector_patch_to_query == native.projector_patch_to_query
    assert original.image_token_index == 9


def test_original_format_requires_moe_intermediate_size():
    d = copy.deepcopy(ORIGINAL_CONFIG["text_config"])
    del d["moe_intermediate_size"]
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        AriaTextConfig.from_hf_dict(d)


def test_unknown_text_model_type_rejected():
    with pytest.raises(ConfigError, match="model_type.*llama"):
        AriaTextConfig.from_hf_dict(text_dict(model_type="llama"))


# ----------------------------------------------------------------------------- rope


def test_rope_theta_from_rope_parameters():
    d = text_dict(rope_theta=_DELETE, rope_parameters={"rope_theta": 123456.0, "rope_type": "default"})
    assert AriaTextConfig.from_hf_dict(d).rope_theta == 123456.0


def test_rope_theta_from_top_level():
    assert AriaTextConfig.from_hf_dict(text_dict(rope_theta=250000)).rope_theta == 250000.0


def test_rope_theta_default_when_absent():
    # transformers' AriaTextConfig default rope_theta is 10000
    assert AriaTextConfig.from_hf_dict(text_dict(rope_theta=_DELETE)).rope_theta == 10000.0


@pytest.mark.parametrize(
    "field,value",
    [
        (
            "rope_parameters",
            {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e6, "original_max_position_embeddings": 8192},
        ),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ],
)
def test_unknown_rope_type_rejected(field, value):
    rope_type = value.get("rope_type", value.get("type"))
    with pytest.raises(ConfigError) as err:
        AriaTextConfig.from_hf_dict(text_dict(**{field: value}))
    message = str(err.value)
    assert "rope_type" in message
    assert rope_type in message


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes,field,value",
    [
        ({"num_attention_heads": 24, "num_key_value_heads": 24}, "num_attention_heads", "24"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "3"),
        ({"moe_topk": 65}, "moe_topk", "65"),
        ({"hidden_size": 0}, "hidden_size", "0"),
        ({"hidden_size": -2560}, "hidden_size", "-2560"),
        ({"vocab_size": -1}, "vocab_size", "-1"),
        ({"intermediate_size": 0}, "intermediate_size", "0"),
        ({"num_hidden_layers": 0}, "num_hidden_layers", "0"),
        ({"num_attention_heads": 0}, "num_attention_heads", "0"),
        ({"moe_num_experts": 0}, "moe_num_experts", "0"),
        ({"moe_topk": 0}, "moe_topk", "0"),
        ({"moe_num_shared_experts": -1}, "moe_num_shared_experts", "-1"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps", "0.0"),
        ({"rope_theta": -5.0}, "rope_theta", "-5"),
        ({"hidden_size": 2560.5}, "hidden_size", "2560.5"),
        ({"attention_bias": True}, "attention_bias", "True"),
        ({"mlp_bias": True}, "mlp_bias", "True"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings", "True"),
        ({"hidden_act": "relu6"}, "hidden_act", "relu6"),
    ],
)
def test_invalid_text_values_name_field_and_value(changes, field, value):
    with pytest.raises(ConfigError) as err:
        AriaTextConfig.from_hf_dict(text_dict(**changes))
    message = str(err.value)
    assert field in message
    assert value in message


@pytest.mark.parametrize(
    "field",
    [
        "moe_topk",
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "num_attention_heads",
        "moe_num_experts",
        "intermediate_size",
    ],
)
def test_missing_required_field_is_named(field):
    with pytest.raises(ConfigError, match=field):
        AriaTextConfig.from_hf_dict(text_dict(**{field: _DELETE}))


def test_missing_text_config_in_multimodal_config():
    d = copy.deepcopy(HUB_CONFIG)
    del d["text_config"]
    with pytest.raises(ConfigError, match="text_config"):
        AriaConfig.from_hf_dict(d)


def test_invalid_values_through_the_multimodal_config():
    d = copy.deepcopy(HUB_CONFIG)
    d["text_config"]["num_key_value_heads"] = 7
    with pytest.raises(ConfigError, match="num_key_value_heads.*7"):
        AriaConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "changes,field,value",
    [
        ({"hidden_size": 1000}, "num_attention_heads", "16"),  # 16 does not divide 1000
        ({"patch_size": 0}, "patch_size", "0"),
        ({"patch_size": 981}, "patch_size", "981"),  # larger than image_size: no patch at all
        ({"model_type": "clip_vision_model"}, "model_type", "clip_vision_model"),
    ],
)
def test_invalid_vision_values(changes, field, value):
    d = copy.deepcopy(HUB_CONFIG)
    d["vision_config"].update(changes)
    with pytest.raises(ConfigError) as err:
        AriaConfig.from_hf_dict(d)
    assert field in str(err.value) and value in str(err.value)


@pytest.mark.parametrize(
    "changes,field,value",
    [
        ({"projector_patch_to_query_dict": {"1000": 128}}, "projector_patch_to_query_dict", "1000"),  # no square
        ({"projector_patch_to_query_dict": {"6400": 128}}, "projector_patch_to_query_dict", "6400"),  # > 70 x 70
        ({"projector_patch_to_query_dict": {"0": 128, "1225": 8}}, "projector_patch_to_query_dict", "0"),
        ({"projector_patch_to_query_dict": {"1225": 0}}, "projector_patch_to_query_dict", "0"),
        ({"projector_patch_to_query_dict": {}}, "projector_patch_to_query_dict", "{}"),
        ({"image_token_index": 100352}, "image_token_index", "100352"),
    ],
)
def test_invalid_top_level_values(changes, field, value):
    d = copy.deepcopy(HUB_CONFIG)
    d.update(changes)
    with pytest.raises(ConfigError) as err:
        AriaConfig.from_hf_dict(d)
    assert field in str(err.value) and value in str(err.value)


def test_configs_transformers_loads_are_accepted():
    """transformers' own Aria tester config: image_size 358 with patch 10 (a floored 35 x 35
    grid), a key of 4900 patches that no crop of that grid has, and a query table of
    max(values) rows, more than the largest query count a crop uses."""
    d = copy.deepcopy(HUB_CONFIG)
    d["vision_config"].update(image_size=358, patch_size=10)
    d["projector_patch_to_query_dict"] = {"1225": 64, "4900": 256, "1000": 512}
    config = AriaConfig.from_hf_dict(d)
    assert config.vision_config.num_patches_per_side == 35
    assert config.projector_patch_to_query == ((1000, 512), (1225, 64), (4900, 256))
    assert config.used_patch_to_query == ((1225, 64),)
    assert config.crop_size_to_queries == {350: 64}
    assert config.max_queries == transformers.AriaConfig(**d).max_value_projector_patch_to_query_dict == 512


def test_crop_sizes_and_query_counts_come_from_the_config():
    """The processor's crop size -> image tokens table is the model config's, for the hub config
    and for a model directory whose processor files state it too."""
    assert AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG)).crop_size_to_queries == {490: 128, 980: 256}
    assert (
        aria_jax.AriaProcessor.from_pretrained(DEMO_MODEL).size_to_queries
        == config_from_pretrained(DEMO_MODEL).crop_size_to_queries
    )


def test_config_error_is_a_value_error_exported_at_top_level():
    assert aria_jax.ConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------- hashing


def test_configs_are_hashable_and_equal_configs_hash_equally():
    a = AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG))
    b = AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG))
    assert a is not b
    assert a == b and hash(a) == hash(b)
    assert a.text_config == b.text_config and hash(a.text_config) == hash(b.text_config)
    assert hash(a.vision_config) == hash(b.vision_config)
    c = AriaConfig.from_hf_dict({**copy.deepcopy(HUB_CONFIG), "text_config": text_dict(moe_topk=4)})
    assert c != a
    assert len({a, b, c}) == 2
    # eos given as an int or a list: the same config
    t1 = AriaTextConfig.from_hf_dict(text_dict(eos_token_id=2))
    t2 = AriaTextConfig.from_hf_dict(text_dict(eos_token_id=[2]))
    assert t1 == t2 and hash(t1) == hash(t2)


def test_configs_are_usable_as_jit_static_args():
    traces = []

    def f(x, config):
        traces.append(config)
        return x * config.text_config.moe_topk

    jitted = jax.jit(f, static_argnums=1)
    a = AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG))
    b = AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG))
    assert float(jitted(jnp.float32(2.0), a)) == 12.0
    assert float(jitted(jnp.float32(3.0), b)) == 18.0
    assert len(traces) == 1  # the equal config hit the cache


@pytest.mark.parametrize(
    "make",
    [
        lambda: AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG)),
        lambda: AriaTextConfig.from_hf_dict(text_dict()),
        lambda: AriaVisionConfig(),
    ],
)
def test_configs_are_frozen(make):
    config = make()
    name = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, 1)


# ----------------------------------------------------------------------------- configs/ directory


def test_every_json_in_configs_dir_parses():
    files = sorted(glob.glob(os.path.join(CONFIGS_DIR, "*.json")))
    assert files, f"no *.json configs in {CONFIGS_DIR}"
    for file in files:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
        config = config_from_directory(file)
        text = getattr(config, "text_config", config)
        assert text.vocab_size > 0 and text.num_hidden_layers > 0, file
        if d.get("model_type") == "qwen2_vl":  # Qwen2-VL and Awaker: tests/test_qwen2_vl_config.py
            continue
        assert text_config_from_pretrained(file) == text, file
        if os.path.basename(file) == "aria.json":
            assert "text_config" in d, "configs/aria.json should be the full multimodal config"
            assert_full_size_text(text)
            assert config.vision_config == AriaConfig.from_hf_dict(copy.deepcopy(HUB_CONFIG)).vision_config


# ----------------------------------------------------------------------------- round trips

ROUND_TRIP_CASES = [
    pytest.param(text_dict(), id="full-size"),
    pytest.param(copy.deepcopy(ORIGINAL_CONFIG["text_config"]), id="original-format"),
    pytest.param(copy.deepcopy(TINY_TEXT), id="tiny-gqa"),
    pytest.param(
        {
            **copy.deepcopy(TINY_TEXT),
            "head_dim": 16,
            "eos_token_id": [2, 7],
            "bos_token_id": None,
            "rms_norm_eps": 1e-5,
            "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": 64,
            "moe_num_shared_experts": 1,
            "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
        },
        id="tiny-nondefault",
    ),
]


@pytest.mark.parametrize("d", ROUND_TRIP_CASES)
def test_text_config_round_trip(d):
    config = AriaTextConfig.from_hf_dict(d)
    out = config.to_hf_dict()
    assert json.loads(json.dumps(out)) == out  # plain JSON
    assert out["model_type"] == "aria_text"
    again = AriaTextConfig.from_hf_dict(out)
    assert again == config
    assert hash(again) == hash(config)


@pytest.mark.parametrize("d", ROUND_TRIP_CASES)
def test_transformers_accepts_to_hf_dict(d):
    import transformers

    config = AriaTextConfig.from_hf_dict(d)
    theirs = transformers.AriaTextConfig(**config.to_hf_dict())
    assert theirs.vocab_size == config.vocab_size
    assert theirs.hidden_size == config.hidden_size
    assert theirs.intermediate_size == config.intermediate_size
    assert theirs.num_hidden_layers == config.num_hidden_layers
    assert theirs.num_attention_heads == config.num_attention_heads
    assert theirs.num_key_value_heads == config.num_key_value_heads
    assert theirs.head_dim == config.head_dim
    assert theirs.moe_num_experts == config.moe_num_experts
    assert theirs.moe_topk == config.moe_topk
    assert theirs.moe_num_shared_experts == config.moe_num_shared_experts
    assert theirs.rope_parameters["rope_theta"] == config.rope_theta
    assert theirs.rms_norm_eps == config.rms_norm_eps
    # ...and what transformers writes back reads as the same config
    assert AriaTextConfig.from_hf_dict(theirs.to_dict()) == config


def test_multimodal_round_trip():
    config = AriaConfig.from_hf_dict(copy.deepcopy(ORIGINAL_CONFIG))
    out = config.to_hf_dict()
    assert json.loads(json.dumps(out)) == out
    assert AriaConfig.from_hf_dict(out) == config


# ----------------------------------------------------------------------------- from a directory


def test_text_config_from_pretrained_text_only_model(tmp_path):
    import torch
    from tiny_models import make_text_model

    expected = {
        **TINY_TEXT,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_theta": 20000.0, "rope_type": "default"},
    }
    make_text_model(tmp_path, dtype=torch.float32, **{k: v for k, v in expected.items() if k != "model_type"})
    config = text_config_from_pretrained(tmp_path)
    assert config == AriaTextConfig.from_hf_dict(expected)
    assert config.max_position_embeddings == 512
    assert config.rope_theta == 20000.0
    assert config.num_key_value_heads == 2 and config.intermediate_size == 8
    assert text_config_from_pretrained(str(tmp_path)) == config
    assert text_config_from_pretrained(tmp_path / "config.json") == config


@pytest.mark.parametrize("d", [HUB_CONFIG, ORIGINAL_CONFIG], ids=["hub", "original"])
def test_text_config_from_pretrained_multimodal(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    config = text_config_from_pretrained(tmp_path)
    assert_full_size_text(config)
    assert config == AriaConfig.from_hf_dict(copy.deepcopy(d)).text_config


def test_text_config_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        text_config_from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        text_config_from_pretrained(tmp_path)
