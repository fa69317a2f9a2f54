"""Attention against a KV cache on GPU (Pallas on Triton): causal queries at an offset into the
keys, a prompt chunk's many or a decode step's few, returning the softmax statistics of
`attention.dense_stats`, the GPU twin of the TPU kernel `decode_attention.decode_attention_stats`
(same arguments, same results).

Why: Triton's flash kernel aligns query t with key t, so a prompt's later chunks (queries at an
offset into the cache) and a shard of a cache split by position (`context_parallel`) attended in
blocks of plain JAX, writing each block's scores to HBM. Here a program per (row, key/value head,
block of the head's query rows) streams the keys and values once through an online softmax in
registers, and stops at the last key any of its queries may see.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from aria_jax.decode_attention import last_query, per_query, rows_by_kv_head
from aria_jax.sharding import pallas_interpreted

MIN_TILE = 16  # Triton's smallest matmul side
QUERY_BLOCK = 128  # a head's query rows per program, at most: each block reads the cache once
KEY_BLOCK = 64  # keys per step
# The scope the kernel runs in: XLA:GPU's Triton calls carry no cost estimate, and `hlo_cost`
# reads the kernel's bytes and flops from the shapes of a call in this scope.
SCOPE = "gpu_cache_attention"


def fits(head_dim: int) -> bool:
    """Whether the kernel takes heads of this size: a power of two, a matmul side for Triton."""
    return head_dim >= MIN_TILE and head_dim & (head_dim - 1) == 0


def _kernel(positions_ref, q_ref, k_ref, v_ref, mask_ref, *refs, num_queries: int, rows: int, scaled: bool):
    """One (row, key/value head, block of query rows): q_ref (R, H); k_ref, v_ref (S, H); mask_ref
    (S,); with `scaled`, the int8 cache's key and value scales (S,) follow the mask."""
    if scaled:
        k_scale_ref, v_scale_ref, *refs = refs
    max_ref, sum_ref, values_ref = refs
    query_rows, head_dim = q_ref.shape
    num_keys = k_ref.shape[0]
    block = pl.program_id(2)
    query_index, key_offset = positions_ref[0], positions_ref[1]
    row = block * query_rows + jnp.arange(query_rows)
    query_position = query_index + row % num_queries
    # keys up to the block's last query's position: none after it is read
    last_position = query_index + last_query(block, num_queries, rows, query_rows)
    num_steps = jnp.clip(
        jax.lax.div(last_position - key_offset + KEY_BLOCK, KEY_BLOCK), 0, pl.cdiv(num_keys, KEY_BLOCK)
    )
    q = q_ref[...]

    def key_step(step, carry):
        running_max, running_sum, values = carry
        first = step * KEY_BLOCK
        keys_here = pl.dslice(first, KEY_BLOCK)
        in_cache = first + jnp.arange(KEY_BLOCK) < num_keys
        cached_keys = plgpu.load(k_ref.at[keys_here, :], mask=in_cache[:, None], other=0).astype(q.dtype)
        cached_values = plgpu.load(v_ref.at[keys_here, :], mask=in_cache[:, None], other=0).astype(q.dtype)
        scores = plgpu.dot(q, cached_keys, trans_b=True)  # (R, KEY_BLOCK), float32
        if scaled:
            scores = scores * plgpu.load(k_scale_ref.at[keys_here], mask=in_cache, other=0.0)[None, :]
        real = plgpu.load(mask_ref.at[keys_here], mask=in_cache, other=0) > 0
        key_position = key_offset + first + jnp.arange(KEY_BLOCK)
        allowed = real[None, :] & (key_position[None, :] <= query_position[:, None])
        scores = jnp.where(allowed, scores, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # no key yet
        probs = jnp.exp(scores - safe_max[:, None])
        rescale = jnp.exp(running_max - safe_max)
        weights = probs
        if scaled:
            weights = probs * plgpu.load(v_scale_ref.at[keys_here], mask=in_cache, other=0.0)[None, :]
        values = rescale[:, None] * values + plgpu.dot(weights.astype(cached_values.dtype), cached_values)
        return new_max, rescale * running_sum + probs.sum(axis=1), values

    init = (
        jnp.full((query_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((query_rows,), jnp.float32),
        jnp.zeros((query_rows, head_dim), jnp.float32),
    )
    running_max, running_sum, values = jax.lax.fori_loop(0, num_steps, key_step, init)
    max_ref[...] = running_max
    sum_ref[...] = running_sum
    values_ref[...] = values


def cache_attention_stats_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_index,
    key_offset=0,
    scales=None,
    interpret: bool | None = None,
):
    """q (B, T, N, H); k, v (B, K, S, H) with K dividing N; key_mask (B, S) True = a key to attend.
    Causal: query t sits at sequence index `query_index + t`, key s at `key_offset + s`. Returns
    `dense_stats`'s (max, sum, values): (B, K, G, T), (B, K, G, T), (B, K, G, T, H) float32,
    G = N / K. `scales`: (k_scale, v_scale) of (B, K, S) for int8 k and v, as
    `attention.attention` takes them. `interpret`: in Pallas' interpreter; by default unless the
    program is compiled for a GPU."""
    batch, num_queries, num_heads, head_dim = q.shape
    _, num_kv_heads, num_keys, _ = k.shape
    if not fits(head_dim):
        raise ValueError(f"cache_attention_stats_gpu: head_dim {head_dim} must be a power of two from {MIN_TILE}")
    if interpret is None:
        interpret = pallas_interpreted("gpu")
    groups = num_heads // num_kv_heads
    rows = groups * num_queries
    query_rows = min(QUERY_BLOCK, max(MIN_TILE, 1 << (rows - 1).bit_length()))
    padded_rows = -(-rows // query_rows) * query_rows
    scaled = scales is not None
    q = rows_by_kv_head(q, num_kv_heads, padded_rows, q.dtype if scaled else k.dtype)
    positions = jnp.stack([jnp.asarray(query_index, jnp.int32), jnp.asarray(key_offset, jnp.int32)])

    whole = pl.BlockSpec((2,), lambda b, h, r: (0,))
    per_rows = pl.BlockSpec((None, None, query_rows, head_dim), lambda b, h, r: (b, h, r, 0))
    cached = pl.BlockSpec((None, None, num_keys, head_dim), lambda b, h, r: (b, h, 0, 0))
    mask = pl.BlockSpec((None, num_keys), lambda b, h, r: (b, 0))
    per_key = pl.BlockSpec((None, None, num_keys), lambda b, h, r: (b, h, 0))
    row_stats = pl.BlockSpec((None, None, query_rows), lambda b, h, r: (b, h, r))
    with jax.named_scope(SCOPE):
        running_max, running_sum, values = pl.pallas_call(
            functools.partial(_kernel, num_queries=num_queries, rows=rows, scaled=scaled),
            grid=(batch, num_kv_heads, padded_rows // query_rows),
            in_specs=[whole, per_rows, cached, cached, mask] + ([per_key, per_key] if scaled else []),
            out_specs=[row_stats, row_stats, per_rows],
            out_shape=[
                jax.ShapeDtypeStruct((batch, num_kv_heads, padded_rows), jnp.float32),
                jax.ShapeDtypeStruct((batch, num_kv_heads, padded_rows), jnp.float32),
                jax.ShapeDtypeStruct((batch, num_kv_heads, padded_rows, head_dim), jnp.float32),
            ],
            # Triton's, not Mosaic GPU's; 8 warps hold a block of 128 rows' values in registers
            compiler_params=plgpu.CompilerParams(num_warps=4 if query_rows < 128 else 8, num_stages=2),
            interpret=interpret,
            name="cache_attention_stats_gpu",
        )(positions, q, k, v, key_mask.astype(jnp.int32), *(scales if scaled else ()))

    return tuple(per_query(x, groups, num_queries) for x in (running_max, running_sum, values))
