"""Qwen2-VL's vision tower: a ViT over (temporal x patch x patch) patches with 2D rotary
positions, then a merger of each 2 x 2 window of patches into one token of the decoder's width.

Same math as transformers' `Qwen2VisionTransformerPretrainedModel` (`models/qwen2_vl/modeling_qwen2_vl.py`).

Rows. The image processor flattens every image (and every video) into patches, one row of
`pixel_values` each, ordered per temporal slice, then per 2 x 2 merge window (windows row-major),
then row-major inside the window; `grid_thw` gives each input's (t, h, w) in patches. The reference
attends within one temporal slice only (its cu_seqlens repeat h*w per slice), so here one row of
the batch is one slice: `vision_rows` cuts `pixel_values` into slices, pads them to a common length
with masked patches, and gives each patch its (row, column) in the slice's patch grid, which
drives the rotary angles. Padded patches are never attended as keys; their own outputs (and the
merged tokens made of them) are garbage that `rows_to_features` drops. Because windows stay
consecutive, merging is a reshape of each row into groups of `merge_area` patches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.attention import attention
from aria_jax.layers import ACTIVATIONS, LayerNorm, Linear, apply_rope, default_kernel_init, param_with_axes
from aria_jax.qwen2_vl.config import Qwen2VLVisionConfig
from aria_jax.weights import LINEAR, LINEAR_2_IN, RESHAPE, Layout, _linear, _norm, _rules

# The rotary base of the vision tower (Qwen2-VL's vision config has no field for it).
VISION_ROPE_THETA = 10000.0
LAYER_NORM_EPS = 1e-6


def rotary_cos_sin(positions: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """(N, P, 2) (row, column) -> cos, sin of (N, P, head_dim) in float32.

    head_dim / 4 frequencies are shared by both axes: the first quarter of the angles follows the
    row, the second the column, and the second half repeats the first (rotate_half pairs i with
    i + head_dim / 2)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (head_dim // 2)))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, P, 2, quarter)
    angles = angles.reshape(*positions.shape[:-1], 2 * quarter)  # row angles, then column angles
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class VisionAttention(nn.Module):
    config: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # One fused projection, as the hub stores it: output index = (q/k/v, head, head_dim).
        qkv = Linear((3, cfg.num_heads, cfg.head_dim), ("embed", "qkv", "heads", "head_dim"), name="qkv", **kw)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, P, heads, head_dim)
        # The rotary runs in float32 whatever the compute dtype, as the reference's does.
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(self.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(self.dtype)
        out = attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask)
        return Linear((cfg.embed_dim,), ("heads", "head_dim", "embed"), in_dims=2, name="proj", **kw)(out)


class VisionBlock(nn.Module):
    config: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, key_mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + VisionAttention(cfg, name="attn", **kw)(
            LayerNorm(LAYER_NORM_EPS, name="norm1", **kw)(x), cos, sin, key_mask
        )
        hidden = LayerNorm(LAYER_NORM_EPS, name="norm2", **kw)(x)
        hidden = Linear((cfg.mlp_width,), ("embed", "mlp"), name="fc1", **kw)(hidden)
        hidden = Linear((cfg.embed_dim,), ("mlp", "embed"), name="fc2", **kw)(ACTIVATIONS[cfg.hidden_act](hidden))
        return x + hidden, None


class PatchMerger(nn.Module):
    """(N, P, embed_dim) -> (N, P / merge_area, hidden_size): LayerNorm, each window's patches side
    by side, then Linear, exact (erf) GELU, Linear."""

    config: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, num_patches, _ = x.shape
        x = LayerNorm(LAYER_NORM_EPS, name="ln_q", **kw)(x)
        merged_width = cfg.embed_dim * cfg.merge_area
        x = x.reshape(n, num_patches // cfg.merge_area, merged_width)
        x = Linear((merged_width,), ("merged_embed", "mlp"), name="fc1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear((cfg.hidden_size,), ("mlp", "embed_text"), name="fc2", **kw)(x)


class Qwen2VLVisionTower(nn.Module):
    """patches (N, P, patch_features), patch_mask (N, P) bool, positions (N, P, 2) int32 ->
    merged features (N, P / merge_area, hidden_size). P must be a multiple of merge_area."""

    config: Qwen2VLVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # recompute block activations in the backward pass (training memory)

    @nn.compact
    def __call__(self, patches: jax.Array, patch_mask: jax.Array, positions: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, num_patches, features = patches.shape
        if features != cfg.patch_features or num_patches % cfg.merge_area:
            raise ValueError(
                f"patches of shape {patches.shape}: expected (rows, a multiple of {cfg.merge_area}, "
                f"{cfg.patch_features})"
            )
        c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
        with jax.named_scope("patch_embed"):
            # A Conv3d whose stride is its kernel, over inputs the size of the kernel: a matmul.
            kernel = param_with_axes(
                self,
                "patch_kernel",
                default_kernel_init,
                (c, t, p, p, cfg.embed_dim),
                ("channels", "frames", "patch", "patch", "embed"),
                self.param_dtype,
            )
            pixels = patches.astype(self.dtype).reshape(n, num_patches, c, t, p, p)
            x = jnp.einsum("nsctij,ctijd->nsd", pixels, kernel.astype(self.dtype))
        cos, sin = rotary_cos_sin(positions, cfg.head_dim)
        key_mask = patch_mask.astype(bool)
        x, _ = nn.scan(
            nn.remat(VisionBlock, prevent_cse=False) if self.remat else VisionBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers", **kw)(x, cos, sin, key_mask)
        return PatchMerger(cfg, name="merger", **kw)(x)


# ----------------------------------------------------------------------------- host side


def window_positions(height: int, width: int, merge_size: int) -> np.ndarray:
    """(height * width, 2) int32 (row, column) of each patch of one slice, in the processor's order:
    merge windows row-major, and row-major inside each window."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    grid = np.stack([rows, cols], axis=-1).reshape(height // merge_size, merge_size, width // merge_size, merge_size, 2)
    return grid.transpose(0, 2, 1, 3, 4).reshape(height * width, 2).astype(np.int32)


def default_row_length(longest: int, merge_area: int) -> int:
    """The longest slice rounded up to a power of two of merge windows. Each distinct row length
    compiles the tower anew; powers of two bound the lengths seen to log2 of the largest, at the
    cost of at most twice the padding."""
    windows = -(-longest // merge_area)
    return merge_area * (1 << max(windows - 1, 0).bit_length())


def vision_rows(
    pixel_values: np.ndarray, grid_thw: np.ndarray, merge_size: int, pad_to: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The processor's flattened patches -> one padded row per temporal slice.

    pixel_values (sum of t*h*w, patch_features), grid_thw (n, 3) -> patches (N, P, patch_features),
    patch_mask (N, P) bool, positions (N, P, 2) int32, counts (N,) int: the merged tokens of each
    row (h*w / merge_area), N = sum of t. P is `pad_to` (a multiple of merge_area, at least the
    longest slice) or `default_row_length`.
    """
    pixel_values = np.asarray(pixel_values)
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    merge_area = merge_size**2
    if (grid_thw[:, 1:] % merge_size).any():
        raise ValueError(f"grid_thw {grid_thw.tolist()}: heights and widths must be multiples of {merge_size}")
    total = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    if pixel_values.ndim != 2 or pixel_values.shape[0] != total:
        raise ValueError(f"pixel_values of shape {pixel_values.shape}: grid_thw says {total} patches")
    slices = [(int(h), int(w)) for t, h, w in grid_thw for _ in range(int(t))]
    longest = max(h * w for h, w in slices)
    length = default_row_length(longest, merge_area) if pad_to is None else pad_to
    if length < longest or length % merge_area:
        raise ValueError(f"pad_to={pad_to}: must be a multiple of {merge_area} and at least {longest}")

    patches = np.zeros((len(slices), length, pixel_values.shape[1]), pixel_values.dtype)
    patch_mask = np.zeros((len(slices), length), bool)
    positions = np.zeros((len(slices), length, 2), np.int32)
    start = 0
    for row, (h, w) in enumerate(slices):
        patches[row, : h * w] = pixel_values[start : start + h * w]
        patch_mask[row, : h * w] = True
        positions[row, : h * w] = window_positions(h, w, merge_size)
        start += h * w
    counts = np.array([h * w // merge_area for h, w in slices], np.int64)
    return patches, patch_mask, positions, counts


def feature_index(counts, row_length: int) -> np.ndarray:
    """Indices into the (N * row_length) flattened merged rows of the valid tokens, in order."""
    counts = np.asarray(counts, np.int64)
    return np.concatenate([row * row_length + np.arange(count) for row, count in enumerate(counts)])


def rows_to_features(merged: jax.Array, counts) -> jax.Array:
    """(N, L, hidden_size) merged rows -> (sum of counts, hidden_size): every row's valid tokens,
    concatenated in the processor's order (what replaces the image / video pad tokens). `counts`
    must be concrete (host values); `merged` may be traced."""
    n, row_length, hidden = merged.shape
    return jnp.take(merged.reshape(n * row_length, hidden), feature_index(counts, row_length), axis=0)


# ----------------------------------------------------------------------------- hub keys

CONV3D = Layout("conv3d")  # the patch embedding's (out, in, kt, kh, kw) -> ours (in, kt, kh, kw, out)
_BLOCK = "blocks.{i}."
# Hub (transformers 4.45) naming; transformers 5 keeps the same names under `model.visual.`.
VISION_RULES = _rules(
    "visual.",
    ("visual",),
    [
        ("patch_embed.proj.weight", ("patch_kernel",), CONV3D),
        *_norm(_BLOCK + "norm1", ("layers", "norm1")),
        *_norm(_BLOCK + "norm2", ("layers", "norm2")),
        *_linear(_BLOCK + "attn.qkv", ("layers", "attn", "qkv"), bias=RESHAPE),
        *_linear(_BLOCK + "attn.proj", ("layers", "attn", "proj"), LINEAR_2_IN),
        *_linear(_BLOCK + "mlp.fc1", ("layers", "fc1")),
        *_linear(_BLOCK + "mlp.fc2", ("layers", "fc2")),
        *_norm("merger.ln_q", ("merger", "ln_q")),
        *_linear("merger.mlp.0", ("merger", "fc1"), LINEAR),
        *_linear("merger.mlp.2", ("merger", "fc2"), LINEAR),
    ],
)
