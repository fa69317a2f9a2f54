"""The KV cache: static shape, donated between steps. Prefill fills it stacked over layers, as its
layer scan makes it; decode holds it as one buffer pair per layer. Heads come before positions,
(batch, kv_heads, length, head_dim): the layout the TPU's attention matmuls read, so that the
compiler keeps no transposed copy of the cache.

On a mesh, a layer's cache splits its rows over the batch axes, its heads over `tensor`, and its
positions over the axes left (`cache_layout`), so that no chip holds or reads all of it
(`context_parallel`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from aria_jax.config import AriaTextConfig
from aria_jax.sharding import mesh_axes_for, mesh_axis_size

# Prompt and cache lengths are rounded up to these so that new requests reuse compiled code.
MIN_BUCKET = 16
LARGE_BUCKET_STEP = 1024
# Longer prompts are prefilled this many tokens at a time (activation memory bounded by the
# chunk, not the prompt); a multiple of LARGE_BUCKET_STEP.
PREFILL_CHUNK = 4096


def bucket_length(length: int) -> int:
    """Powers of two from 16 up to 1024, then multiples of 1024."""
    if length <= LARGE_BUCKET_STEP:
        return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())
    return -(-length // LARGE_BUCKET_STEP) * LARGE_BUCKET_STEP


def prompt_bucket(length: int, chunk: int = PREFILL_CHUNK) -> int:
    """A prompt's padded length: its bucket, rounded up to whole chunks past one chunk."""
    bucket = bucket_length(length)
    return bucket if bucket <= chunk else -(-bucket // chunk) * chunk


def init_cache(config: AriaTextConfig, batch: int, length: int, dtype) -> dict:
    """{"k", "v"}: zeros of (layers, batch, kv_heads, length, head_dim)."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


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


def pinned(layer_cache: dict | None) -> dict | None:
    """A layer's {"k", "v"} in the layout decode keeps it (`cache_layout`). Pinned wherever it
    enters or leaves a layer, so that the compiler never picks another layout for a loop's copy
    of it and moves the whole cache every step."""
    mesh = jax.sharding.get_abstract_mesh()
    if layer_cache is None or mesh.empty:
        return layer_cache
    return {name: jax.lax.with_sharding_constraint(kv, cache_layout(kv.shape, mesh))
            for name, kv in layer_cache.items()}


def init_per_layer(config: AriaTextConfig, batch: int, length: int, dtype) -> list[dict]:
    """One {"k", "v"} of zeros (batch, kv_heads, length, head_dim) per layer."""
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]


def per_layer(cache: dict, length: int) -> list[dict]:
    """A stacked cache (of a prompt) as one {"k", "v"} of (batch, kv_heads, length, head_dim) per
    layer, zero past the prompt: separate buffers, so that each decode step writes a layer's new
    keys in place and reads no other layer's."""
    extra = length - cache["k"].shape[3]
    return [{name: jnp.pad(kv[layer], ((0, 0), (0, 0), (0, extra), (0, 0))) for name, kv in cache.items()}
            for layer in range(cache["k"].shape[0])]
