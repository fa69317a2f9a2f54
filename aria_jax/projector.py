"""The projector: learned queries cross-attend to a crop's vision features.

Same math as transformers' `transformers.models.aria.modeling_aria.AriaProjector` (with
`AriaCrossAttention` and `AriaProjectorMLP`).

A crop of P patches gets Q learned queries (the first Q rows of the query table, Q from the
config's `projector_patch_to_query`; `AriaConfig.crop_size_to_queries` by crop side). q/k/v projections are
followed by torch's packed multi-head attention (in_proj, out_proj), a linear, no residual, a
LayerNorm and a gelu-tanh FFN into the text model's width. Every LayerNorm here uses torch's
default eps, 1e-5. Padded patches are never attended.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.attention import attention
from aria_jax.config import AriaConfig
from aria_jax.layers import ACTIVATIONS, LayerNorm, Linear, default_kernel_init, param_with_axes
from aria_jax.quantization import dequantized

PROJECTOR_LAYER_NORM_EPS = 1e-5


class CrossAttention(nn.Module):
    config: AriaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, features: jax.Array, key_mask: jax.Array) -> jax.Array:
        """queries (B, Q, D); features (B, P, D); key_mask (B, P) True = valid patch."""
        vision = self.config.vision_config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, n, h = vision.hidden_size, vision.num_attention_heads, vision.head_dim
        q = Linear((d,), ("embed", "embed_out"), use_bias=False, name="q_proj", **kw)(
            LayerNorm(PROJECTOR_LAYER_NORM_EPS, name="layer_norm", **kw)(queries)
        )
        features = LayerNorm(PROJECTOR_LAYER_NORM_EPS, name="layer_norm_kv", **kw)(features)
        k = Linear((d,), ("embed", "embed_out"), use_bias=False, name="k_proj", **kw)(features)
        v = Linear((d,), ("embed", "embed_out"), use_bias=False, name="v_proj", **kw)(features)

        # torch.nn.MultiheadAttention: one packed in-projection for q, k and v (index 0, 1, 2).
        in_proj = dequantized(
            param_with_axes(
                self,
                "in_proj_kernel",
                default_kernel_init,
                (d, 3, n, h),
                ("embed", "qkv", "heads", "head_dim"),
                self.param_dtype,
            ),
            self.dtype,
        )
        in_bias = param_with_axes(
            self, "in_proj_bias", nn.initializers.zeros, (3, n, h), ("qkv", "heads", "head_dim"), self.param_dtype
        ).astype(self.dtype)
        q = jnp.einsum("bqd,dnh->bqnh", q, in_proj[:, 0]) + in_bias[0]
        k = jnp.einsum("bkd,dnh->bnkh", k, in_proj[:, 1]) + in_bias[1][:, None, :]
        v = jnp.einsum("bkd,dnh->bnkh", v, in_proj[:, 2]) + in_bias[2][:, None, :]
        out = attention(q, k, v, key_mask)
        out = Linear((d,), ("heads", "head_dim", "embed"), in_dims=2, name="out_proj", **kw)(out)
        return Linear((d,), ("embed", "embed_out"), name="linear", **kw)(out)


class Projector(nn.Module):
    """Vision features (B, P, Dv) + patch mask (B, P) -> (B, Q, D_text)."""

    config: AriaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, key_mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d_vision, d_text = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
        num_queries = queries_for_patches(cfg, features.shape[1])
        query_table = param_with_axes(
            self, "query", default_kernel_init, (cfg.max_queries, d_vision), ("queries", "embed"), self.param_dtype
        )
        queries = jnp.broadcast_to(
            query_table[:num_queries].astype(self.dtype), (features.shape[0], num_queries, d_vision)
        )
        out = CrossAttention(cfg, name="cross_attn", **kw)(queries, features, key_mask)
        out = LayerNorm(PROJECTOR_LAYER_NORM_EPS, name="layer_norm", **kw)(out)
        out = Linear((d_text,), ("embed", "mlp"), use_bias=False, name="linear_in", **kw)(out)
        return Linear((d_text,), ("mlp", "embed_text"), use_bias=False, name="linear_out", **kw)(
            ACTIVATIONS["gelu_new"](out)
        )


def queries_for_patches(config: AriaConfig, num_patches: int) -> int:
    for patches, queries in config.projector_patch_to_query:
        if patches == num_patches:
            return queries
    sizes = ", ".join(map(str, config.crop_size_to_queries))
    raise ValueError(
        f"crops of {num_patches} patches have no projector query count; crop sizes this model takes: {sizes} pixels"
    )
