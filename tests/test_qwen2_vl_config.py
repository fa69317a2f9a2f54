"""Qwen2-VL's and Awaker's configs: both config.json generations, round trips, clear errors."""

from __future__ import annotations

import json

import pytest

from aria_jax.config import ConfigError
from aria_jax.families import config_from_directory
from aria_jax.qwen2_vl.config import AwakerConfig, AwakerTextConfig, Qwen2VLConfig
from qwen2_vl_models import tiny_qwen2_vl_dir

# Qwen/Qwen2-VL-7B-Instruct's config.json (transformers 4.45's layout), the fields that matter.
HUB_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def test_the_hubs_4_45_layout():
    config = Qwen2VLConfig.from_hf_dict(HUB_7B)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.head_dim, text.num_key_value_heads) == (3584, 128, 4)
    assert (text.mrope_section, text.rope_theta, text.eos_token_id) == ((16, 24, 24), 1e6, (151645,))
    assert (vision.in_channels, vision.head_dim, vision.patch_features, vision.merge_area) == (3, 80, 1176, 4)
    assert config.image_token_id == 151655 and type(config) is Qwen2VLConfig


def test_transformers_5_layout_and_round_trip():
    config = config_from_directory(tiny_qwen2_vl_dir())
    assert isinstance(config, Qwen2VLConfig) and config.text_config.mrope_section == (2, 3, 3)
    assert Qwen2VLConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    assert Qwen2VLConfig.from_hf_dict(Qwen2VLConfig.from_hf_dict(HUB_7B).to_hf_dict()) == Qwen2VLConfig.from_hf_dict(
        HUB_7B
    )


def test_awaker_round_trip():
    base = Qwen2VLConfig.from_hf_dict(HUB_7B)
    d = {**HUB_7B, "awaker": {"lora_rank": 256, "lora_alpha": 512, "moe_lora_experts": 4}}
    config = Qwen2VLConfig.from_hf_dict(d)
    assert isinstance(config, AwakerConfig) and isinstance(config.text_config, AwakerTextConfig)
    assert (config.text_config.lora_scale, config.im_start_token_id, config.im_end_token_id) == (2.0, 151644, 151645)
    assert config.vision_config == base.vision_config
    assert Qwen2VLConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


@pytest.mark.parametrize(
    "change, named",
    [
        ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 23]}}, "mrope_section"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"image_token_id": 152064}, "image_token_id"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_type"),
        ({"vision_config": {**HUB_7B["vision_config"], "hidden_size": 4096}}, "vision_config.hidden_size"),
        ({"awaker": {"lora_rank": 0}}, "awaker.lora_rank"),
        ({"awaker": {"im_end_token_id": -1}}, "awaker.im_end_token_id"),
    ],
)
def test_errors_name_the_field(change, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Qwen2VLConfig.from_hf_dict({**HUB_7B, **change})
