"""The model families a checkpoint can hold (Aria, Aria's text model alone, Qwen2-VL), told apart
by its config.json, and what loading, conversion and export need of each."""

from __future__ import annotations

import os

import jax.numpy as jnp

from aria_jax.config import AriaConfig, AriaTextConfig, is_multimodal, read_config_json
from aria_jax.weights import ARIA_KEYS, COMPONENTS, KeyTable


def is_qwen2_vl_config(d: dict) -> bool:
    from aria_jax.qwen2_vl.config import is_qwen2_vl

    return is_qwen2_vl(d)


def config_from_directory(directory: str | os.PathLike):
    """The config of the checkpoint at `directory`: an AriaConfig, AriaTextConfig or Qwen2VLConfig."""
    d = read_config_json(directory)
    if is_qwen2_vl_config(d):
        from aria_jax.qwen2_vl.config import Qwen2VLConfig

        return Qwen2VLConfig.from_hf_dict(d)
    return AriaConfig.from_hf_dict(d) if is_multimodal(d) else AriaTextConfig.from_hf_dict(d)


def key_table_for(config) -> KeyTable:
    """The hub key table of the config's family."""
    if isinstance(config, (AriaConfig, AriaTextConfig)):
        return ARIA_KEYS
    from aria_jax.qwen2_vl.config import AwakerConfig
    from aria_jax.qwen2_vl.weights import awaker_key_table, key_table

    text = config.text_config
    if isinstance(config, AwakerConfig):
        return awaker_key_table(text.tie_word_embeddings, text.moe_lora_experts)
    return key_table(text.tie_word_embeddings)


def param_layout(config, dtype=jnp.float32) -> tuple[tuple[str, ...], dict]:
    """(components, {component: boxed param shapes}) of the config's model."""
    from aria_jax.modeling import multimodal_param_shapes, text_param_shapes

    if isinstance(config, AriaConfig):
        return COMPONENTS, multimodal_param_shapes(config, dtype)
    if isinstance(config, AriaTextConfig):
        return ("language_model",), {"language_model": text_param_shapes(config, dtype)}
    from aria_jax.qwen2_vl.modeling import qwen2_vl_param_shapes
    from aria_jax.qwen2_vl.weights import COMPONENTS as QWEN2_VL_COMPONENTS

    return QWEN2_VL_COMPONENTS, qwen2_vl_param_shapes(config, dtype)
