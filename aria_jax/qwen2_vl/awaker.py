"""Awaker2.5-VL's adapters on Qwen2-VL's decoder: LoRA on q/k/v and a mixture of LoRA experts,
routed once per sequence, on o_proj and the MLP's gate/up/down projections.

With s = lora_alpha / lora_rank and x a projection's input (B, T, in):
- q, k, v:        y = x W + b + s (x A) B, the LoRA term in float32 (the release keeps those
                  adapters in float32), added to y in float32 and rounded to y's dtype.
- o, gate, up, down: y = x W + w^2 s (x A_e) B_e + (1 - w) s (x A_g) B_g, where e and w are the
                  row's expert and its softmax weight and "g" the always-on general expert. The
                  square is what the release computes (the gate multiplies the expert's output
                  once when dispatched and again when mixed with "g"); w is a float16 softmax
                  output, 1 - w is taken in float16, the products and their sum in float32.
- Routers, on o_proj and gate_proj (up and down follow gate_proj's): a per-sequence gate input
  p (B, D) -> RMSNorm (float32, eps 1e-6, rounded back, then its weight) -> linear with bias ->
  softmax in float16 -> the top expert and its probability, not renormalised.

p is the mean over the row's prompt span of the layer-0 input embeddings (`prompt_spans`,
`span_means`): the same p for every layer, so routing is per layer and per sequence. Which
embeddings depends on the step (`AwakerForConditionalGeneration`).

Adapters are params under each layer's `self_attn` and `mlp`: `{q,k,v}_lora_a` (D, r) and
`_lora_b` (r, heads, head_dim); `{target}_experts_a` (E + 1, in, r) and `_experts_b` (E + 1, r, out),
experts in the release's order "0".."E-1", then "g"; `{o_proj,gate_proj}_router_{norm,kernel,bias}`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.layers import default_kernel_init, param_with_axes

ROUTER_EPS = 1e-6


def lora_term(module: nn.Module, name: str, x: jax.Array, out_shape: tuple[int, ...], out_axes, config) -> jax.Array:
    """s (x A) B in float32 (B, T, *out_shape) for plain LoRA adapter `name` of `module`."""
    rank, d = config.lora_rank, x.shape[-1]
    a = param_with_axes(
        module, f"{name}_lora_a", default_kernel_init, (d, rank), ("embed", "lora_rank"), module.param_dtype
    )
    b = param_with_axes(
        module,
        f"{name}_lora_b",
        nn.initializers.zeros,
        (rank, *out_shape),
        ("lora_rank", *out_axes),
        module.param_dtype,
    )
    low = jnp.einsum("btd,dr->btr", x.astype(jnp.float32), a.astype(jnp.float32))
    return jnp.einsum("btr,r...->bt...", low, b.astype(jnp.float32)) * config.lora_scale


def route(module: nn.Module, name: str, gate_input: jax.Array, config) -> tuple[jax.Array, jax.Array]:
    """Router `name` of `module` on the per-sequence gate input (B, D): each row's expert (B,)
    int32 and its weight (B,) float16."""
    d, experts, dtype = gate_input.shape[-1], config.moe_lora_experts, module.dtype
    norm = param_with_axes(module, f"{name}_router_norm", nn.initializers.ones, (d,), ("embed",), module.param_dtype)
    kernel = param_with_axes(
        module, f"{name}_router_kernel", default_kernel_init, (d, experts), ("embed", None), module.param_dtype
    )
    bias = param_with_axes(
        module, f"{name}_router_bias", nn.initializers.zeros, (experts,), (None,), module.param_dtype
    )
    p = gate_input.astype(jnp.float32)
    normed = (p * jax.lax.rsqrt(jnp.mean(p * p, axis=-1, keepdims=True) + ROUTER_EPS)).astype(dtype)
    logits = jnp.einsum("bd,de->be", normed * norm.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float16).astype(jnp.float32), axis=-1).astype(jnp.float16)
    expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return expert, jnp.take_along_axis(probs, expert[:, None], axis=-1)[:, 0]


def experts_term(
    module: nn.Module, name: str, x: jax.Array, out_features: int, routing, config, in_axis=None, out_axis=None
) -> jax.Array:
    """w^2 s (x A_e) B_e + (1 - w) s (x A_g) B_g in float32 (B, T, out) for the MoE-LoRA of
    `name`; x (B, T, in); routing: (expert (B,), weight (B,) float16) from `route`."""
    rank, experts, dtype = config.lora_rank, config.moe_lora_experts, module.dtype
    shape_a, shape_b = (experts + 1, x.shape[-1], rank), (experts + 1, rank, out_features)
    a = param_with_axes(
        module, f"{name}_experts_a", default_kernel_init, shape_a, (None, in_axis, "lora_rank"), module.param_dtype
    )
    b = param_with_axes(
        module, f"{name}_experts_b", nn.initializers.zeros, shape_b, (None, "lora_rank", out_axis), module.param_dtype
    )
    expert, weight = routing
    x = x.astype(dtype)
    chosen = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a[expert]), b[expert]) * config.lora_scale
    general = jnp.einsum("btr,ro->bto", jnp.einsum("bti,ir->btr", x, a[experts]), b[experts]) * config.lora_scale
    w = weight.astype(jnp.float32)[:, None, None]
    rest = (jnp.float16(1) - weight).astype(jnp.float32)[:, None, None]
    return chosen.astype(jnp.float32) * w * w + general.astype(jnp.float32) * rest


def plus(y: jax.Array, term: jax.Array) -> jax.Array:
    """y + a float32 adapter term, added in float32 and rounded to y's dtype (an in-place add)."""
    return (y.astype(jnp.float32) + term).astype(y.dtype)


def prompt_spans(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    im_start_token_id: int,
    im_end_token_id: int,
) -> np.ndarray:
    """Each row's gate span [start, end) (B, 2), as Awaker's README computes `prompt_pos`: from the
    first `<|vision_start|>` if the row holds an image, else (videos too) two past the second
    `<|im_start|>`, to the second `<|im_end|>` (with the default system prompt: the user's turn).
    Raises ValueError naming the row when a row has no such span."""
    spans = []
    for row, ids in enumerate(np.asarray(input_ids)):
        vision = np.flatnonzero(ids == vision_start_token_id) if (ids == image_token_id).any() else []
        starts, ends = np.flatnonzero(ids == im_start_token_id), np.flatnonzero(ids == im_end_token_id)
        if len(ends) < 2 or (not len(vision) and len(starts) < 2):
            raise ValueError(
                f"row {row}: Awaker routes by the prompt's span from the image (or the second <|im_start|>) to the "
                f"second <|im_end|>, and this row has {len(starts)} <|im_start|> and {len(ends)} <|im_end|>: "
                "build prompts with the chat template (system turn, then the user's)"
            )
        start = int(vision[0]) if len(vision) else int(starts[1]) + 2
        if not start < ends[1]:
            raise ValueError(f"row {row}: the gate span [{start}, {int(ends[1])}) is empty")
        spans.append((start, int(ends[1])))
    return np.asarray(spans, np.int32)


def span_means(embeds: jax.Array, spans: jax.Array) -> jax.Array:
    """The mean of each row's embeddings (B, T, D) over its span [start, end) (B, 2): (B, D), in
    the embeddings' dtype (summed in float32)."""
    positions = jnp.arange(embeds.shape[1])
    inside = (positions >= spans[:, :1]) & (positions < spans[:, 1:])
    total = jnp.einsum("btd,bt->bd", embeds.astype(jnp.float32), inside.astype(jnp.float32))
    return (total / (spans[:, 1:] - spans[:, :1]).astype(jnp.float32)).astype(embeds.dtype)
