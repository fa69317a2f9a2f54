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
from aria_jax.weights import COPY, LINEAR, LINEAR_2_IN, RESHAPE, KeyTable, _rules

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
