"""Attention over a KV cache whose positions are split over mesh axes (context parallelism).

When a cache's rows and heads cannot be split over the whole mesh (full Aria at batch 1 on
expert=8: 20 heads do not divide over 8), every chip would hold and read all of it (at 64K
positions, ~19 GB in bfloat16). `kv_cache.cache_layout` splits its positions over the axes
left. Each shard writes the new keys and values that fall in its own positions, attends every
query to its own keys only, and the shards' softmax statistics are merged with one max and one
sum over the position axes: per layer, a (queries x heads) max and the (queries x heads x
head_dim) partial outputs cross the mesh, never the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from aria_jax.attention import (
    DENSE_LIMIT,
    cache_kernel_applies,
    decode_applies,
    decode_stats,
    normalized,
    rescaled,
    stats_by_size,
)
from aria_jax.kv_cache import entries, furthest, is_per_row, layer_specs, readable
from aria_jax.sharding import compile_platform


def attention_over_split_cache(
    q: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: dict,
    key_mask: jax.Array,
    cache_index,
    decode_kernel: bool | None = None,
) -> tuple[jax.Array, dict]:
    """Writes `key`, `value` (B, K, T, H) into the layer cache {"k", "v"} (B, K, S, H) (an int8
    cache: rounded, with their scales) at sequence index `cache_index` (or one per row,
    `kv_cache.is_per_row`) and attends q (B, T, N, H),
    causal, to every valid cached key: `Attention`'s cached path, for a cache whose positions the
    current mesh splits. Returns ((B, T, N, H), cache). `decode_kernel`: each shard's statistics
    from the cache kernel (`attention.decode_stats`; default: on TPU for up to
    `attention.DECODE_QUERIES` queries, and on TPU and GPU for a shard's score matrix past
    `attention.DENSE_LIMIT`, a prompt chunk's), else dense or blockwise by size."""
    mesh = jax.sharding.get_abstract_mesh()
    cache_specs = layer_specs(cache, mesh)
    rows, heads, positions, _ = cache_specs["k"]
    num_queries = q.shape[1]

    def local(q, new, cache, key_mask, cache_index):
        length = cache["k"].shape[2]  # this shard's positions
        first = jax.lax.axis_index(positions) * length  # the sequence index of the first
        if is_per_row(cache_index):
            # The new positions that fall here; the others are pushed past the end and dropped.
            at = cache_index[:, None] + jnp.arange(num_queries) - first
            at = jnp.where((at >= 0) & (at < length), at, length)
            cache = {
                name: jax.vmap(lambda row, update, row_at: row.at[:, row_at].set(update, mode="drop"))(
                    buffer, new[name], at
                )
                for name, buffer in cache.items()
            }
        else:
            cache = {name: written_here(buffer, new[name], cache_index - first) for name, buffer in cache.items()}
        keys, values, scales = readable(cache, q.dtype)
        kernel = decode_kernel
        if kernel is None:
            many = num_queries * length > DENSE_LIMIT
            kernel = compile_platform() == "tpu" and decode_applies(num_queries, cache_index)
            kernel = kernel or many and cache_kernel_applies(q.shape[-1])
        if kernel:
            stats = decode_stats(q, keys, values, key_mask, furthest(cache_index), first, scales)
        else:
            stats = stats_by_size(q, keys, values, key_mask, furthest(cache_index), first, scales)
        running_max = stats[0]
        running_sum, out = jax.lax.psum(rescaled(stats, jax.lax.pmax(running_max, positions)), positions)
        return normalized(running_sum, out, q.dtype), cache

    per_head = P(rows, None, heads, None)  # q and the output, (B, T, N, H)
    new_specs = {name: P(rows, heads, *(None,) * (len(spec) - 2)) for name, spec in cache_specs.items()}
    return jax.shard_map(
        local,
        axis_names=set(mesh.axis_names),
        in_specs=(per_head, new_specs, cache_specs, P(rows, positions), P(rows) if is_per_row(cache_index) else P()),
        out_specs=(per_head, cache_specs),
        check_vma=False,
    )(q, entries(cache, key, value), cache, key_mask, jnp.asarray(cache_index, jnp.int32))


def written_here(buffer: jax.Array, new: jax.Array, start) -> jax.Array:
    """buffer (B, K, S, ...) of one shard's S positions with new (B, K, T, ...) written from its
    position `start` (traced; negative or past S where the new positions begin in another
    shard's), only where they fall in this shard. A window of min(T, S) positions is read,
    merged and written back in place: a scatter of every position costs far more on TPU."""
    length, num_new = buffer.shape[2], new.shape[2]
    window = min(num_new, length)
    window_start = jnp.clip(start, 0, length - window)
    # the new positions shifted to the window: new position j lands at window position j + start - window_start
    padding = [(0, 0)] * new.ndim
    padding[2] = (num_new, num_new)
    shift = jnp.clip(window_start - start + num_new, 0, 3 * num_new - window)
    shifted = jax.lax.dynamic_slice_in_dim(jnp.pad(new, padding), shift, window, axis=2)
    offset = window_start - start + jnp.arange(window)  # each window position's index in new
    here = ((offset >= 0) & (offset < num_new)).reshape(window, *(1,) * (new.ndim - 3))
    old = jax.lax.dynamic_slice_in_dim(buffer, window_start, window, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(here, shifted, old), window_start, axis=2)
