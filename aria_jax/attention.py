"""Attention kernels (MHA and GQA, a key mask, causal or not): the dense reference, a blockwise
(online softmax) version for long sequences, the TPU flash-attention kernel, and the softmax
statistics that let attention over disjoint sets of keys be merged (`context_parallel`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_flash
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.sharding import PartitionSpec as P

from aria_jax import cache_attention_gpu
from aria_jax.decode_attention import decode_attention_stats
from aria_jax.kv_cache import entries, from_int8, furthest, is_per_row, readable, written
from aria_jax.sharding import compile_platform, compiling_for_gpu, mesh_axes_for, pallas_interpreted

# Score matrices up to this many (query, key) pairs per row and head are built whole; past it,
# attention runs over key blocks (memory O(queries x block), not O(queries x keys)).
DENSE_LIMIT = 2048 * 2048
BLOCK = 512
# XLA:CPU: up to CPU_DENSE_QUERIES queries, one score matrix; more, in tiles that stay in cache
# (`cpu_tiles`).
CPU_DENSE_QUERIES = 256
CPU_WHOLE_KEYS = 2048
FLASH_BLOCK = 128  # the flash kernels' smallest tile: sequences are padded to a multiple of it
# The scope the GPU flash kernel runs in: XLA:GPU's Triton calls carry no cost estimate, and
# `hlo_cost` reads the kernel's flops from the shapes of a call in this scope.
GPU_FLASH_SCOPE = "gpu_flash_attention"
# Causal queries per row up to which TPU runs the decode kernel (`decode_attention`): a decode
# step's, with room for speculative ones.
DECODE_QUERIES = 8
IMPLEMENTATIONS = ("auto", "dense", "blockwise", "flash", "decode")


def causal_padding_mask(key_mask: jax.Array, query_offset=0, num_queries: int | None = None) -> jax.Array:
    """(B, S) 1/0 key mask -> (B, T, S) bool, True where query t (at sequence index
    `query_offset + t`) may attend key s: s is not in its future and is not padding."""
    num_keys = key_mask.shape[1]
    num_queries = num_keys if num_queries is None else num_queries
    query_index = query_offset + jnp.arange(num_queries)
    causal = jnp.arange(num_keys)[None, :] <= query_index[:, None]
    return causal[None, :, :] & key_mask.astype(bool)[:, None, :]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_offset=None,
    *,
    scales: tuple[jax.Array, jax.Array] | None = None,
    implementation: str = "auto",
    block: int = BLOCK,
) -> jax.Array:
    """q: (B, T, N, H); k, v: (B, K, S, H) with K dividing N; key_mask (B, S) True = a key to attend.
    `scales`: (k_scale, v_scale) of (B, K, S) when k and v are an int8 cache's (`kv_cache.to_int8`):
    key s of head k is k[:, k, s] * k_scale[:, k, s], and so are the values.

    `query_offset` None: every query may attend every valid key (vision tower, projector). An int
    or traced scalar: causal, query t sits at sequence index `query_offset + t` of the keys.
    "dense" builds the whole score matrix (`dot_product_attention`, the reference); "blockwise"
    runs an online softmax over key blocks; "flash" is a Pallas flash attention kernel, TPU's or,
    compiled for a GPU, Triton's (`flash_attention`: self-attention of a whole sequence only);
    "decode" is a Pallas kernel for causal queries against a KV cache, a decode step's few or a
    chunk's many in blocks: TPU's or, compiled for a GPU, Triton's (`decode_stats`; Pallas'
    interpreter elsewhere). "auto": on TPU, decode for up to DECODE_QUERIES causal queries; on
    CPU, blockwise past CPU_DENSE_QUERIES queries (`cpu_tiles`); else dense for small score
    matrices; past DENSE_LIMIT, flash where it applies on TPU and GPU, else on TPU and GPU decode
    for causal queries (a prompt's chunk at its place in the cache), else blockwise. Rows with no
    key to attend (left pads) are finite garbage in all, and with Triton's flash kernel every
    pad's own row; callers ignore them.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: must be one of {IMPLEMENTATIONS}")
    num_queries, num_keys = q.shape[1], k.shape[2]
    query_block = None
    if implementation == "auto":
        if compile_platform() == "tpu" and decode_applies(num_queries, query_offset):
            implementation = "decode"
        elif compile_platform() == "cpu" and num_queries > CPU_DENSE_QUERIES:
            implementation = "blockwise"
            block, query_block = cpu_tiles(num_keys, causal=query_offset is not None)
        elif num_queries * num_keys <= DENSE_LIMIT:
            implementation = "dense"
        elif (compile_platform() == "tpu" or compiling_for_gpu()) and flash_applies(
            num_queries, num_keys, query_offset
        ):
            implementation = "flash"
        elif query_offset is not None and cache_kernel_applies(q.shape[-1]):
            implementation = "decode"
        else:
            implementation = "blockwise"
    if implementation == "dense":
        if query_offset is None:
            mask = key_mask.astype(bool)[:, None, :]
        else:
            mask = causal_padding_mask(key_mask, query_offset, num_queries)
        return dot_product_attention(q, k, v, mask, scales)
    if implementation == "flash":
        if not flash_applies(num_queries, num_keys, query_offset):
            raise ValueError(
                f"flash attention takes self-attention of a whole sequence: not {num_queries} queries "
                f"at offset {query_offset} over {num_keys} keys"
            )
        if scales is not None:  # a prompt's keys, at prefill: the kernel takes them in the compute dtype
            k, v = from_int8(k, scales[0], q.dtype), from_int8(v, scales[1], q.dtype)
        return flash_attention(q, k, v, key_mask, causal=query_offset is not None)
    if implementation == "decode":
        if query_offset is None:
            raise ValueError("decode attention takes causal queries at an offset into the keys: not query_offset=None")
        return decode_attention(q, k, v, key_mask, query_offset, scales)
    return blockwise_attention(q, k, v, key_mask, query_offset, block, scales, query_block)


def cpu_tiles(num_keys: int, causal: bool) -> tuple[int, int]:
    """(keys, queries) of a `blockwise_attention` tile on XLA:CPU. Not causal, up to
    CPU_WHOLE_KEYS keys: all of them, 128 queries at a time (a vision crop's 1225 patches: 24 ms a
    layer here, one score matrix 56 ms). Else 512 keys by 256 queries, tiles in the queries'
    future skipped (a 2048-token prompt: 98 ms, one score matrix 288 ms)."""
    if not causal and num_keys <= CPU_WHOLE_KEYS:
        return num_keys, 128
    return 512, 256


def decode_applies(num_queries: int, query_offset) -> bool:
    return query_offset is not None and num_queries <= DECODE_QUERIES


def cache_kernel_applies(head_dim: int) -> bool:
    """Whether the platform compiled for has a kernel for causal queries against a KV cache
    (`decode_stats`): TPU's, or Triton's for heads it takes."""
    return compile_platform() == "tpu" or compiling_for_gpu() and cache_attention_gpu.fits(head_dim)


def decode_stats(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, query_offset, key_offset=0, scales=None
):
    """`dense_stats` from a kernel for causal queries against a KV cache: compiled for a GPU,
    Triton's (`cache_attention_gpu`); else the TPU's (`decode_attention_stats`), compiled on TPU,
    elsewhere in Pallas' interpreter."""
    if compiling_for_gpu():
        return cache_attention_gpu.cache_attention_stats_gpu(q, k, v, key_mask, query_offset, key_offset, scales)
    return decode_attention_stats(
        q, k, v, key_mask, query_offset, key_offset, scales, interpret=pallas_interpreted("tpu")
    )


def decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, query_offset, scales=None
) -> jax.Array:
    """The decode kernel with `attention`'s contract. On a mesh it runs under shard_map, rows over
    the batch axes and heads over the head axes, every key whole."""

    def run(q, k, v, key_mask, query_offset, scales):
        _, running_sum, values = decode_stats(q, k, v, key_mask, query_offset, scales=scales)
        return normalized(running_sum, values, q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        rows = mesh_axes_for("batch", q.shape[0], mesh)
        heads = mesh_axes_for("kv_heads", k.shape[1], mesh)  # q's heads, a multiple, split alike
        scale_specs = None if scales is None else (P(rows, heads, None),) * 2
        run = jax.shard_map(
            run,
            axis_names=set(mesh.axis_names),
            in_specs=(
                P(rows, None, heads, None),
                P(rows, heads, None, None),
                P(rows, heads, None, None),
                P(rows, None),
                P(),
                scale_specs,
            ),
            out_specs=P(rows, None, heads, None),
            check_vma=False,
        )
    return run(q, k, v, key_mask, jnp.asarray(query_offset, jnp.int32), scales)


def flash_applies(num_queries: int, num_keys: int, query_offset) -> bool:
    """The kernel's causal mask aligns query t with key t: a whole sequence, not a chunk of one."""
    aligned = query_offset is None or (isinstance(query_offset, int) and query_offset == 0)
    return aligned and num_queries == num_keys


def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, causal: bool, kernel: str | None = None
) -> jax.Array:
    """A Pallas flash attention kernel from jax, with `attention`'s contract: `kernel` "tpu", or
    "gpu" (Triton's; Pallas' interpreter unless compiling for a GPU); default, the GPU's when
    compiling for one, else the TPU's. The sequence is padded to whole tiles with keys that are
    not real (after every query: causality holds). On a mesh the kernel runs under shard_map,
    rows over the batch axes and heads over the head axes (the compiler cannot partition a Pallas
    kernel)."""
    batch, length, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[1]
    extra = -length % FLASH_BLOCK
    kernel = kernel or ("gpu" if compiling_for_gpu() else "tpu")
    q = jnp.pad(q, ((0, 0), (0, extra), (0, 0), (0, 0)))
    k, v = (jnp.pad(jnp.repeat(x, groups, axis=1), ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (k, v))
    key_mask = jnp.pad(key_mask, ((0, 0), (0, extra))).astype(jnp.int32)
    if kernel == "gpu":
        run = functools.partial(_triton_flash, causal=causal, interpret=pallas_interpreted("gpu"))
    else:
        run = functools.partial(_tpu_flash, causal=causal)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        rows, heads = mesh_axes_for("batch", batch, mesh), mesh_axes_for("q_heads", num_heads, mesh)
        # check_vma off: the kernel's output shapes do not say how they vary over the mesh.
        run = jax.shard_map(
            run,
            axis_names=set(mesh.axis_names),
            in_specs=(P(rows, None, heads, None), P(rows, heads, None, None), P(rows, heads, None, None), P(rows)),
            out_specs=P(rows, None, heads, None),
            check_vma=False,
        )
    return run(q, k, v, key_mask)[:, :length]


def _tpu_flash(q, k, v, key_mask, causal):
    """q (B, T, N, H); k, v (B, N, T, H); key_mask (B, T) 1/0 -> (B, T, N, H). Padding is a
    segment id: every query is in segment 1 and a key in 1 if real, 0 if not, so that a query
    attends only real keys (a left pad, with none, averages every key it may see: finite garbage)."""
    length, head_dim = q.shape[1], q.shape[3]
    block = next(b for b in (512, 256, FLASH_BLOCK) if length % b == 0)
    sizes = tpu_flash.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1)
    segments = tpu_flash.SegmentIds(q=jnp.ones(key_mask.shape, jnp.int32), kv=key_mask)
    out = tpu_flash.flash_attention(
        q.swapaxes(1, 2), k, v, segment_ids=segments, causal=causal, sm_scale=head_dim**-0.5, block_sizes=sizes
    )
    return out.swapaxes(1, 2)


def _triton_flash(q, k, v, key_mask, causal, interpret):
    """`_tpu_flash`'s contract, in Triton's kernel (tiles of FLASH_BLOCK forward, its default; it
    has a backward kernel). It takes one segment id per position, for queries and keys alike: a
    real query (1) attends the real keys, a pad (0) the pads before it (itself at least: finite
    garbage)."""
    head_dim = q.shape[3]
    with jax.named_scope(GPU_FLASH_SCOPE + ("_causal" if causal else "")):
        return gpu_flash.mha(
            q, k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask, sm_scale=head_dim**-0.5, causal=causal, interpret=interpret
        )


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scales=None) -> jax.Array:
    """q: (B, T, N, H); k, v: (B, K, S, H) with K dividing N; mask: (B, T or 1, S) True = attend;
    `scales` as `attention`'s.

    Query head n reads key/value head n // (N / K). Scale H^-0.5, softmax in float32. A query
    row with no key to attend (a left pad) yields finite garbage rather than NaN; callers
    ignore those rows.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if scales is not None:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k) * (head_dim**-0.5)
    if scales is not None:
        scores = scores.astype(jnp.float32) * per_key(scales[0])
    scores = jnp.where(mask[:, None, None, :, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if scales is not None:
        probs = probs * per_key(scales[1])
    out = jnp.einsum("bkgts,bksh->btkgh", probs.astype(v.dtype), v)
    return out.reshape(batch, length, num_heads, head_dim)


def per_key(scale: jax.Array) -> jax.Array:
    """A quantized cache's (B, K, S) scales, broadcast against (B, K, G, T, S) scores."""
    return scale[:, :, None, None, :]


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_offset,
    block: int,
    scales=None,
    query_block: int | None = None,
):
    """`attention` one (query block, key block) tile at a time, with a running max and sum per
    query (the online softmax of flash attention); `block` keys and `query_block` (by default
    `block`) queries a tile. Tiles wholly in a query block's future are skipped. Each query block
    is rematerialized in the backward pass, so training keeps O(block x keys) per layer rather
    than the score matrix."""
    _, running_sum, values = blockwise_stats(q, k, v, key_mask, query_offset, 0, block, scales, query_block)
    return normalized(running_sum, values, v.dtype if scales is None else q.dtype)


def dense_stats(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, query_offset, key_offset=0, scales=None):
    """The softmax statistics of `attention` over these keys, from the whole score matrix:
    (max, sum, unnormalized values) per query, (B, K, G, T), (B, K, G, T) and (B, K, G, T, H) in
    float32, where G = N / K. Key s sits at sequence index `key_offset + s`; a query with no key
    to attend here has max -inf and sum 0. `combined` merges the statistics of disjoint keys.
    `scales` as `attention`'s."""
    batch, num_queries, num_heads, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    if scales is not None:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    q = q.reshape(batch, num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k).astype(jnp.float32) * (head_dim**-0.5)
    if scales is not None:
        scores = scores * per_key(scales[0])
    allowed = key_mask.astype(bool)[:, None, None, None, :]
    if query_offset is not None:
        allowed = allowed & ((key_offset + jnp.arange(num_keys)) <= (query_offset + jnp.arange(num_queries))[:, None])
    scores = jnp.where(allowed, scores, -jnp.inf)
    return _stats_of(scores, v, None if scales is None else scales[1])


def _stats_of(scores: jax.Array, v: jax.Array, v_scale: jax.Array | None = None):
    """(max, sum, probabilities @ values) of (B, K, G, T, S) scores, -inf where not allowed.
    `v_scale` (B, K, S): quantized values' scales, which weigh the probabilities instead."""
    running_max = scores.max(axis=-1)
    safe_max = jnp.where(jnp.isfinite(running_max), running_max, 0.0)  # rows with no key
    probs = jnp.exp(scores - safe_max[..., None])
    weights = probs if v_scale is None else probs * per_key(v_scale)
    values = jnp.einsum("bkgqs,bksh->bkgqh", weights.astype(v.dtype), v).astype(jnp.float32)
    return running_max, probs.sum(axis=-1), values


def rescaled(stats, new_max):
    """One key set's (sum, values), rescaled from its own max to `new_max`, a max over a union of
    key sets that holds it: the union's sum and values are the sums of its sets' rescaled ones."""
    running_max, running_sum, values = stats
    scale = jnp.exp(running_max - jnp.where(jnp.isfinite(new_max), new_max, 0.0))  # 0 where no key
    return running_sum * scale, values * scale[..., None]


def combined(stats: list[tuple[jax.Array, jax.Array, jax.Array]]):
    """The statistics of the union of disjoint key sets, from each set's."""
    new_max = jnp.stack([m for m, _, _ in stats]).max(axis=0)
    parts = [rescaled(one, new_max) for one in stats]
    return new_max, sum(s for s, _ in parts), sum(values for _, values in parts)


def normalized(running_sum, values, dtype) -> jax.Array:
    """The (B, K, G, T) sum and (B, K, G, T, H) values of the statistics -> attention output
    (B, T, N, H)."""
    batch, num_kv_heads, groups, num_queries, head_dim = values.shape
    out = values / jnp.where(running_sum > 0, running_sum, 1.0)[..., None]
    return jnp.einsum("bkgqh->bqkgh", out).reshape(batch, num_queries, num_kv_heads * groups, head_dim).astype(dtype)


def stats_by_size(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, query_offset, key_offset=0, scales=None
):
    """`dense_stats` up to DENSE_LIMIT (query, key) pairs, else `blockwise_stats` over BLOCK keys."""
    if q.shape[1] * k.shape[2] <= DENSE_LIMIT:
        return dense_stats(q, k, v, key_mask, query_offset, key_offset, scales)
    return blockwise_stats(q, k, v, key_mask, query_offset, key_offset, BLOCK, scales)


def attention_beside_cache(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, key_mask: jax.Array, cache_index
) -> tuple[jax.Array, dict]:
    """Causal attention of q (B, T, N, H) at sequence index `cache_index` (or one per row,
    `kv_cache.is_per_row`) to the valid keys the layer cache {"k", "v"} (B, K, S, H) holds
    before it and to its own k, v (B, K, T, H), which are written to the cache after (an int8
    cache's: rounded as written, and attended so).
    Returns ((B, T, N, H), cache). For one CPU device: XLA:CPU reads a cache just written through
    a second copy of the write, and orders an in-place write after the reads of its buffer only
    where data flows from them, else it copies the buffer: a decode step copied every layer's
    cache several times."""
    num_queries, num_keys = q.shape[1], cache["k"].shape[2]
    row_index = cache_index[:, None] if is_per_row(cache_index) else cache_index
    before = key_mask.astype(bool) & (jnp.arange(num_keys) < row_index)
    keys, values, scales = readable(cache, q.dtype)
    cached = stats_by_size(q, keys, values, before, furthest(cache_index), scales=scales)
    new = entries(cache, k, v)
    if is_per_row(cache_index):
        own_mask = jnp.take_along_axis(key_mask, row_index + jnp.arange(num_queries), axis=1)
    else:
        own_mask = jax.lax.dynamic_slice_in_dim(key_mask, cache_index, num_queries, axis=1)
    own_keys, own_values, own_scales = readable(new, q.dtype)
    own = dense_stats(q, own_keys, own_values, own_mask, 0, 0, own_scales)
    _, running_sum, values = combined([cached, own])
    # Each write at cache_index as data from the reads of its buffer: the sum read the keys (and
    # their scales), the values the values (and no number exceeds infinity, NaN included).
    read_by = {"k": cached[1], "v": cached[2]}
    cache = {
        name: written({name: buffer}, new, cache_index + jnp.any(read_by[name[0]] > jnp.inf).astype(jnp.int32))[name]
        for name, buffer in cache.items()
    }
    return normalized(running_sum, values, q.dtype), cache


def blockwise_stats(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    query_offset,
    key_offset,
    block: int,
    scales=None,
    query_block: int | None = None,
):
    """`dense_stats` one (query block, key block) tile at a time (see `blockwise_attention`)."""
    batch, num_queries, num_heads, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    block_q, block_k = min(query_block or block, num_queries), min(block, num_keys)
    pad_q, pad_k = -num_queries % block_q, -num_keys % block_k
    causal = query_offset is not None
    query_offset = jnp.asarray(0 if query_offset is None else query_offset, jnp.int32)

    # (blocks, B, block, ...): the scans run over the leading axis; padded keys are masked out.
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0))) * jnp.asarray(head_dim**-0.5, q.dtype)
    q_blocks = q.reshape(batch, -1, block_q, num_kv_heads, groups, head_dim).swapaxes(0, 1)
    k_blocks, v_blocks = (
        jnp.moveaxis(
            jnp.pad(x, ((0, 0), (0, 0), (0, pad_k), (0, 0))).reshape(batch, num_kv_heads, -1, block_k, head_dim), 2, 0
        )
        for x in (k, v)
    )
    scale_blocks = (
        None
        if scales is None
        else tuple(
            jnp.moveaxis(jnp.pad(x, ((0, 0), (0, 0), (0, pad_k))).reshape(batch, num_kv_heads, -1, block_k), 2, 0)
            for x in scales
        )
    )
    mask_blocks = jnp.pad(key_mask.astype(bool), ((0, 0), (0, pad_k))).reshape(batch, -1, block_k).swapaxes(0, 1)

    @jax.checkpoint
    def one_query_block(q_start, q_block):
        query_index = query_offset + q_start + jnp.arange(block_q)
        stats_shape = (batch, num_kv_heads, groups, block_q)
        init = (
            jnp.full(stats_shape, -jnp.inf, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )

        def one_key_block(carry, tile):
            k_start, k_block, v_block, mask_block, scale_block = tile
            if scale_block is not None:  # a quantized cache's blocks, converted one at a time
                k_block, v_block = k_block.astype(q_block.dtype), v_block.astype(q_block.dtype)

            def accumulate(carry):
                scores = jnp.einsum("bqkgh,bksh->bkgqs", q_block, k_block).astype(jnp.float32)
                if scale_block is not None:
                    scores = scores * per_key(scale_block[0])
                allowed = mask_block[:, None, None, None, :]
                if causal:
                    allowed = allowed & (k_start + jnp.arange(block_k) <= query_index[:, None])
                v_scale = None if scale_block is None else scale_block[1]
                return combined([carry, _stats_of(jnp.where(allowed, scores, -jnp.inf), v_block, v_scale)])

            if not causal:
                return accumulate(carry), None
            in_the_past = k_start <= query_index[-1]
            return jax.lax.cond(in_the_past, accumulate, lambda carry: carry, carry), None

        k_starts = key_offset + jnp.arange(k_blocks.shape[0], dtype=jnp.int32) * block_k
        return jax.lax.scan(one_key_block, init, (k_starts, k_blocks, v_blocks, mask_blocks, scale_blocks))[0]

    q_starts = jnp.arange(q_blocks.shape[0], dtype=jnp.int32) * block_q
    stats = jax.lax.map(lambda args: one_query_block(*args), (q_starts, q_blocks))  # (blocks, B, K, G, bq, ...)

    def queries_together(x):  # (blocks, B, K, G, bq, ...) -> (B, K, G, T, ...)
        x = jnp.moveaxis(x, 0, 3)
        return x.reshape(*x.shape[:3], -1, *x.shape[5:])[:, :, :, :num_queries]

    return tuple(queries_together(x) for x in stats)
