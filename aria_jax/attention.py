"""Causal self-attention of the text decoder (MHA and GQA), with RoPE and a padding mask."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig
from aria_jax.layers import adapted, apply_rope, default_kernel_init, param_with_axes


def causal_padding_mask(key_mask: jax.Array, query_offset=0, num_queries: int | None = None) -> jax.Array:
    """(B, S) 1/0 key mask -> (B, T, S) bool, True where query t (at sequence index
    `query_offset + t`) may attend key s: s is not in its future and is not padding."""
    num_keys = key_mask.shape[1]
    num_queries = num_keys if num_queries is None else num_queries
    query_index = query_offset + jnp.arange(num_queries)
    causal = jnp.arange(num_keys)[None, :] <= query_index[:, None]
    return causal[None, :, :] & key_mask.astype(bool)[:, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: (B, T, N, H); k, v: (B, S, K, H) with K dividing N; mask: (B, T or 1, S) True = attend.

    Query head n reads key/value head n // (N / K). Scale H^-0.5, softmax in float32. A query
    row with no key to attend (a left pad) yields finite garbage rather than NaN; callers
    ignore those rows.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k) * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: dict | None = None, cache_index=None):
        """x (B, T, D). Without a cache: (B, T, D). With a layer cache {"k", "v"} of
        (B, S, K, H) and the sequence index of x's first token: ((B, T, D), updated cache)."""
        cfg = self.config
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def kernel(name, shape, axes):
            weight = param_with_axes(self, name, default_kernel_init, shape, axes, self.param_dtype)
            return adapted(self, name, weight.astype(self.dtype))

        w_q = kernel("q_proj", (d, n, h), ("embed", "q_heads", "head_dim"))
        w_k = kernel("k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))
        w_v = kernel("v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))
        w_o = kernel("o_proj", (n, h, d), ("q_heads", "head_dim", "embed"))

        with jax.named_scope("qkv"):
            q = jnp.einsum("btd,dnh->btnh", x, w_q)
            key = jnp.einsum("btd,dkh->btkh", x, w_k)
            value = jnp.einsum("btd,dkh->btkh", x, w_v)
        with jax.named_scope("rope"):
            q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        if cache is not None:
            with jax.named_scope("cache_write"):
                start = (0, cache_index, 0, 0)
                cache = {"k": jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), start),
                         "v": jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), start)}
                key, value = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
        with jax.named_scope("attend"):
            out = dot_product_attention(q, key, value, mask)
        out = jnp.einsum("btnh,nhd->btd", out, w_o)
        return out if cache is None else (out, cache)
