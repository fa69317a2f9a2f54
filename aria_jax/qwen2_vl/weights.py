"""Qwen2-VL's hub checkpoints: the key table that `aria_jax.weights` loads them with.

The canonical naming is transformers 4.45's, what Qwen/Qwen2-VL-*-Instruct ships (and Awaker2.5-VL
under `base_model.model.`): `model.embed_tokens.weight`, `model.layers.{i}...`, `model.norm.weight`,
`lm_head.weight`, `visual...`. transformers 5 writes `model.language_model...` and `model.visual...`
(its `save_pretrained` keeps its in-memory names); both are read. A checkpoint with tied
embeddings has no `lm_head.weight`.
"""

from __future__ import annotations

import re

from aria_jax.qwen2_vl.vision import VISION_RULES
from aria_jax.weights import COPY, LINEAR, LINEAR_2_IN, RESHAPE, KeyRule, KeyTable, _rules

_LAYER = "model.layers.{i}."


def text_rules(tie_word_embeddings: bool):
    """The decoder's rules; `lm_head` only when it is not the embedding's transpose."""
    entries = [
        ("model.embed_tokens.weight", ("embed_tokens",), COPY),
        ("model.norm.weight", ("norm", "scale"), COPY),
        (_LAYER + "input_layernorm.weight", ("layers", "input_layernorm", "scale"), COPY),
        (_LAYER + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), COPY),
        (_LAYER + "self_attn.q_proj.weight", ("layers", "self_attn", "q_proj"), LINEAR),
        (_LAYER + "self_attn.q_proj.bias", ("layers", "self_attn", "q_bias"), RESHAPE),
        (_LAYER + "self_attn.k_proj.weight", ("layers", "self_attn", "k_proj"), LINEAR),
        (_LAYER + "self_attn.k_proj.bias", ("layers", "self_attn", "k_bias"), RESHAPE),
        (_LAYER + "self_attn.v_proj.weight", ("layers", "self_attn", "v_proj"), LINEAR),
        (_LAYER + "self_attn.v_proj.bias", ("layers", "self_attn", "v_bias"), RESHAPE),
        (_LAYER + "self_attn.o_proj.weight", ("layers", "self_attn", "o_proj"), LINEAR_2_IN),
        (_LAYER + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), LINEAR),
        (_LAYER + "mlp.up_proj.weight", ("layers", "mlp", "up_proj"), LINEAR),
        (_LAYER + "mlp.down_proj.weight", ("layers", "mlp", "down_proj"), LINEAR),
    ]
    if not tie_word_embeddings:
        entries.append(("lm_head.weight", ("lm_head",), LINEAR))
    return _rules("", ("language_model",), entries)


# transformers 5's names -> the canonical ones.
RENAMES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."))
)

COMPONENTS = ("language_model", "visual")


def key_table(tie_word_embeddings: bool, renames=RENAMES, extra_rules=(), ignored=()) -> KeyTable:
    """Qwen2-VL's key table (Awaker's adds its adapters' rules and its `base_model.model.` prefix)."""
    return KeyTable(
        text_rules(tie_word_embeddings) + VISION_RULES + tuple(extra_rules),
        renames,
        tuple(ignored),
        COMPONENTS,
        "has no {component} weights: not a Qwen2-VL checkpoint",
    )


def awaker_rules(num_experts: int):
    """Awaker's adapters: LoRA "default" on q/k/v, MoE-LoRA experts "0".."E-1" and "g" on o_proj
    and the MLP (one tensor per expert, stacked into one param), routers on o_proj and gate_proj."""
    experts = tuple(str(e) for e in range(num_experts)) + ("g",)
    entries, moe = [], []
    for name in ("q", "k", "v"):
        proj = f"{_LAYER}self_attn.{name}_proj.lora_"
        entries.append((proj + "A.default.weight", ("layers", "self_attn", f"{name}_lora_a"), LINEAR))
        entries.append((proj + "B.default.weight", ("layers", "self_attn", f"{name}_lora_b"), LINEAR))
    for module, target in (("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
        proj = f"{_LAYER}{module}.{target}."
        for side in ("a", "b"):
            template = proj + f"lora_moe_{side.upper()}.{{part}}.weight"
            path = ("language_model", "layers", module, f"{target}_experts_{side}")
            moe.append(KeyRule(template, path, LINEAR, experts))
        if target in ("o_proj", "gate_proj"):
            entries.append((proj + "w_gate.weight", ("layers", module, f"{target}_router_kernel"), LINEAR))
            entries.append((proj + "w_gate.bias", ("layers", module, f"{target}_router_bias"), COPY))
            entries.append((proj + "ln.weight", ("layers", module, f"{target}_router_norm"), COPY))
    return _rules("", ("language_model",), entries) + tuple(moe)


# Awaker's pytorch_model.bin is a peft PeftModel's state dict: every key under `base_model.model.`.
AWAKER_RENAMES = ((re.compile(r"^base_model\.model\."), ""),) + RENAMES


def awaker_key_table(tie_word_embeddings: bool, num_experts: int) -> KeyTable:
    return key_table(tie_word_embeddings, AWAKER_RENAMES, awaker_rules(num_experts))
