"""Attention against a KV cache on TPU: a decode step's few queries per row (or a prompt chunk's
many, in blocks of rows) against the whole cache, as a Pallas kernel that reads every cached
key and value once per block of queries.

Why a kernel: XLA compiles a decode step's attention (one query per row and head against S
cached keys) as broadcast-multiply-reduce fusions that the TPU compiler itself estimates at a
fraction of HBM bandwidth, and at batch 32 the cache is a quarter of what a step must read.
Here blocks of keys and values of several heads stream through an online softmax; blocks past
the last position any query of a block may attend are neither computed nor fetched again (their
block index repeats, which the pipeline does not copy twice): a chunk's early queries skip the
keys after them. The result is the softmax statistics
(max, sum, unnormalized values) of `attention.dense_stats`, so that callers normalize them or
merge them over a cache whose positions are split over the mesh.

An int8 cache (`kv_cache.to_int8`) streams through as int8, with its (B, K, S) scales beside
it: a block is converted to the queries' dtype in VMEM, its key scales multiply the scores and
its value scales the probabilities, so HBM is read once, at one byte per number.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

ROW_ALIGN = 8  # sublanes: a head's query rows are padded to a multiple
LANES = 128  # the running max and sum are kept lane-replicated
KEY_BLOCK = 512  # keys per step (a cache of fewer: all of it at once)
QUERY_BLOCK = 256  # a head's query rows per block, when it has more (a prompt chunk's)
BLOCK_BYTES = 1 << 20  # keys (and as many values) per step, over the heads of a block


def head_block(num_kv_heads: int, keys: int, head_dim: int, itemsize: int, scaled: bool = False) -> int:
    """The most heads whose block of keys fits BLOCK_BYTES (at least one), dividing the heads.
    `scaled`: the (heads, keys) blocks of an int8 cache's scales must be all the heads or a
    multiple of 8 of them (the sublanes); all of them when no such block fits."""
    fitting = max(1, BLOCK_BYTES // (keys * head_dim * itemsize))
    allowed = [
        h
        for h in range(1, num_kv_heads + 1)
        if num_kv_heads % h == 0 and h <= fitting and (not scaled or h % ROW_ALIGN == 0)
    ]
    return max(allowed) if allowed else num_kv_heads


def last_query(block, num_queries: int, rows: int, query_rows: int):
    """The latest query (its index t) among a block of a head's rows, ordered (group, t)."""
    first_row = block * query_rows
    last_row = jnp.minimum(first_row + query_rows, rows) - 1
    return jnp.where(first_row // num_queries == last_row // num_queries, last_row % num_queries, num_queries - 1)


def rows_by_kv_head(q: jax.Array, num_kv_heads: int, padded_rows: int, dtype) -> jax.Array:
    """q (B, T, N, H), scaled by H^-0.5 -> (B, K, padded_rows, H): each key/value head's rows are
    its group's queries, (g, t) in order; pads after them are never read."""
    batch, num_queries, num_heads, head_dim = q.shape
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, num_queries, num_kv_heads, groups, head_dim) * jnp.asarray(head_dim**-0.5, q.dtype)
    q = jnp.einsum("btkgh->bkgth", q).reshape(batch, num_kv_heads, groups * num_queries, head_dim)
    return jnp.pad(q, ((0, 0), (0, 0), (0, padded_rows - groups * num_queries), (0, 0))).astype(dtype)


def per_query(x: jax.Array, groups: int, num_queries: int) -> jax.Array:
    """A kernel's (B, K, R, ...) rows -> (B, K, G, T, ...), the pads dropped."""
    return x[:, :, : groups * num_queries].reshape(*x.shape[:2], groups, num_queries, *x.shape[3:])


def _kernel(
    positions_ref,
    q_ref,
    k_ref,
    v_ref,
    mask_ref,
    *refs,
    num_queries: int,
    rows: int,
    keys: int,
    num_keys: int,
    scaled: bool,
):
    """`scaled`: k and v are int8, their scales (heads, keys) follow the mask."""
    if scaled:
        k_scale_ref, v_scale_ref, *refs = refs
    max_ref, sum_ref, values_ref, max_scratch, sum_scratch, values_scratch = refs
    query_block, step = pl.program_id(2), pl.program_id(3)
    query_rows = q_ref.shape[1]
    query_index, key_offset = positions_ref[0], positions_ref[1]
    first_key = key_offset + step * keys
    ragged = num_keys % keys != 0  # the last block runs past the cache: what it reads there is garbage

    @pl.when(step == 0)
    def _():
        max_scratch[...] = jnp.full_like(max_scratch, -jnp.inf)
        sum_scratch[...] = jnp.zeros_like(sum_scratch)
        values_scratch[...] = jnp.zeros_like(values_scratch)

    # some query of the block may attend this block of keys
    @pl.when(first_key <= query_index + last_query(query_block, num_queries, rows, query_rows))
    def _():
        key_position = first_key + jax.lax.broadcasted_iota(jnp.int32, (query_rows, keys), 1)
        row = query_block * query_rows + jax.lax.broadcasted_iota(jnp.int32, (query_rows, keys), 0)
        query_position = query_index + row % num_queries
        allowed = (mask_ref[...] > 0) & (key_position <= query_position)
        if ragged:
            allowed &= key_position < key_offset + num_keys
            in_cache = step * keys + jax.lax.broadcasted_iota(jnp.int32, (keys, 1), 0) < num_keys
            scales_in_cache = step * keys + jax.lax.broadcasted_iota(jnp.int32, (1, keys), 1) < num_keys
        for head in range(q_ref.shape[0]):  # a 2-D matmul per head of the block
            cached_keys = k_ref[head].astype(q_ref.dtype) if scaled else k_ref[head]
            scores = jax.lax.dot_general(
                q_ref[head], cached_keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # (rows, keys)
            if scaled:
                scores = scores * k_scale_ref[head : head + 1, :]
            scores = jnp.where(allowed, scores, -jnp.inf)
            previous_max = max_scratch[head][:, :1]
            new_max = jnp.maximum(previous_max, scores.max(axis=1, keepdims=True))
            safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # no key yet
            probs = jnp.exp(scores - safe_max)
            rescale = jnp.exp(previous_max - safe_max)
            new_sum = rescale * sum_scratch[head][:, :1] + probs.sum(axis=1, keepdims=True)
            if scaled:  # int8 values are finite wherever read; their scales past the cache may not be
                value_scales = v_scale_ref[head : head + 1, :]
                if ragged:
                    value_scales = jnp.where(scales_in_cache, value_scales, 0.0)
                weights, cached_values = probs * value_scales, v_ref[head].astype(q_ref.dtype)
            else:
                weights = probs
                cached_values = jnp.where(in_cache, v_ref[head], 0) if ragged else v_ref[head]  # 0 x NaN is NaN
            values = jnp.dot(weights.astype(cached_values.dtype), cached_values, preferred_element_type=jnp.float32)
            values_scratch[head] = rescale * values_scratch[head] + values
            max_scratch[head] = jnp.broadcast_to(new_max, max_scratch.shape[1:])
            sum_scratch[head] = jnp.broadcast_to(new_sum, sum_scratch.shape[1:])

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        for head in range(q_ref.shape[0]):  # lane 0 of the replicated statistics, as one row
            max_ref[head] = max_scratch[head].T[:1]
            sum_ref[head] = sum_scratch[head].T[:1]
        values_ref[...] = values_scratch[...]


@functools.partial(jax.jit, static_argnames=("interpret",))
def decode_attention_stats(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_index,
    key_offset=0,
    scales=None,
    interpret: bool = False,
):
    """q (B, T, N, H); k, v (B, K, S, H) with K dividing N; key_mask (B, S) True = a key to attend.
    Causal: query t sits at sequence index `query_index + t`, key s at `key_offset + s`. Returns
    `dense_stats`'s (max, sum, values): (B, K, G, T), (B, K, G, T), (B, K, G, T, H) float32,
    G = N / K. `scales`: (k_scale, v_scale) of (B, K, S) for int8 k and v, as
    `attention.attention` takes them. `interpret`: run in Pallas' interpreter, on any platform."""
    batch, num_queries, num_heads, head_dim = q.shape
    _, num_kv_heads, num_keys, _ = k.shape
    groups = num_heads // num_kv_heads
    rows = groups * num_queries
    query_rows = min(QUERY_BLOCK, -(-rows // ROW_ALIGN) * ROW_ALIGN)
    padded_rows = -(-rows // query_rows) * query_rows
    scaled = scales is not None
    q = rows_by_kv_head(q, num_kv_heads, padded_rows, q.dtype if scaled else k.dtype)
    keys = min(KEY_BLOCK, num_keys)
    num_blocks = -(-num_keys // keys)
    heads = head_block(num_kv_heads, keys, head_dim, k.dtype.itemsize, scaled)
    positions = jnp.stack([jnp.asarray(query_index, jnp.int32), jnp.asarray(key_offset, jnp.int32)])

    def key_step(query_block, step, positions):
        """Blocks past the block's last query's position repeat the last one it may attend: not fetched."""
        last_position = positions[0] + last_query(query_block, num_queries, rows, query_rows)
        return jnp.clip(jnp.minimum(step, (last_position - positions[1]) // keys), 0, num_blocks - 1)

    per_head = pl.BlockSpec((None, heads, query_rows, head_dim), lambda b, h, r, s, positions: (b, h, r, 0))
    cached = pl.BlockSpec(
        (None, heads, keys, head_dim), lambda b, h, r, s, positions: (b, h, key_step(r, s, positions), 0)
    )
    mask = pl.BlockSpec((None, 1, keys), lambda b, h, r, s, positions: (b, 0, key_step(r, s, positions)))
    per_key = pl.BlockSpec((None, heads, keys), lambda b, h, r, s, positions: (b, h, key_step(r, s, positions)))
    # a head's statistics as a row (B, K, 1, R): 128 times fewer bytes than lane-replicated columns
    row_stats = pl.BlockSpec((None, heads, 1, query_rows), lambda b, h, r, s, positions: (b, h, 0, r))
    itemsize = k.dtype.itemsize
    cost = pl.CostEstimate(
        flops=4 * batch * num_kv_heads * padded_rows * num_keys * head_dim,
        transcendentals=batch * num_kv_heads * padded_rows * num_keys,
        # the cache once per block of queries (a static count: every block may reach every key)
        bytes_accessed=(padded_rows // query_rows)
        * (2 * k.size * itemsize + batch * num_keys * 4 + (2 * batch * num_kv_heads * num_keys * 4 if scaled else 0))
        + q.size * q.dtype.itemsize
        + batch * num_kv_heads * padded_rows * (head_dim + 2) * 4,
    )
    running_max, running_sum, values = pl.pallas_call(
        functools.partial(_kernel, num_queries=num_queries, rows=rows, keys=keys, num_keys=num_keys, scaled=scaled),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads // heads, padded_rows // query_rows, num_blocks),
            in_specs=[per_head, cached, cached, mask] + ([per_key, per_key] if scaled else []),
            out_specs=[row_stats, row_stats, per_head],
            scratch_shapes=[
                pltpu.VMEM((heads, query_rows, LANES), jnp.float32),
                pltpu.VMEM((heads, query_rows, LANES), jnp.float32),
                pltpu.VMEM((heads, query_rows, head_dim), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_kv_heads, 1, padded_rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, 1, padded_rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, padded_rows, head_dim), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(positions, q, k, v, key_mask.astype(jnp.int32)[:, None, :], *(scales if scaled else ()))

    return tuple(per_query(x, groups, num_queries) for x in (running_max[:, :, 0], running_sum[:, :, 0], values))
