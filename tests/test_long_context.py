"""Long context: blockwise attention against the dense reference (and every attention over an int8
cache against the dense one over its dequantized keys), chunked prefill against one-shot prefill, float32 parity with transformers on prompts past 8K tokens (text, and many video frames
in a prompt longer than a prefill chunk), and a 48K-token prompt within bounded memory."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import jax
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_multimodal_parity import TinyConfig, build_rows, emulated_crop, noise_image
from test_text_parity import (
    PAD_ID,
    assert_logits_close,
    cumsum_positions,
    left_padded,
    reference_generate,
    reference_logits,
)
from sharding_worker import pallas_kernels
from tiny_models import make_multimodal_model, make_text_model

import aria_jax
import aria_jax.attention as attention_module
from aria_jax.attention import (
    DENSE_LIMIT,
    attention,
    attention_beside_cache,
    blockwise_stats,
    combined,
    dense_stats,
    flash_attention,
    normalized,
)
from aria_jax import cache_attention_gpu
from aria_jax.buckets import PREFILL_CHUNK, prompt_bucket
from aria_jax.cache_attention_gpu import cache_attention_stats_gpu
from aria_jax.decode_attention import decode_attention_stats, head_block
from aria_jax.host_loop import check_request
from aria_jax.kv_cache import from_int8, to_int8
from aria_jax.modeling import IMAGE_GROUP

LONG_CONTEXT = 65536  # max_position_embeddings of the models here (Aria's own context)


# ----------------------------------------------------------------------------- attention


def random_qkv(seed, batch, queries, keys, heads, kv_heads, head_dim):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, queries, heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, kv_heads, keys, head_dim)).astype(np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def rows_with_a_key(key_mask: np.ndarray, queries: int, query_offset) -> np.ndarray:
    """(B, T) True where a query has at least one key to attend (the others are garbage by contract)."""
    allowed = np.repeat(key_mask[:, None, :], queries, axis=1)
    if query_offset is not None:
        allowed &= np.arange(key_mask.shape[1])[None, None, :] <= (query_offset + np.arange(queries))[None, :, None]
    return allowed.any(axis=-1)


# (queries, keys, heads, kv_heads, query offset (None: not causal), block): blocks that do and do
# not divide the lengths, GQA, a chunk of queries in the middle of a cache, and one decode query.
ATTENTION_CASES = {
    "causal_self": (37, 37, 4, 4, 0, 8),
    "not_causal_gqa": (37, 37, 6, 2, None, 8),
    "chunk_in_cache": (16, 64, 4, 2, 40, 8),
    "chunk_at_cache_start": (16, 64, 4, 1, 0, 16),
    "one_query": (1, 64, 4, 1, 20, 16),
    "one_block": (20, 20, 2, 2, 0, 512),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_blockwise_attention_is_the_dense_reference(case):
    queries, keys, heads, kv_heads, offset, block = ATTENTION_CASES[case]
    q, k, v = random_qkv(0, 2, queries, keys, heads, kv_heads, 8)
    key_mask = np.ones((2, keys), bool)
    key_mask[0, :11] = False  # a left-padded row
    key_mask[1, keys // 2 : keys // 2 + 5] = False  # a hole inside a key block
    dense = attention(q, k, v, jnp.asarray(key_mask), offset, implementation="dense")
    blockwise = attention(q, k, v, jnp.asarray(key_mask), offset, implementation="blockwise", block=block)
    assert np.isfinite(np.asarray(blockwise)).all()
    keep = rows_with_a_key(key_mask, queries, offset)
    assert keep.any()
    np.testing.assert_allclose(np.asarray(blockwise)[keep], np.asarray(dense)[keep], rtol=0, atol=2e-6)


@pytest.mark.parametrize("queries,keys,offset", [(1, 64, 20), (8, 64, 40), (1, 48, 47), (2, 2600, 2000)])
def test_attention_beside_cache_is_attention_over_the_written_cache(queries, keys, offset, monkeypatch):
    """One CPU device's decode: attending to the cache before the new keys and to the new keys
    apart, then writing them, is attending to the cache with them written. The cache's stale
    slots at and past the new keys hold values that must not count. Last case: past DENSE_LIMIT
    (lowered here), the cached keys go blockwise."""
    q, k, v = random_qkv(3, 2, queries, keys, 4, 2, 8)
    new_k, new_v = (x[:, :, offset : offset + queries] for x in random_qkv(4, 2, keys, keys, 4, 2, 8)[1:])
    key_mask = np.ones((2, keys), bool)
    key_mask[0, :11] = False
    key_mask[1, 5:9] = False
    cache = {"k": k, "v": v}
    if keys > 1000:
        monkeypatch.setattr(attention_module, "DENSE_LIMIT", queries * keys - 1)
    out, written = jax.jit(attention_beside_cache)(q, new_k, new_v, cache, jnp.asarray(key_mask), offset)
    expected_k, expected_v = (x.at[:, :, offset : offset + queries].set(new) for x, new in ((k, new_k), (v, new_v)))
    np.testing.assert_array_equal(np.asarray(written["k"]), np.asarray(expected_k))
    np.testing.assert_array_equal(np.asarray(written["v"]), np.asarray(expected_v))
    dense = attention(q, expected_k, expected_v, jnp.asarray(key_mask), offset, implementation="dense")
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=0, atol=2e-6)


# (queries = keys, heads, kv_heads, causal): whole tiles and a length the kernel pads to them.
FLASH_CASES = {
    "causal_gqa": (256, 4, 2, True),
    "not_causal": (256, 2, 2, False),
    "causal_padded_to_tiles": (200, 2, 1, True),
}


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attention_is_the_dense_reference(case, kernel):
    """The Pallas TPU kernel in Pallas' TPU interpreter, and Triton's in Pallas' interpreter, on
    this CPU. Triton's kernel takes one segment id for queries and keys: a pad's own row is
    garbage there (as the rows of queries with no key to attend are in every implementation)."""
    length, heads, kv_heads, causal = FLASH_CASES[case]
    q, k, v = random_qkv(2, 2, length, length, heads, kv_heads, 16)
    key_mask = np.ones((2, length), bool)
    key_mask[0, :37] = False
    offset = 0 if causal else None
    dense = attention(q, k, v, jnp.asarray(key_mask), offset, implementation="dense")
    if kernel == "tpu":
        with pltpu.force_tpu_interpret_mode():
            flash = attention(q, k, v, jnp.asarray(key_mask), offset, implementation="flash")
    else:
        flash = flash_attention(q, k, v, jnp.asarray(key_mask), causal, kernel="gpu")
    assert np.isfinite(np.asarray(flash)).all()
    keep = rows_with_a_key(key_mask, length, offset) & (key_mask if kernel == "gpu" else True)
    np.testing.assert_allclose(np.asarray(flash)[keep], np.asarray(dense)[keep], rtol=0, atol=2e-6)


def test_long_attention_compiled_for_a_gpu_runs_triton_kernels(monkeypatch):
    """Past DENSE_LIMIT, attention traced for a GPU runs our Triton kernels, not the blockwise loop:
    self-attention of a whole sequence Triton's flash kernel, a chunk of queries at an offset into
    the keys (a prompt's later chunk against the cache) the cache kernel."""
    monkeypatch.setattr(attention_module, "compile_platform", lambda: "gpu")
    monkeypatch.setattr(attention_module, "compiling_for_gpu", lambda: True)
    length = 2 * int(DENSE_LIMIT**0.5)
    q, k, v = random_qkv(3, 1, length, length, 2, 2, 16)
    key_mask = jnp.ones((1, length), bool)

    def kernels(queries, offset):
        jaxpr = jax.make_jaxpr(lambda q, k, v, m: attention(q, k, v, m, offset))(q[:, :queries], k, v, key_mask)
        return pallas_kernels(jaxpr.jaxpr)

    assert kernels(length, 0) == ["mha_forward"]
    assert kernels(length, None) == ["mha_forward"]
    assert kernels(length // 2, length // 2) == ["cache_attention_stats_gpu"]


def test_flash_attention_refuses_a_chunk_of_queries():
    q, k, v = random_qkv(3, 1, 128, 256, 2, 2, 8)
    with pytest.raises(ValueError, match="whole sequence: not 128 queries at offset 128 over 256 keys"):
        attention(q, k, v, jnp.ones((1, 256), bool), 128, implementation="flash")


# (batch, queries, heads, kv_heads, keys, head_dim, query index, key offset): one key block and
# several (blocks of 512 past the last query skipped), a last block running past the cache, GQA, a
# few queries, keys at an offset (a shard of a split cache), and a shard wholly in the queries'
# future.
DECODE_CASES = {
    "one_block": (2, 1, 4, 4, 40, 8, 30, 0),
    "blocks_skipped_gqa": (3, 1, 6, 2, 2048, 16, 700, 0),
    "last_block_past_the_cache": (2, 1, 4, 2, 1100, 16, 1090, 0),
    "few_queries": (2, 3, 4, 2, 1100, 16, 600, 0),
    "shard_at_offset": (2, 2, 4, 4, 600, 32, 1300, 1024),
    "shard_in_the_future": (2, 1, 2, 2, 256, 8, 100, 256),
    # A prompt's chunk: its rows in blocks of QUERY_BLOCK, early blocks skipping later keys
    # (600 queries x 3 in a group: 1,800 rows, blocks across the groups' boundaries)
    "chunk_in_query_blocks_gqa": (1, 600, 6, 2, 1500, 16, 900, 0),
    "chunk_at_a_shard_offset": (2, 300, 2, 2, 700, 8, 1000, 512),
}


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_kernel_statistics_are_the_dense_ones(case, kernel):
    """The cache kernels in Pallas' interpreters on this CPU, TPU's and Triton's: the softmax
    statistics of queries against a cache, left padding and a hole in the keys included.
    Triton's matmuls take heads of 16 at least."""
    batch, queries, heads, kv_heads, keys, head_dim, query_index, key_offset = DECODE_CASES[case]
    if kernel == "gpu":
        head_dim = max(head_dim, cache_attention_gpu.MIN_TILE)
    q, k, v = random_qkv(5, batch, queries, keys, heads, kv_heads, head_dim)
    key_mask = np.ones((batch, keys), bool)
    key_mask[0, :37] = False
    key_mask[-1, keys // 2 : keys // 2 + 9] = False
    if kernel == "gpu":
        got = cache_attention_stats_gpu(q, k, v, jnp.asarray(key_mask), query_index, key_offset, interpret=True)
    else:
        with pltpu.force_tpu_interpret_mode():
            got = decode_attention_stats(q, k, v, jnp.asarray(key_mask), query_index, key_offset)
    want = dense_stats(q, k, v, jnp.asarray(key_mask), query_index, key_offset)
    got_max, got_sum, got_values = map(np.asarray, got)
    want_max, want_sum, want_values = map(np.asarray, want)
    assert got_max.shape == want_max.shape and got_values.shape == want_values.shape
    attended = np.isfinite(want_max)
    assert (case == "shard_in_the_future") == (not attended.any())
    np.testing.assert_array_equal(np.isfinite(got_max), attended)  # no key: max -inf, sum 0
    np.testing.assert_array_equal(got_sum[~attended], 0)
    # Scores to float32 precision relative to their size (the kernel scales q before the dot in
    # its dtype's order of summation; a chunk's 3,600 rows reach scores near 5, 2 ulp apart).
    score_error = 1e-6 * max(1.0, np.abs(want_max[attended]).max(initial=0))
    np.testing.assert_allclose(got_max[attended], want_max[attended], rtol=0, atol=score_error)
    np.testing.assert_allclose(got_sum, want_sum, rtol=max(1e-6, score_error))
    np.testing.assert_allclose(got_values, want_values, rtol=0, atol=1e-5 * np.abs(want_values).max())


@pytest.mark.parametrize("queries", [2, 290])
def test_decode_attention_is_the_dense_reference(queries):
    """`attention(implementation="decode")`, which `auto` picks on TPU for up to 8 causal queries,
    and for a prompt's chunk against the cache (its queries in blocks of rows)."""
    q, k, v = random_qkv(6, 2, queries, 300, 6, 2, 16)
    key_mask = np.ones((2, 300), bool)
    key_mask[0, :50] = False
    dense = attention(q, k, v, jnp.asarray(key_mask), 300 - queries, implementation="dense")
    decode = attention(q, k, v, jnp.asarray(key_mask), 300 - queries, implementation="decode")
    keep = rows_with_a_key(key_mask, queries, 300 - queries)
    np.testing.assert_allclose(np.asarray(decode)[keep], np.asarray(dense)[keep], rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="causal queries at an offset into the keys: not query_offset=None"):
        attention(*random_qkv(6, 1, 9, 300, 2, 2, 8), jnp.ones((1, 300), bool), None, implementation="decode")


@pytest.mark.parametrize("case", ["causal_self", "not_causal_gqa", "chunk_in_cache", "one_query"])
@pytest.mark.parametrize(
    "stats", [dense_stats, functools.partial(blockwise_stats, block=8)], ids=["dense", "blockwise"]
)
def test_statistics_of_key_slices_combine_into_attention(case, stats):
    """What a cache split over positions does (`context_parallel`): the softmax statistics of
    three slices of the keys, each at its offset, merged, are attention over all of them."""
    queries, keys, heads, kv_heads, offset, _ = ATTENTION_CASES[case]
    q, k, v = random_qkv(4, 2, queries, keys, heads, kv_heads, 8)
    key_mask = np.ones((2, keys), bool)
    key_mask[0, :11] = False
    dense = attention(q, k, v, jnp.asarray(key_mask), offset, implementation="dense")
    cuts = [0, keys // 3, keys // 2, keys]
    parts = [
        stats(q, k[:, :, a:b], v[:, :, a:b], jnp.asarray(key_mask[:, a:b]), offset, a) for a, b in zip(cuts, cuts[1:])
    ]
    _, merged_sum, merged_values = combined(parts)
    merged = normalized(merged_sum, merged_values, q.dtype)
    keep = rows_with_a_key(key_mask, queries, offset)
    np.testing.assert_allclose(np.asarray(merged)[keep], np.asarray(dense)[keep], rtol=0, atol=2e-6)


def test_blockwise_attention_gradients_are_the_dense_ones():
    q, k, v = random_qkv(1, 2, 45, 45, 4, 2, 8)
    key_mask = jnp.asarray(np.arange(45)[None, :] >= np.array([[0], [6]]))

    def loss(implementation):
        def of(q, k, v):
            out = attention(q, k, v, key_mask, 0, implementation=implementation, block=16)
            return jnp.sum(jnp.where(key_mask[:, :, None, None], out, 0.0) ** 2)

        return jax.grad(of, argnums=(0, 1, 2))(q, k, v)

    for name, dense, blockwise in zip("qkv", loss("dense"), loss("blockwise")):
        np.testing.assert_allclose(np.asarray(blockwise), np.asarray(dense), rtol=0, atol=1e-5, err_msg=name)


def test_tritons_flash_attention_gradients_are_the_dense_ones():
    """Fine-tuning on a GPU goes through Triton's backward kernels (in Pallas' interpreter here),
    with GQA, a left-padded row and a length padded to whole tiles."""
    q, k, v = random_qkv(1, 2, 200, 200, 4, 2, 16)
    key_mask = jnp.asarray(np.arange(200)[None, :] >= np.array([[0], [23]]))

    def loss(attend):
        def of(q, k, v):
            return jnp.sum(jnp.where(key_mask[:, :, None, None], attend(q, k, v), 0.0) ** 2)

        return jax.grad(of, argnums=(0, 1, 2))(q, k, v)

    dense = loss(lambda q, k, v: attention(q, k, v, key_mask, 0, implementation="dense"))
    flash = loss(lambda q, k, v: flash_attention(q, k, v, key_mask, causal=True, kernel="gpu"))
    for name, expected, got in zip("qkv", dense, flash):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5, err_msg=name)


def test_auto_attention_is_blockwise_past_the_dense_limit():
    """The auto choice never builds a score matrix past DENSE_LIMIT pairs: the compiled program's
    largest buffer stays far below one (B, N, T, S) float32 score matrix."""
    length = 2 * int(DENSE_LIMIT**0.5)
    q, k, v = (
        jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32),
        *(jax.ShapeDtypeStruct((1, 2, length, 8), jnp.float32) for _ in range(2)),
    )
    key_mask = jax.ShapeDtypeStruct((1, length), bool)
    compiled = jax.jit(lambda q, k, v, m: attention(q, k, v, m, 0)).lower(q, k, v, key_mask).compile()
    scores_bytes = 2 * length * length * 4
    assert compiled.memory_analysis().temp_size_in_bytes < scores_bytes / 16


# ----------------------------------------------------------------------------- an int8 cache


def test_int8_rounding_per_vector():
    """Symmetric absmax over the last axis: each vector's largest number is +-127 steps exactly,
    every number within half a step, a zero vector scale 1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 50, 16)).astype(np.float32) * rng.uniform(0.01, 100, size=(2, 3, 50, 1))
    x[0, 1, 7] = 0.0
    values, scale = map(np.asarray, to_int8(jnp.asarray(x)))
    assert values.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (2, 3, 50)
    assert scale[0, 1, 7] == 1.0 and not values[0, 1, 7].any()
    nonzero = np.abs(x).max(axis=-1) > 0
    np.testing.assert_allclose(scale[nonzero], np.abs(x).max(axis=-1)[nonzero] / 127, rtol=1e-6)
    np.testing.assert_array_equal(np.abs(values).max(axis=-1)[nonzero], 127)
    error = np.abs(np.asarray(from_int8(jnp.asarray(values), jnp.asarray(scale), jnp.float32)) - x)
    assert (error <= scale[..., None] * (0.5 + 1e-5)).all()


def int8_cache(k, v):
    """Random keys and values as an int8 cache holds them, and the float keys and values it gives back."""
    (k8, k_scale), (v8, v_scale) = to_int8(k), to_int8(v)
    return (k8, v8, (k_scale, v_scale)), (from_int8(k8, k_scale, jnp.float32), from_int8(v8, v_scale, jnp.float32))


@pytest.mark.parametrize(
    "implementation, case",
    [
        ("dense", "chunk_in_cache"),
        ("dense", "one_query"),
        ("blockwise", "chunk_in_cache"),
        ("blockwise", "not_causal_gqa"),
        ("decode", "one_query"),
        ("flash", "causal_self"),
    ],
)
def test_attention_over_an_int8_cache_is_dense_attention_over_its_dequantized_keys(implementation, case):
    """`attention(..., scales=)` folds the key scales into the scores and the value scales into the
    probabilities (or, for the flash kernel, which takes float keys, dequantizes them): the
    attention of the keys and values the cache holds. The kernels run in Pallas' interpreter."""
    queries, keys, heads, kv_heads, offset, block = ATTENTION_CASES[case]
    if implementation == "flash":
        queries = keys = 128
    q, k, v = random_qkv(9, 2, queries, keys, heads, kv_heads, 16)
    (k8, v8, scales), (k_held, v_held) = int8_cache(k, v)
    key_mask = np.ones((2, keys), bool)
    key_mask[0, :11] = False
    key_mask[1, keys // 2 : keys // 2 + 5] = False
    expected = attention(q, k_held, v_held, jnp.asarray(key_mask), offset, implementation="dense")
    with pltpu.force_tpu_interpret_mode():
        got = attention(
            q, k8, v8, jnp.asarray(key_mask), offset, scales=scales, implementation=implementation, block=block
        )
    keep = rows_with_a_key(key_mask, queries, offset)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(expected)[keep], rtol=0, atol=2e-6)
    # And it is not the attention of the unrounded keys: the test sees the rounding.
    unrounded = attention(q, k, v, jnp.asarray(key_mask), offset, implementation="dense")
    assert np.abs(np.asarray(got) - np.asarray(unrounded))[keep].max() > 1e-3


# The decode kernel's cases (see DECODE_CASES), and 24 kv heads of 128: the int8 kernel takes
# blocks of 8 heads (its scales' blocks need a multiple of 8 heads, or all of them).
INT8_DECODE_CASES = {**DECODE_CASES, "blocks_of_8_heads": (1, 1, 24, 24, 600, 128, 580, 0)}


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(INT8_DECODE_CASES))
def test_decode_kernel_statistics_over_an_int8_cache(case, kernel):
    """The cache kernels, TPU's and Triton's, reading an int8 cache and its scales (Pallas'
    interpreters): the dense statistics over the keys and values the cache holds, a last block
    past the cache included."""
    batch, queries, heads, kv_heads, keys, head_dim, query_index, key_offset = INT8_DECODE_CASES[case]
    if kernel == "gpu":
        head_dim = max(head_dim, cache_attention_gpu.MIN_TILE)
    q, k, v = random_qkv(5, batch, queries, keys, heads, kv_heads, head_dim)
    (k8, v8, scales), (k_held, v_held) = int8_cache(k, v)
    if case == "last_block_past_the_cache":  # what a block reads past the cache must not count
        scales = tuple(jnp.concatenate([s, jnp.full_like(s, jnp.nan)], axis=2)[:, :, :keys] for s in scales)
    if case == "blocks_of_8_heads":
        assert head_block(kv_heads, 512, head_dim, 1, scaled=True) == 8
    key_mask = np.ones((batch, keys), bool)
    key_mask[0, :37] = False
    key_mask[-1, keys // 2 : keys // 2 + 9] = False
    if kernel == "gpu":
        got = cache_attention_stats_gpu(q, k8, v8, jnp.asarray(key_mask), query_index, key_offset, scales, True)
    else:
        with pltpu.force_tpu_interpret_mode():
            got = decode_attention_stats(q, k8, v8, jnp.asarray(key_mask), query_index, key_offset, scales)
    want = dense_stats(q, k_held, v_held, jnp.asarray(key_mask), query_index, key_offset)
    got_max, got_sum, got_values = map(np.asarray, got)
    want_max, want_sum, want_values = map(np.asarray, want)
    attended = np.isfinite(want_max)
    np.testing.assert_array_equal(np.isfinite(got_max), attended)
    # Scores to float32 precision relative to their size (the kernel scales q . k after the dot,
    # dense_stats before it); exp turns their absolute error into the sum's relative one.
    score_error = 1e-6 * max(1.0, np.abs(want_max[attended]).max(initial=0))
    np.testing.assert_allclose(got_max[attended], want_max[attended], rtol=0, atol=score_error)
    np.testing.assert_allclose(got_sum, want_sum, rtol=score_error)
    np.testing.assert_allclose(got_values, want_values, rtol=0, atol=1e-5 * max(1.0, np.abs(want_values).max()))


@pytest.mark.parametrize("queries,keys,offset", [(1, 64, 20), (8, 64, 40), (2, 2600, 2000)])
def test_attention_beside_an_int8_cache_is_attention_over_the_written_cache(queries, keys, offset, monkeypatch):
    """One CPU device's decode over an int8 cache: the new keys and values are rounded and written
    with their scales, and attended as written, the query's own included."""
    q, k, v = random_qkv(3, 2, queries, keys, 4, 2, 8)
    new_k, new_v = (x[:, :, offset : offset + queries] for x in random_qkv(4, 2, keys, keys, 4, 2, 8)[1:])
    (k8, v8, (k_scale, v_scale)), _ = int8_cache(k, v)
    cache = {"k": k8, "v": v8, "k_scale": k_scale, "v_scale": v_scale}
    key_mask = np.ones((2, keys), bool)
    key_mask[0, :11] = False
    key_mask[1, 5:9] = False
    if keys > 1000:
        monkeypatch.setattr(attention_module, "DENSE_LIMIT", queries * keys - 1)
    out, written = jax.jit(attention_beside_cache)(q, new_k, new_v, cache, jnp.asarray(key_mask), offset)
    expected = dict(cache)
    for name, new in (("k", new_k), ("v", new_v)):
        values, scale = to_int8(new)
        expected[name] = expected[name].at[:, :, offset : offset + queries].set(values)
        expected[f"{name}_scale"] = expected[f"{name}_scale"].at[:, :, offset : offset + queries].set(scale)
    for name in expected:
        np.testing.assert_array_equal(np.asarray(written[name]), np.asarray(expected[name]), err_msg=name)
    k_held, v_held = (from_int8(expected[n], expected[f"{n}_scale"], jnp.float32) for n in "kv")
    dense = attention(q, k_held, v_held, jnp.asarray(key_mask), offset, implementation="dense")
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- text, 8K+ tokens

TEXT_CONFIG = dict(
    vocab_size=128,
    hidden_size=48,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=16,
    moe_num_experts=6,
    moe_topk=2,
    moe_num_shared_experts=2,
    num_hidden_layers=2,
    max_position_embeddings=LONG_CONTEXT,
)
LONG_LENGTHS = (8300, 6100)  # past 8K; the bucket (9216) is prefilled in 3 chunks of PREFILL_CHUNK


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("long_text")
    make_text_model(directory, seed=7, **TEXT_CONFIG)
    reference = transformers.AriaTextForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    return reference, aria_jax.AriaTextForCausalLM.from_pretrained(directory, dtype="float32")


def test_8k_prompt_logits_match_transformers(text_pair):
    reference, ours = text_pair
    ids, mask = left_padded(11, LONG_LENGTHS, TEXT_CONFIG["vocab_size"])
    assert max(LONG_LENGTHS) ** 2 > DENSE_LIMIT  # ours attends blockwise here
    expected = reference_logits(reference, ids, mask, cumsum_positions(mask))
    assert_logits_close(ours(ids, mask).logits, expected, mask, "8K left-padded")


def test_8k_prompt_greedy_generate_matches_transformers(text_pair):
    """generate() prefills this prompt in chunks (prompt_bucket > PREFILL_CHUNK)."""
    reference, ours = text_pair
    ids, mask = left_padded(12, LONG_LENGTHS, TEXT_CONFIG["vocab_size"])
    assert prompt_bucket(ids.shape[1]) > PREFILL_CHUNK
    np.testing.assert_array_equal(
        ours.generate(ids, mask, max_new_tokens=20), reference_generate(reference, ids, mask, PAD_ID)
    )


def test_chunked_prefill_is_one_shot_prefill(text_pair):
    """The same prompt prefilled in chunks of 1024 and at once: the same first token, and the same
    KV cache up to float32 rounding (the chunks attend densely, the whole prompt blockwise, so
    sums run in another order) relative to the cache's scale."""
    _, ours = text_pair
    ids, mask = left_padded(13, (3000, 2200), TEXT_CONFIG["vocab_size"])
    padded_ids, padded_mask = ours.generator.pad_prompt(ids.astype(np.int32), mask.astype(np.int32))
    assert padded_ids.shape[1] == 3072
    embeds = ours._embedded(padded_ids)
    request = check_request(
        2,
        ids.shape[1],
        ours.config,
        None,
        max_new_tokens=4,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings=None,
    )

    def prefilled(chunk):
        return ours.generator.prefill(
            ours.text_params,
            embeds,
            jnp.asarray(padded_mask),
            request.sampling,
            request.stop_ids,
            cache_length=4096,
            max_new_tokens_capacity=1024,
            chunk=chunk,
        )

    chunked, one_shot = prefilled(1024), prefilled(4096)
    np.testing.assert_array_equal(np.asarray(chunked.tokens), np.asarray(one_shot.tokens))
    real = padded_mask.astype(bool)
    for layer, (a, b) in enumerate(zip(chunked.cache, one_shot.cache)):
        for name in ("k", "v"):
            a_real, b_real = (np.asarray(x[name])[:, :, :3072].swapaxes(1, 2)[real] for x in (a, b))
            scale = max(1.0, float(np.abs(b_real).max()))
            np.testing.assert_allclose(a_real, b_real, rtol=0, atol=1e-5 * scale, err_msg=f"layer {layer} {name}")


# ----------------------------------------------------------------------------- many video frames

VIDEO = TinyConfig(
    vision=dict(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=48, image_size=140, patch_size=14
    ),
    projector={25: 4, 100: 6},
    text=dict(TEXT_CONFIG, hidden_size=32, num_attention_heads=4, num_key_value_heads=4),
)
FRAMES = 2 * IMAGE_GROUP + 5  # the vision tower takes them in groups, the last one partial


def test_long_video_prompt_matches_transformers(tmp_path):
    """Many half-size frames between text, in a prompt longer than a prefill chunk: logits and
    greedy tokens as transformers'."""
    make_multimodal_model(
        tmp_path, seed=31, vision_overrides=VIDEO.vision, projector_patch_to_query=VIDEO.projector, **VIDEO.text
    )
    reference = transformers.AriaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    ours = aria_jax.AriaForConditionalGeneration.from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(3)
    frames = []
    for index in range(FRAMES):
        pixels, pixel_mask = emulated_crop(noise_image(100 + index, 90, 60), 70, 20)
        frames += [(f"frame{index}", pixels[None], pixel_mask[None]), 3]
    queries = {70: VIDEO.projector[25]}
    ids, mask, pixel_values, pixel_mask, _ = build_rows(rng, [[2500, *frames, 2000]], queries, 128)
    assert prompt_bucket(ids.shape[1]) > PREFILL_CHUNK and len(pixel_values) == FRAMES

    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(cumsum_positions(mask)),
            pixel_values=torch.from_numpy(pixel_values),
            pixel_mask=torch.from_numpy(pixel_mask),
        ).logits.numpy()
        expected_tokens = reference.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixel_values),
            pixel_mask=torch.from_numpy(pixel_mask),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=PAD_ID,
            eos_token_id=PAD_ID,
        ).numpy()
    logits = ours(ids, mask, pixel_values=pixel_values, pixel_mask=pixel_mask).logits
    assert_logits_close(logits, expected, mask, f"{FRAMES} frames")
    tokens = ours.generate(ids, mask, pixel_values=pixel_values, pixel_mask=pixel_mask, max_new_tokens=12)
    np.testing.assert_array_equal(tokens[:, : expected_tokens.shape[1]], expected_tokens)


# ----------------------------------------------------------------------------- 48K tokens

PROMPT_48K = 48 * 1024
MEMORY_LIMIT_GB = 6.0


def test_48k_prompt_generates_in_bounded_memory(tmp_path):
    """A 48K-token prompt, generated in a fresh process: its peak resident memory stays under
    MEMORY_LIMIT_GB: one dense score matrix of this prompt would be 2 heads x 48K x 48K x 4 bytes,
    18.8 GB."""
    make_text_model(
        tmp_path,
        seed=5,
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        moe_num_experts=4,
        moe_topk=2,
        num_hidden_layers=1,
        max_position_embeddings=LONG_CONTEXT,
    )
    script = textwrap.dedent(f"""
        import json
        import numpy as np
        import aria_jax
        from aria_jax.resident_memory import peak_resident_bytes
        model = aria_jax.AriaTextForCausalLM.from_pretrained({str(tmp_path)!r}, dtype="float32")
        ids = np.random.default_rng(0).integers(3, 128, size=(1, {PROMPT_48K}))
        tokens = model.generate(ids, max_new_tokens=6)[0, {PROMPT_48K}:]
        peak_gb = peak_resident_bytes() / 1e9
        print(json.dumps({{"tokens": tokens.tolist(), "peak_gb": peak_gb}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"48K prompt: peak {result['peak_gb']:.2f} GB, tokens {result['tokens']}")
    assert result["peak_gb"] < MEMORY_LIMIT_GB
    assert len(result["tokens"]) == 6 and all(0 <= t < 128 for t in result["tokens"])
