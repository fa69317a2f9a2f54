"""The vision tower: Idefics3/SigLIP ViT with NaViT-style patch masks.

Same math as transformers' `transformers.models.idefics3.modeling_idefics3.Idefics3VisionTransformer`
as `transformers.models.aria.modeling_aria.AriaModel` uses it (patch mask from
`AriaModel._create_patch_attention_mask`, features from `hidden_states[-1]`).

Crops arrive padded right/bottom to a square with a pixel mask. A patch is valid when any of its
pixels is; padded patches get position 0 and are never attended as keys. Position ids are
fractional coordinates of the valid area bucketed onto the full-size position table, so a
half-size crop reads every other row and column of it. Aria uses the last encoder layer's
output *before* `post_layernorm` (stored as zeros in hub checkpoints), so there is none here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.attention import attention
from aria_jax.config import AriaVisionConfig
from aria_jax.layers import ACTIVATIONS, LayerNorm, Linear, default_kernel_init, param_with_axes


def patch_mask_from_pixel_mask(pixel_mask: jax.Array, patch_size: int) -> jax.Array:
    """(N, S, S) bool -> (N, S//p, S//p) bool: a patch is valid if any of its pixels is. Rows and
    columns past the last whole patch are dropped, as the reference's unfold drops them."""
    n, height, width = pixel_mask.shape
    pixel_mask = pixel_mask[:, : height // patch_size * patch_size, : width // patch_size * patch_size]
    grid = pixel_mask.reshape(n, height // patch_size, patch_size, width // patch_size, patch_size)
    return grid.any(axis=(2, 4))


def bucket_boundaries(num_patches_per_side: int) -> np.ndarray:
    """torch.arange(1/n, 1.0, 1/n) in float32, built the way the reference does (float64, then cast)."""
    step = 1.0 / num_patches_per_side
    count = int(np.ceil((1.0 - step) / step))
    return (step + np.arange(count, dtype=np.float64) * step).astype(np.float32)


def vision_position_ids(patch_mask: jax.Array, num_patches_per_side: int) -> jax.Array:
    """(N, h, w) patch mask -> (N, h*w) int32 ids into the (n*n)-row position table."""
    n, height, width = patch_mask.shape
    boundaries = jnp.asarray(bucket_boundaries(num_patches_per_side))
    # Valid rows are counted down the first column and valid columns along the first row.
    rows = patch_mask[:, :, 0].sum(axis=1).astype(jnp.float32)
    cols = patch_mask[:, 0, :].sum(axis=1).astype(jnp.float32)

    def bucket(count, length):
        fractional = jnp.arange(length, dtype=jnp.float32)[None, :] * (1.0 / count)[:, None]
        fractional = jnp.minimum(fractional, 1.0 - 1e-6)
        return jnp.searchsorted(boundaries, fractional, side="right").astype(jnp.int32)

    ids = bucket(rows, height)[:, :, None] * num_patches_per_side + bucket(cols, width)[:, None, :]
    return jnp.where(patch_mask, ids, 0).reshape(n, height * width)


class VisionAttention(nn.Module):
    config: AriaVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = (cfg.num_attention_heads, cfg.head_dim)
        head_axes = ("embed", "heads", "head_dim")
        q = Linear(heads, head_axes, name="q_proj", **kw)(x)  # (N, P, n, h)
        k = Linear(heads, head_axes, name="k_proj", **kw)(x)
        v = Linear(heads, head_axes, name="v_proj", **kw)(x)
        out = attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask)
        return Linear((cfg.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="out_proj", **kw)(out)


class VisionEncoderLayer(nn.Module):
    config: AriaVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + VisionAttention(cfg, name="self_attn", **kw)(
            LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x), key_mask
        )
        hidden = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        hidden = Linear((cfg.intermediate_size,), ("embed", "mlp"), name="fc1", **kw)(hidden)
        hidden = Linear((cfg.hidden_size,), ("mlp", "embed"), name="fc2", **kw)(ACTIVATIONS[cfg.hidden_act](hidden))
        return x + hidden, None


class VisionTower(nn.Module):
    """pixel_values (N, C, S, S) and patch mask (N, S//p, S//p) -> features (N, (S//p)^2, D)."""

    config: AriaVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # recompute layer activations in the backward pass (training memory)

    @nn.compact
    def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, d = cfg.patch_size, cfg.hidden_size
        n, c, height, width = pixel_values.shape
        with jax.named_scope("patch_embedding"):
            kernel = param_with_axes(
                self,
                "patch_kernel",
                default_kernel_init,
                (c, p, p, d),
                ("channels", "patch", "patch", "embed"),
                self.param_dtype,
            )
            bias = param_with_axes(self, "patch_bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
            # A stride-p convolution: pixels past the last whole patch are not read.
            pixels = pixel_values[:, :, : height // p * p, : width // p * p]
            patches = pixels.astype(self.dtype).reshape(n, c, height // p, p, width // p, p)
            x = jnp.einsum("ncyixj,cijd->nyxd", patches, kernel.astype(self.dtype)) + bias.astype(self.dtype)
            x = x.reshape(n, (height // p) * (width // p), d)
        with jax.named_scope("position_embedding"):
            table = param_with_axes(
                self,
                "position_embedding",
                default_kernel_init,
                (cfg.num_patches_per_side**2, d),
                ("positions", "embed"),
                self.param_dtype,
            )
            x = x + jnp.take(table, vision_position_ids(patch_mask, cfg.num_patches_per_side), axis=0).astype(
                self.dtype
            )
        key_mask = patch_mask.reshape(n, -1)
        x, _ = nn.scan(
            nn.remat(VisionEncoderLayer, prevent_cse=False) if self.remat else VisionEncoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers", **kw)(x, key_mask)
        return x
