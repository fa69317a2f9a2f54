"""Generation on the device: prefill once, then decode in a jitted loop against a static, donated
KV cache. The host's side (requests, buckets, stop strings) is `host_loop`.

Prefill runs the (left-padded, bucketed) prompt through the decoder, fills the cache and
samples the first new token; a prompt longer than `PREFILL_CHUNK` goes through in chunks, each
attending to the cache the ones before it filled (on one CPU device every prompt takes that
path, as one chunk or several). `decode` then runs up to `num_steps` more tokens in one
`lax.while_loop`; the host calls it in chunks (to check stop strings on decoded text, or one
token at a time to stream). Every sampling setting and `max_new_tokens` are traced arrays, so
changing them never recompiles; only the shapes (batch, prompt bucket, cache length) do.

Token i of a row is written at cache index T + i - 1 (T = prompt bucket) with position id
`first_new_position + i - 1`, where first_new_position is one past the prompt's largest position
(with plain RoPE, the row's count of real prompt tokens), so left padding never shifts positions.

Prefill's `kv_cache_dtype` chooses the cache's form (`kv_cache`: None, or "int8" with scales);
decode takes whatever cache the state holds.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from aria_jax.buckets import PREFILL_CHUNK
from aria_jax.config import AriaTextConfig
from aria_jax.kv_cache import check_kv_cache_dtype, init_cache, init_per_layer, per_layer, pinned
from aria_jax.modeling import (
    STACKED_IN_DECODE,
    TextDecoder,
    default_position_ids,
    layer_params,
    scanned_cached_step,
    unrolled_cached_step,
)
from aria_jax.quantization import dequantize_tree
from aria_jax.sharding import constrain, on_one_cpu


@flax.struct.dataclass
class Sampling:
    """Per-row sampling settings, (B,) each. temperature 0 is greedy; top_k 0 and top_p 1 are off.
    seed: (B, 2) uint32, the [high, low] words of each row's 64-bit seed."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array


@flax.struct.dataclass
class DecodeState:
    cache: list[dict]  # per layer {"k", "v"}: (B, K, S, H) (int8: and their scales, (B, K, S))
    key_mask: jax.Array  # (B, S) bool: prompt tokens, then every generated slot
    # (B,) the position id of each row's first new token: one past the prompt's largest (its
    # count of real tokens, or further with Qwen2-VL's M-RoPE, whose image positions are 2D)
    first_new_position: jax.Array
    tokens: jax.Array  # (B, max_new_tokens) generated so far, pad after a row is done
    done: jax.Array  # (B,) bool
    step: jax.Array  # () tokens generated so far (same for every row)
    # (B, D) what Awaker's routers read at every decode step (`qwen2_vl.awaker`); None for the rest
    gate_input: jax.Array | None = None


def sample_tokens(logits: jax.Array, step: jax.Array, sampling: Sampling) -> jax.Array:
    """logits (B, V) -> token ids (B,). Top-k, then top-p on what is left, then a categorical
    draw from softmax(logits / temperature) with a key from (row seed, step): `step` is the
    index of the token drawn, for every row or one per row (B,). The sorts over the
    vocabulary are skipped when every row is greedy (they cost as much as a layer on CPU)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(
        jnp.any(sampling.temperature > 0), lambda: _sampled_tokens(logits, greedy, step, sampling), lambda: greedy
    )


def _sampled_tokens(logits: jax.Array, greedy: jax.Array, step: jax.Array, sampling: Sampling) -> jax.Array:
    vocab = logits.shape[-1]
    temperature = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)
    scaled = logits / temperature[:, None]

    # One sort serves both filters (a vocabulary sort is slow to compile on TPU): removing the
    # values below the k-th largest keeps the rest in the same order.
    descending = -jnp.sort(-scaled, axis=-1)
    kth_largest = jnp.take_along_axis(descending, jnp.clip(sampling.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    top_k_on = sampling.top_k[:, None] > 0
    scaled = jnp.where(top_k_on & (scaled < kth_largest), -jnp.inf, scaled)
    descending = jnp.where(top_k_on & (descending < kth_largest), -jnp.inf, descending)

    # Nucleus: keep the most likely tokens until their mass reaches top_p (at least one).
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.maximum(jnp.sum(mass_before < sampling.top_p[:, None], axis=-1), 1)
    smallest_kept = jnp.take_along_axis(descending, (kept - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled < smallest_kept, -jnp.inf, scaled)

    keys = jax.vmap(jax.random.fold_in)(seed_keys(sampling.seed), jnp.broadcast_to(step, sampling.temperature.shape))
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(sampling.temperature > 0, sampled, greedy)


def seed_keys(seed: jax.Array) -> jax.Array:
    """One key per row. threefry's key data for a 64-bit seed is its [high, low] words: the key
    `jax.random.key(seed)` builds, so seeds that fit 32 bits keep the samples they always had."""
    return jax.random.wrap_key_data(seed, impl="threefry2x32")


def _replicated(tokens, done):
    """What the host reads after every chunk is kept whole on every device, so that each host
    of a multi-host mesh can read it."""
    return constrain(tokens, None, None), constrain(done, None)


def _finish(token, done, config: AriaTextConfig, stop_ids):
    """Pad for rows already done; a row is done once it has emitted a stop id (eos ids and
    single-token stop strings, padded with -1)."""
    token = jnp.where(done, config.pad_id, token)
    return token, done | jnp.isin(token, stop_ids)


def prefill(
    text_params,
    prompt_embeds,
    attention_mask,
    sampling: Sampling,
    stop_ids,
    position_ids=None,
    gate_inputs=None,
    *,
    config: AriaTextConfig,
    cache_length: int,
    max_new_tokens_capacity: int,
    chunk: int = PREFILL_CHUNK,
    dtype=jnp.float32,
    kv_cache_dtype: str | None = None,
    views=None,
) -> DecodeState:
    """prompt_embeds (B, T, D), attention_mask (B, T) left-padded -> state holding the first token.
    T must be at most `chunk` or a multiple of it (`buckets.prompt_bucket`). `kv_cache_dtype`:
    one of `kv_cache.KV_CACHE_DTYPES`. position_ids: by default the count of real tokens before
    each (B, T); Qwen2-VL's M-RoPE gives (B, T, 3). gate_inputs: Awaker's router inputs (B, D)
    for the prompt and for the decode steps after it (`qwen2_vl.awaker`), or None. `views`:
    `layer_views.layer_views` of the params, or None."""
    check_kv_cache_dtype(kv_cache_dtype)
    batch, prompt_len, _ = prompt_embeds.shape
    chunk = min(chunk, prompt_len)
    if prompt_len % chunk:
        raise ValueError(f"prompt of {prompt_len} tokens: longer than one chunk ({chunk}) and not a multiple of it")
    mask = attention_mask.astype(bool)
    key_mask = jnp.concatenate([mask, jnp.ones((batch, cache_length - prompt_len), bool)], axis=1)
    positions = default_position_ids(mask) if position_ids is None else position_ids
    real = mask.reshape(*mask.shape, *(1,) * (positions.ndim - 2))
    first_new_position = jnp.max(jnp.where(real, positions, -1), axis=tuple(range(1, positions.ndim))) + 1
    # XLA:CPU copies each layer's weights out of the scan's stacks, and its experts once more for
    # their matmuls: there the layers run unrolled (a prompt of one chunk as one chunk), the
    # experts read in the stacks.
    if chunk == prompt_len and not on_one_cpu():
        # The prompt's keys and values stacked, as the layer scan makes them; then each layer's own
        # cache buffer: less memory than scanning over the whole cache and splitting it after.
        logits, prompt_cache = scanned_cached_step(
            text_params,
            prompt_embeds,
            mask,
            positions,
            init_cache(config, batch, prompt_len, dtype, kv_cache_dtype),
            0,
            config=config,
            dtype=dtype,
            dispatch=True,
            gate_input=None if gate_inputs is None else gate_inputs[0],
        )
        cache = per_layer(prompt_cache, cache_length)
    else:
        logits, cache = _prefill_in_chunks(
            text_params,
            prompt_embeds,
            key_mask,
            positions,
            chunk,
            cache_length,
            config,
            dtype,
            kv_cache_dtype,
            None if gate_inputs is None else gate_inputs[0],
            views,
        )
    # As decode lays them out: left to the compiler, they came out split over the positions,
    # and each decode step gathered the whole cache back.
    cache = [pinned(layer) for layer in cache]
    key_mask = constrain(key_mask, "batch", None)
    token, done = _finish(sample_tokens(logits, jnp.int32(0), sampling), jnp.zeros((batch,), bool), config, stop_ids)
    tokens = jnp.full((batch, max_new_tokens_capacity), config.pad_id, jnp.int32).at[:, 0].set(token)
    return DecodeState(
        cache,
        key_mask,
        first_new_position.astype(jnp.int32),
        *_replicated(tokens, done),
        jnp.int32(1),
        None if gate_inputs is None else gate_inputs[1],
    )


def _prefill_in_chunks(
    text_params,
    prompt_embeds,
    key_mask,
    positions,
    chunk: int,
    cache_length: int,
    config: AriaTextConfig,
    dtype,
    kv_cache_dtype,
    gate_input=None,
    layers=None,
):
    """A long prompt `chunk` tokens at a time, each chunk's queries at their place in the cache,
    straight into decode's per-layer cache buffers: the layers run unrolled, as in decode, so the
    cache exists once (a layer scan would stack it, and splitting it into layers would copy it).
    `layers`: each layer's params, if the caller has them apart (`unrolled_cached_step`).
    Returns the last token's logits and the per-layer cache."""
    batch, prompt_len, _ = prompt_embeds.shape
    cache = init_per_layer(config, batch, cache_length, dtype, kv_cache_dtype)

    def one_chunk(cache, start):
        embeds, chunk_positions = (
            jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in (prompt_embeds, positions)
        )
        logits, cache = unrolled_cached_step(
            text_params,
            embeds,
            key_mask,
            chunk_positions,
            cache,
            start,
            config=config,
            dtype=dtype,
            dispatch=True,
            layers=layers,
            gate_input=gate_input,
        )
        return cache, logits

    if prompt_len == chunk:  # at a static place: attention reads only the cache's first `chunk` keys
        cache, logits = one_chunk(cache, 0)
        return logits, cache
    cache, logits = jax.lax.scan(one_chunk, cache, jnp.arange(0, prompt_len, chunk, dtype=jnp.int32))
    return logits[-1], cache


def decode_params(text_params, config: AriaTextConfig, dtype, views=None):
    """(params, layers) for a loop of decode steps: `unrolled_cached_step`'s params and `layers`.

    XLA:CPU copies a layer's weights out of the stacks for each matmul that reads them, at every
    step (a TPU's matmuls read them in place). On one CPU device they are taken out once, ahead
    of the steps, and read where they lie, for one copy of the layers' weights (but the routed
    experts') per call; none given `views` (`layer_views.layer_views`). Quantized ones are
    dequantized there too: XLA:CPU would convert them at every step (its matmuls read float
    operands); the routed experts stay quantized, and each step dequantizes only those its tokens
    chose. Elsewhere: the params as they are, no layers."""
    if not on_one_cpu():
        return text_params, None
    if views is None:
        views = [layer_params(text_params, index) for index in range(config.num_hidden_layers)]
    layers = [dequantize_tree(layer, dtype, keep=STACKED_IN_DECODE) for layer in views]
    return dequantize_tree({name: part for name, part in text_params.items() if name != "layers"}, dtype), layers


def decode(
    text_params,
    state: DecodeState,
    num_steps,
    max_new_tokens,
    sampling: Sampling,
    stop_ids,
    *,
    config: AriaTextConfig,
    prompt_len: int,
    dtype=jnp.float32,
    views=None,
) -> DecodeState:
    """Up to `num_steps` more tokens, stopping early at `max_new_tokens` or when every row is done.
    `views`: `layer_views.layer_views` of the params, or None."""
    decoder = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    last_step = jnp.minimum(state.step + num_steps, max_new_tokens)
    text_params, layers = decode_params(text_params, config, dtype, views)

    def keep_going(state):
        return (state.step < last_step) & ~jnp.all(state.done)

    def one_token(state):
        previous = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # (B, 1)
        embeds = decoder.apply({"params": text_params}, previous, method=TextDecoder.embed)
        positions = (state.first_new_position + state.step - 1)[:, None]
        logits, cache = unrolled_cached_step(
            text_params,
            embeds,
            state.key_mask,
            positions,
            state.cache,
            prompt_len + state.step - 1,
            config=config,
            dtype=dtype,
            layers=layers,
            gate_input=state.gate_input,
        )
        token, done = _finish(sample_tokens(logits, state.step, sampling), state.done, config, stop_ids)
        tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
        return state.replace(cache=cache, tokens=tokens, step=state.step + 1, done=done)

    state = jax.lax.while_loop(keep_going, one_token, state)
    tokens, done = _replicated(state.tokens, state.done)
    return state.replace(tokens=tokens, done=done)
