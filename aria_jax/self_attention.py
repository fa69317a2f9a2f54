"""The causal self-attention of the text decoder: q, k, v projections, RoPE, the KV cache and
its padding mask, the output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.attention import DECODE_QUERIES, attention, attention_beside_cache
from aria_jax.config import AriaTextConfig
from aria_jax.qwen2_vl import awaker
from aria_jax.context_parallel import attention_over_split_cache
from aria_jax.kv_cache import entries, furthest, positions_split, readable, written
from aria_jax.layers import adapted, apply_rope, default_kernel_init, param_with_axes
from aria_jax.quantization import dequantized
from aria_jax.sharding import constrain, on_one_cpu


class Attention(nn.Module):
    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        key_mask: jax.Array,
        cache: dict | None = None,
        cache_index=None,
        gate_input: jax.Array | None = None,
    ):
        """x (B, T, D); key_mask (B, S) True = a real token (S = T without a cache). Causal.
        Without a cache: (B, T, D). With a layer cache {"k", "v"} of (B, K, S, H) (int8 with their
        scales, see `kv_cache`) and the sequence index of x's first token, or of each row's one
        token (`kv_cache.is_per_row`): ((B, T, D), updated cache). `gate_input` (B, D): the
        per-sequence input of Awaker's routers (`qwen2_vl.awaker`), for configs with its adapters."""
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def kernel(name, shape, axes):
            weight = param_with_axes(self, name, default_kernel_init, shape, axes, self.param_dtype)
            return adapted(self, name, dequantized(weight, self.dtype))

        w_q = kernel("q_proj", (d, n, h), ("attention_embed", "q_heads", "head_dim"))
        w_k = kernel("k_proj", (d, k, h), ("attention_embed", "kv_heads", "head_dim"))
        w_v = kernel("v_proj", (d, k, h), ("attention_embed", "kv_heads", "head_dim"))
        w_o = kernel("o_proj", (n, h, d), ("q_heads", "head_dim", "attention_embed"))
        if cfg.attention_bias:
            b_q, b_k, b_v = (
                param_with_axes(self, name, nn.initializers.zeros, (heads, h), (axis, "head_dim"), self.param_dtype)
                for name, heads, axis in (
                    ("q_bias", n, "q_heads"),
                    ("k_bias", k, "kv_heads"),
                    ("v_bias", k, "kv_heads"),
                )
            )

        # Decode's few rows go whole to every chip, which multiplies them by its own slice of the
        # weights' model dimension: otherwise the compiler gathers the weights to the rows.
        few_rows = cache is not None and x.shape[1] <= DECODE_QUERIES
        if few_rows:
            x = constrain(x, None, None, "attention_embed")
        with jax.named_scope("qkv"):
            q = jnp.einsum("btd,dnh->btnh", x, w_q)
            key = jnp.einsum("btd,dkh->btkh", x, w_k)
            value = jnp.einsum("btd,dkh->btkh", x, w_v)
            if cfg.attention_bias:
                q, key, value = (y + bias.astype(self.dtype) for y, bias in ((q, b_q), (key, b_k), (value, b_v)))
            if cfg.lora_rank:
                q, key, value = (
                    awaker.plus(y, awaker.lora_term(self, name, x, (heads, h), (axis, "head_dim"), cfg))
                    for y, name, heads, axis in (
                        (q, "q", n, "q_heads"),
                        (key, "k", k, "kv_heads"),
                        (value, "v", k, "kv_heads"),
                    )
                )
            # Keys and values (B, K, T, H), as cached. Transposed after the matmul: asked of it,
            # XLA:CPU transposes the weights instead, at every step.
            value = value.swapaxes(1, 2)
        with jax.named_scope("rope"):
            q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin).swapaxes(1, 2)
        if cache is not None and positions_split(cache["k"].shape):
            with jax.named_scope("attend_split_cache"):
                out, cache = attention_over_split_cache(q, key, value, cache, key_mask, cache_index)
        elif few_rows and on_one_cpu():
            with jax.named_scope("attend"):
                out, cache = attention_beside_cache(q, key, value, cache, key_mask, cache_index)
        else:
            scales = None
            if cache is not None:
                with jax.named_scope("cache_write"):
                    cache = written(cache, entries(cache, key, value), cache_index)
                    key, value, scales = readable(cache, self.dtype)
                if isinstance(cache_index, int):
                    # x's tokens are the cache's last ones any query can see: the keys after are in
                    # every query's future, so they are not read at all
                    seen = cache_index + x.shape[1]
                    key, value, key_mask = key[:, :, :seen], value[:, :, :seen], key_mask[:, :seen]
                    scales = None if scales is None else tuple(scale[:, :, :seen] for scale in scales)
            with jax.named_scope("attend"):
                out = attention(q, key, value, key_mask, 0 if cache is None else furthest(cache_index), scales=scales)
        attended = out
        if few_rows:
            out = constrain(project_out(constrain(out, None, None, None, None), w_o), None, None, "attention_embed")
        else:
            out = project_out(out, w_o)
        if cfg.lora_rank:
            routing = awaker.route(self, "o_proj", gate_input, cfg)
            flat = attended.reshape(*attended.shape[:2], n * h)
            out = awaker.plus(out, awaker.experts_term(self, "o_proj", flat, d, routing, cfg, out_axis="embed"))
        return out if cache is None else (out, cache)


def project_out(out: jax.Array, w_o: jax.Array) -> jax.Array:
    """out (B, T, N, H) by w_o (N, H, D). XLA:CPU, contracting heads and their dimension as two
    dimensions, lays them out the other way round and transposes the weights to match at every
    decode step: there they are merged first (on TPU that costs a relayout instead)."""
    if not on_one_cpu():
        return jnp.einsum("btnh,nhd->btd", out, w_o)
    batch, length, heads, head_dim = out.shape
    return jnp.einsum(
        "btf,fd->btd", out.reshape(batch, length, heads * head_dim), w_o.reshape(heads * head_dim, w_o.shape[-1])
    )
