"""Greedy generation over a fixed-size token buffer.

One compiled loop: each step reruns the decoder over the whole (B, T + N) buffer and takes the
argmax at the newest position. Causal masking makes the not-yet-written tail irrelevant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig
from aria_jax.modeling import text_forward


def greedy_generate(params, input_ids, attention_mask, *, config: AriaTextConfig, max_new_tokens: int,
                    dtype=jnp.float32):
    batch, prompt_len = input_ids.shape
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    eos_ids = jnp.asarray(config.eos_token_id or (-1,), jnp.int32)
    tokens = jnp.concatenate([input_ids, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)

    def step(i, state):
        tokens, done = state
        position = prompt_len + i
        logits = text_forward(params, config, tokens, mask, dtype=dtype)
        next_token = jnp.argmax(logits[:, position - 1], axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, pad_id, next_token)
        tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, position))
        return tokens, done | jnp.isin(next_token, eos_ids)

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((batch,), bool)))
    return tokens
