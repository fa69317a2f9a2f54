"""Continuous batching on device: a fixed number of decode slots, each holding one request.

A request is prefilled alone (`device_loop.prefill`, batch 1, the cache as long as the slots') and
its cache row, first token and settings are copied into a free slot (`insert`); `decode_slots`
then advances every busy slot a few tokens at once. Each slot keeps its own place in the cache,
position, step count, sampling settings, stop ids and token budget, so a request's tokens do
not depend on what the other slots hold: row r's token goes to cache index `write_index[r]`
(`kv_cache.is_per_row`), and its key mask marks exactly the keys it has written.

Shapes never change (slots, cache length, stop ids), nor, on a mesh, layouts (`laid_out`), so
nothing recompiles while serving; a free or finished slot still computes (garbage, never read)
and writes only its own row.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig
from aria_jax.device_loop import DecodeState, Sampling, decode_params, sample_tokens
from aria_jax.kv_cache import init_per_layer, pinned
from aria_jax.modeling import TextDecoder, unrolled_cached_step
from aria_jax.sharding import constrain


@flax.struct.dataclass
class Slots:
    cache: list[dict]  # per layer {"k", "v"}: (B, K, S, H), B = slots (int8: and scales)
    key_mask: jax.Array  # (B, S) bool: the keys each slot has written
    write_index: jax.Array  # (B,) cache index of each slot's next token
    positions: jax.Array  # (B,) its position id
    last_token: jax.Array  # (B,) the token it feeds next
    generated: jax.Array  # (B,) tokens generated so far
    max_new_tokens: jax.Array  # (B,)
    done: jax.Array  # (B,) bool: free, or finished
    sampling: Sampling  # (B,) each
    stop_ids: jax.Array  # (B, W) int32, -1 padded
    gate_input: jax.Array | None = None  # (B, D) Awaker's router input (`qwen2_vl.awaker`), else None


def empty_slots(
    config: AriaTextConfig,
    num_slots: int,
    cache_length: int,
    stop_id_width: int,
    dtype,
    kv_cache_dtype: str | None = None,
) -> Slots:
    zeros = jnp.zeros((num_slots,), jnp.int32)
    sampling = Sampling(
        jnp.zeros((num_slots,), jnp.float32),
        zeros,
        jnp.ones((num_slots,), jnp.float32),
        jnp.zeros((num_slots, 2), jnp.uint32),
    )
    cache = init_per_layer(config, num_slots, cache_length, dtype, kv_cache_dtype)
    return laid_out(
        Slots(
            cache,
            jnp.zeros((num_slots, cache_length), bool),
            zeros,
            zeros,
            zeros,
            zeros,
            zeros,
            jnp.ones((num_slots,), bool),
            sampling,
            jnp.full((num_slots, stop_id_width), -1, jnp.int32),
            jnp.zeros((num_slots, config.hidden_size), dtype) if config.lora_rank else None,
        )
    )


def laid_out(slots: Slots) -> Slots:
    """The slots in the one layout that every call takes and returns them in: the cache as decode
    keeps it (`kv_cache.pinned`), the key mask split by rows, the rest whole on every device (the
    host reads the tokens generated and the done flags; on several hosts each must hold them).
    Left to the compiler, decode returned the key mask split over the cache's positions, and the
    next insert and decode compiled again for it."""
    per_slot = slots.replace(cache=[], key_mask=None)  # the (B,) and (B, W) fields
    return jax.tree.map(lambda x: constrain(x, *(None,) * x.ndim), per_slot).replace(
        cache=[pinned(layer) for layer in slots.cache], key_mask=constrain(slots.key_mask, "batch", None)
    )


def insert(
    slots: Slots, prefilled: DecodeState, slot, prompt_length, max_new_tokens, sampling: Sampling, stop_ids
) -> Slots:
    """Puts a request prefilled alone (batch 1, `prompt_length` = its padded prompt's length, the
    cache as long as the slots') into slot `slot`. sampling: (1,) each; stop_ids (1, W)."""

    def into_row(buffer, row):
        return jax.lax.dynamic_update_slice_in_dim(buffer, row.astype(buffer.dtype), slot, axis=0)

    cache = [
        {name: into_row(buffer, new[name]) for name, buffer in layer.items()}
        for layer, new in zip(slots.cache, prefilled.cache)
    ]
    cache_length = slots.key_mask.shape[1]
    # The prefilled mask marks every slot past the prompt (its decode relies on causality);
    # a slot's marks only what it has written.
    key_mask = prefilled.key_mask & (jnp.arange(cache_length) < prompt_length)
    first_token = prefilled.tokens[:, :1]
    done = prefilled.done | (max_new_tokens <= 1)
    return laid_out(
        Slots(
            cache,
            into_row(slots.key_mask, key_mask),
            into_row(slots.write_index, jnp.reshape(prompt_length, (1,))),
            into_row(slots.positions, prefilled.first_new_position),
            into_row(slots.last_token, first_token[:, 0]),
            into_row(slots.generated, jnp.ones((1,), jnp.int32)),
            into_row(slots.max_new_tokens, jnp.reshape(max_new_tokens, (1,))),
            into_row(slots.done, done),
            jax.tree.map(into_row, slots.sampling, sampling),
            into_row(slots.stop_ids, stop_ids),
            None if slots.gate_input is None else into_row(slots.gate_input, prefilled.gate_input),
        )
    )


def release(slots: Slots, finished) -> Slots:
    """Marks the slots set in `finished` (B,) done: freed, or stopped by the host."""
    return slots.replace(done=slots.done | finished)


def decode_slots(
    text_params, layers, slots: Slots, finished, *, num_steps: int, config: AriaTextConfig, dtype=jnp.float32
) -> tuple[Slots, jax.Array]:
    """Up to `num_steps` tokens for every busy slot, after marking `finished` (B,) done.
    `text_params, layers`: the decoder's params, or `device_loop.decode_params` of them made once
    (layers None: made here, per call). Returns the slots and the new tokens (B, num_steps), the
    pad id where a slot was done."""
    decoder = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    if layers is None:
        text_params, layers = decode_params(text_params, config, dtype)
    slots = release(slots, finished)
    num_slots, cache_length = slots.key_mask.shape
    new_tokens = jnp.full((num_slots, num_steps), config.pad_id, jnp.int32)

    def keep_going(carry):
        step, slots, _ = carry
        return (step < num_steps) & ~jnp.all(slots.done)

    def one_token(carry):
        step, slots, new_tokens = carry
        busy = ~slots.done
        key_mask = slots.key_mask | (busy[:, None] & (jnp.arange(cache_length) == slots.write_index[:, None]))
        embeds = decoder.apply({"params": text_params}, slots.last_token[:, None], method=TextDecoder.embed)
        logits, cache = unrolled_cached_step(
            text_params,
            embeds,
            key_mask,
            slots.positions[:, None],
            slots.cache,
            slots.write_index,
            config=config,
            dtype=dtype,
            layers=layers,
            gate_input=slots.gate_input,
        )
        token = jnp.where(busy, sample_tokens(logits, slots.generated, slots.sampling), config.pad_id)
        stopped = jnp.any(token[:, None] == slots.stop_ids, axis=-1) | (slots.generated + 1 >= slots.max_new_tokens)
        advance = busy.astype(jnp.int32)
        slots = slots.replace(
            cache=cache,
            key_mask=key_mask,
            write_index=slots.write_index + advance,
            positions=slots.positions + advance,
            last_token=jnp.where(busy, token, slots.last_token),
            generated=slots.generated + advance,
            done=slots.done | (busy & stopped),
        )
        return step + 1, slots, new_tokens.at[:, step].set(token)

    _, slots, new_tokens = jax.lax.while_loop(keep_going, one_token, (jnp.int32(0), slots, new_tokens))
    # the host reads the new tokens after every call (and the slots' counts and flags): whole on
    # every device, so that each host can read them
    return laid_out(slots), constrain(new_tokens, None, None)
