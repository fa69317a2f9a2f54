"""Tiny random transformers Aria models, saved with `save_pretrained` (real hub key names).

Every weight is random, norm weights included (the default ones/zeros hide bugs), and router
weights are scaled up so that routing decisions are far from ties: a near-tie could flip
between PyTorch and JAX on rounding alone and look like a bug.
"""

from __future__ import annotations

import os

import torch

TEXT_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    moe_num_experts=4,
    moe_topk=2,
    moe_num_shared_experts=2,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    max_position_embeddings=4096,
)


def randomize_(model: torch.nn.Module, seed: int, router_scale: float = 8.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                values = 1.0 + 0.3 * values
            elif name.endswith("router.weight"):
                values = values * router_scale / param.shape[-1] ** 0.5
            else:
                values = values / param.shape[-1] ** 0.5
            param.copy_(values.to(param.dtype))


def make_text_model(directory: str | os.PathLike, seed: int = 0, dtype=torch.float32, **overrides):
    """Builds, randomizes and saves a transformers `AriaTextForCausalLM`; returns it (eval mode)."""
    from transformers import AriaTextConfig, AriaTextForCausalLM

    torch.manual_seed(seed)
    config = AriaTextConfig(**{**TEXT_DEFAULTS, **overrides})
    model = AriaTextForCausalLM(config).eval()
    randomize_(model, seed)
    model = model.to(dtype)
    model.save_pretrained(directory)
    return model


VISION_DEFAULTS = dict(
    model_type="idefics3_vision",
    hidden_size=32,
    num_attention_heads=2,
    num_hidden_layers=1,
    intermediate_size=64,
    image_size=28,
    patch_size=14,
)
# 28 / 14 = 2 patches per side: a crop has 1 (half-size) or 4 (full-size) patches.
PROJECTOR_PATCH_TO_QUERY = {1: 2, 4: 4}


def make_multimodal_model(
    directory: str | os.PathLike,
    seed: int = 0,
    dtype=torch.float32,
    *,
    vision_overrides: dict | None = None,
    projector_patch_to_query: dict[int, int] | None = None,
    **text_overrides,
):
    """Builds, randomizes and saves a tiny transformers `AriaForConditionalGeneration` (vision
    tower, projector and MoE decoder; `text_overrides` go into its text_config,
    `vision_overrides` into its vision_config, `projector_patch_to_query` replaces
    PROJECTOR_PATCH_TO_QUERY); returns it (eval mode). The image token is id 9, as in the real
    config."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    torch.manual_seed(seed)
    config = AriaConfig(
        text_config={**TEXT_DEFAULTS, **text_overrides},
        vision_config={**VISION_DEFAULTS, **(vision_overrides or {})},
        projector_patch_to_query_dict=dict(projector_patch_to_query or PROJECTOR_PATCH_TO_QUERY),
        image_token_index=9,
    )
    model = AriaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model = model.to(dtype)
    model.save_pretrained(directory)
    return model
