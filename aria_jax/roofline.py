"""The least a generation step can cost: what every implementation must read or compute.

Decode is bound by memory: a step must read, at least once, every weight it uses (attention,
shared experts, routers, norms, lm_head; of the routed experts only those the batch can select,
min(experts, batch x top_k) per layer), the embedding rows of the batch's tokens, and the KV
cache up to its length. Qwen2-VL's decoder is dense: every weight, once per step. Awaker2.5-VL's
mixtures of LoRA experts are routed once per sequence: a step must read, of each layer's E + 1
adapters of a projection, the general one ("g") and those the rows chose, at most min(E, batch).
Prefill is bound by compute: the matmul flops of every prompt token (each routed to top_k
experts; Awaker: through two of the E + 1 adapters, its row's expert and "g"), causal attention
over the prompt, and lm_head for the last token of each row (the only logits prefill keeps).

The weights are counted from the model's own parameter declarations (`text_param_shapes`, or
the family's `param_layout`, whose logical axis names say which dimension stacks layers and
which indexes experts), so the count follows the model rather than restating it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from aria_jax.families import param_layout
from aria_jax.modeling import text_param_shapes
from aria_jax.quantization import Quantization, array_bytes, quantized_shapes

# Awaker's LoRA experts (`qwen2_vl.awaker.experts_term`): (layers, E + 1, ...), "g" last.
LORA_EXPERT_SUFFIXES = ("_experts_a", "_experts_b")


def _text_config(config):
    """The decoder's config, of a whole model's config or of a text config."""
    return getattr(config, "text_config", config)


def _decoder_shapes(config, dtype) -> dict:
    """The decoder's boxed param shapes: of an Aria text config, or of a whole model's config
    (its family's `language_model`)."""
    if hasattr(config, "text_config"):
        return param_layout(config, dtype)[1]["language_model"]
    return text_param_shapes(config, dtype)


def _is_lora_expert(path: str) -> bool:
    return path.endswith(LORA_EXPERT_SUFFIXES)


def _declared_weights(
    config, dtype, quantization: Quantization | None = None
) -> list[tuple[str, tuple[int, ...], tuple[str, ...], int]]:
    """(path, shape, logical axis names, bytes) of every text weight (quantized: its values and
    its scales, each with the weight's names). `config`: a text config or a whole model's."""
    boxed = quantized_shapes({"language_model": _decoder_shapes(config, dtype)}, quantization)["language_model"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: hasattr(x, "names"))
    return [
        (
            "/".join(str(getattr(k, "key", k)) for k in path),
            tuple(leaf.value.shape),
            tuple(leaf.names),
            array_bytes(leaf.value.shape, leaf.value.dtype),
        )
        for path, leaf in leaves
    ]


def decode_step_bytes(
    config,
    dtype,
    batch: int,
    cache_length: int,
    quantization: Quantization | None = None,
    kv_cache_dtype: str | None = None,
) -> dict[str, int]:
    """The bytes one decode step of `batch` rows must read, by kind. `kv_cache_dtype` "int8": a
    byte per number and a float32 scale per (row, kv head, position) for keys and values alike.
    `config`: a text config or a whole model's (Qwen2-VL's and Awaker's are)."""
    weights, config = _declared_weights(config, dtype, quantization), _text_config(config)
    itemsize = jnp.dtype(dtype).itemsize
    parts = {"weights": 0}
    if config.moe_num_experts:
        parts["routed experts"] = 0
    if config.lora_rank:
        parts["LoRA experts"] = 0
        adapters = config.moe_lora_experts + 1
        adapters_touched = min(config.moe_lora_experts, batch) + 1  # the rows' choices and "g"
    parts["embedding rows"] = 0
    for path, shape, names, size in weights:
        if "experts" in names:
            experts_touched = min(config.moe_num_experts, batch * config.moe_topk)
            parts["routed experts"] += size * experts_touched // config.moe_num_experts
        elif _is_lora_expert(path):
            parts["LoRA experts"] += size * adapters_touched // adapters
        elif path == "embed_tokens":
            parts["embedding rows"] += batch * shape[names.index("vocab_embed")] * itemsize
        else:
            parts["weights"] += size
    # k and v: (layers, batch, kv heads, length, head dim) each, as `kv_cache.init_cache` makes them
    per_position = config.head_dim * itemsize if kv_cache_dtype is None else config.head_dim + 4
    parts["KV cache"] = 2 * config.num_hidden_layers * batch * cache_length * config.num_key_value_heads * per_position
    return parts


def prefill_flops(config, dtype, batch: int, prompt_length: int) -> float:
    """Flops of prefilling `batch` prompts of `prompt_length` tokens into an empty cache.
    `config`: a text config or a whole model's."""
    weights, config = _declared_weights(config, dtype), _text_config(config)
    tokens = batch * prompt_length
    per_token = 0.0
    last_token = 0.0
    for path, shape, names, _ in weights:
        if path == "embed_tokens":
            continue  # a gather, no flops
        if "layers" in names:
            per_layer = math.prod(shape) // shape[names.index("layers")]
            if len(shape) - 1 < 2:
                continue  # norm scales: negligible
            weight = per_layer * config.num_hidden_layers
            if "experts" in names:
                weight = weight * config.moe_topk // config.moe_num_experts
            elif _is_lora_expert(path):
                weight = weight * 2 // (config.moe_lora_experts + 1)  # the row's expert and "g"
            per_token += 2 * weight
        elif len(shape) >= 2:
            last_token += 2 * math.prod(shape)  # lm_head
    # Causal attention: query t sees t + 1 keys; scores and the weighted sum of values.
    attended_pairs = prompt_length * (prompt_length + 1) / 2
    attention = 2 * 2 * config.num_attention_heads * config.head_dim * attended_pairs * config.num_hidden_layers
    return tokens * per_token + batch * (last_token + attention)
