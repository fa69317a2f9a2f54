"""The KV cache: static shape, donated between steps. Prefill fills it stacked over layers, as its
layer scan makes it; decode holds it as one buffer pair per layer. Heads come before positions,
(batch, kv_heads, length, head_dim): the layout the TPU's attention matmuls read, so that the
compiler keeps no transposed copy of the cache.

On a mesh, a layer's cache splits its rows over the batch axes, its heads over `tensor`, and its
positions over the axes left (`cache_layout`), so that no chip holds or reads all of it
(`context_parallel`).

`kv_cache_dtype="int8"` stores keys and values as int8 with a float32 scale per (row, kv head,
position), "k_scale" and "v_scale" of (batch, kv_heads, length) beside "k" and "v": symmetric
absmax over the head dimension, ~half the bytes of a bfloat16 cache ((1 + 4 / head_dim) / 2).
Keys and values are rounded when written; attention reads them back as the cache holds them,
the tokens just written included, and folds the scales into its scores and probabilities
(`attention.attention(..., scales=)`) rather than dequantizing the cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from aria_jax.config import AriaTextConfig
from aria_jax.sharding import mesh_axes_for, mesh_axis_size

# What `generate(kv_cache_dtype=)` takes: None keeps keys and values in the compute dtype.
KV_CACHE_DTYPES = (None, "int8")
INT8_MAX = 127


def check_kv_cache_dtype(kv_cache_dtype) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: must be one of {KV_CACHE_DTYPES}")


def _zeros(leading: tuple[int, ...], config: AriaTextConfig, length: int, dtype, kv_cache_dtype) -> dict:
    """A cache of zeros: "k", "v" of (*leading, kv_heads, length, head_dim), and for int8 their
    scales of (*leading, kv_heads, length)."""
    check_kv_cache_dtype(kv_cache_dtype)
    shape = (*leading, config.num_key_value_heads, length, config.head_dim)
    if kv_cache_dtype is None:
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return {
        "k": jnp.zeros(shape, jnp.int8),
        "v": jnp.zeros(shape, jnp.int8),
        "k_scale": jnp.zeros(shape[:-1], jnp.float32),
        "v_scale": jnp.zeros(shape[:-1], jnp.float32),
    }


def init_cache(config: AriaTextConfig, batch: int, length: int, dtype, kv_cache_dtype=None) -> dict:
    """{"k", "v"} (and their scales for int8): zeros of (layers, batch, kv_heads, length, head_dim)."""
    return _zeros((config.num_hidden_layers, batch), config, length, dtype, kv_cache_dtype)


def holds_int8(layer_cache: dict) -> bool:
    return "k_scale" in layer_cache


def to_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., H) -> int8 (..., H) and float32 scales (...): per vector, symmetric absmax over H,
    scale = absmax / 127 (1 for a zero vector), values round(x / scale) in [-127, 127]."""
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
    values = jnp.clip(jnp.round(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scale


def from_int8(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (values.astype(jnp.float32) * scale[..., None]).astype(dtype)


def entries(layer_cache: dict, key: jax.Array, value: jax.Array) -> dict:
    """New keys and values (B, K, T, H) in the form `layer_cache` stores them: cast to its dtype,
    or int8 with their scales (B, K, T)."""
    if not holds_int8(layer_cache):
        return {"k": key.astype(layer_cache["k"].dtype), "v": value.astype(layer_cache["v"].dtype)}
    (k, k_scale), (v, v_scale) = to_int8(key), to_int8(value)
    return {"k": k, "v": v, "k_scale": k_scale, "v_scale": v_scale}


def readable(layer_cache: dict, dtype) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """(keys, values, scales) as `attention.attention` takes them: keys and values in `dtype`,
    scales None; or int8 keys and values with their (k_scale, v_scale)."""
    if not holds_int8(layer_cache):
        return layer_cache["k"].astype(dtype), layer_cache["v"].astype(dtype), None
    return layer_cache["k"], layer_cache["v"], (layer_cache["k_scale"], layer_cache["v_scale"])


def at_position(index, ndim: int) -> tuple:
    """The start of a write at sequence `index` into a (B, K, S, H) buffer or a (B, K, S) scale."""
    return (0, 0, index) + (0,) * (ndim - 3)


def written(layer_cache: dict, new: dict, index) -> dict:
    """`layer_cache` with the `entries` `new` written at sequence index `index`: one for every
    row, or one per row (B,) (`is_per_row`)."""
    if not is_per_row(index):
        return {
            name: jax.lax.dynamic_update_slice(buffer, new[name], at_position(index, buffer.ndim))
            for name, buffer in layer_cache.items()
        }

    def in_row(buffer, update, row_index):  # a row's (K, S, H) buffer or (K, S) scales
        return jax.lax.dynamic_update_slice(buffer, update, at_position(row_index, buffer.ndim + 1)[1:])

    return {name: jax.vmap(in_row)(buffer, new[name], index) for name, buffer in layer_cache.items()}


def is_per_row(cache_index) -> bool:
    """A cache index is one sequence index for every row, or one per row (B,): continuous
    batching's rows each write their single new token at their own place (`aria_jax.slots`).
    With one per row, the key mask marks for each row only the keys at or before its index,
    so that causal attention may take the furthest row's index for all (`furthest`)."""
    return jnp.ndim(cache_index) == 1


def furthest(cache_index):
    """The sequence index causal attention takes: the cache index, or the largest of one per row."""
    return jnp.max(cache_index) if is_per_row(cache_index) else cache_index


def cache_layout(shape: tuple[int, ...], mesh) -> P:
    """Where a layer's (B, K, S, H) cache lives on `mesh`: P(rows, heads, positions, None). The
    positions split over the axes that rows and heads leave unused (at batch 1 on `expert=8`, all
    of them: 20 heads do not divide over 8). Each decode step then reads 1/n of the cache per
    chip, for two small collectives per layer (the softmax statistics): faster than reading it
    whole at every length tried (full Aria at batch 1 on v5e 2x4: 256 to 5,120 positions, by the
    TPU compiler's estimates)."""
    batch, num_kv_heads, length, _ = shape
    rows, heads = mesh_axes_for("batch", batch, mesh), mesh_axes_for("kv_heads", num_kv_heads, mesh)
    used = set(rows or ()) | set(heads or ())
    free = tuple(a for a in mesh.axis_names if a not in used and mesh_axis_size(mesh, a) > 1)
    split = math.prod(mesh_axis_size(mesh, a) for a in free)
    positions = free if free and length % split == 0 else None
    return P(rows, heads, positions, None)


def positions_split(shape: tuple[int, ...]) -> tuple[str, ...] | None:
    """The mesh axes a layer cache of `shape` splits its positions over, on the current mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else cache_layout(shape, mesh)[2]


def layer_specs(layer_cache: dict, mesh) -> dict:
    """Each buffer's `cache_layout` on `mesh`: scales (B, K, S) are laid out as their keys."""
    layout = cache_layout(layer_cache["k"].shape, mesh)
    return {name: P(*layout[: buffer.ndim]) for name, buffer in layer_cache.items()}


def pinned(layer_cache: dict | None) -> dict | None:
    """A layer's {"k", "v"} (and scales) in the layout decode keeps it (`cache_layout`). Pinned
    wherever it enters or leaves a layer, so that the compiler never picks another layout for a
    loop's copy of it and moves the whole cache every step."""
    mesh = jax.sharding.get_abstract_mesh()
    if layer_cache is None or mesh.empty:
        return layer_cache
    specs = layer_specs(layer_cache, mesh)
    return {name: jax.lax.with_sharding_constraint(buffer, specs[name]) for name, buffer in layer_cache.items()}


def init_per_layer(config: AriaTextConfig, batch: int, length: int, dtype, kv_cache_dtype=None) -> list[dict]:
    """One {"k", "v"} (and scales) of zeros (batch, kv_heads, length, head_dim) per layer."""
    return [_zeros((batch,), config, length, dtype, kv_cache_dtype) for _ in range(config.num_hidden_layers)]


def per_layer(cache: dict, length: int) -> list[dict]:
    """A stacked cache (of a prompt) as one {"k", "v"} (and scales) of (batch, kv_heads, length,
    head_dim) per layer, zero past the prompt: separate buffers, so that each decode step writes a
    layer's new keys in place and reads no other layer's."""
    extra = length - cache["k"].shape[3]

    def padded(buffer):  # positions are axis 2 of a layer's (B, K, S, H) and of its scales (B, K, S)
        return jnp.pad(buffer, [(0, extra) if axis == 2 else (0, 0) for axis in range(buffer.ndim)])

    return [{name: padded(buffer[layer]) for name, buffer in cache.items()} for layer in range(cache["k"].shape[0])]
