"""Greedy generation over a fixed-size embedding buffer.

One compiled loop: each step reruns the decoder over the whole (B, T + N) buffer and takes the
argmax at the newest position; its embedding is written into the buffer for the next step.
Causal masking makes the not-yet-written tail irrelevant. The prompt's embeddings come in
ready-made, so image features are computed once, before the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig
from aria_jax.modeling import TextDecoder


def greedy_generate(text_params, prompt_ids, prompt_embeds, attention_mask, *, config: AriaTextConfig,
                    max_new_tokens: int, dtype=jnp.float32):
    """prompt_ids (B, T), prompt_embeds (B, T, D), attention_mask (B, T) -> tokens (B, T + N)."""
    decoder = TextDecoder(config, dtype=dtype, param_dtype=dtype)
    batch, prompt_len, hidden = prompt_embeds.shape
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    eos_ids = jnp.asarray(config.eos_token_id or (-1,), jnp.int32)
    tokens = jnp.concatenate([prompt_ids, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)
    embeds = jnp.concatenate([prompt_embeds.astype(dtype), jnp.zeros((batch, max_new_tokens, hidden), dtype)], axis=1)
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)

    def step(i, state):
        tokens, embeds, done = state
        position = prompt_len + i
        logits = decoder.apply({"params": text_params}, attention_mask=mask, inputs_embeds=embeds)
        next_token = jnp.argmax(logits[:, position - 1], axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, pad_id, next_token)
        next_embed = decoder.apply({"params": text_params}, next_token[:, None], method=TextDecoder.embed)
        tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, position))
        embeds = jax.lax.dynamic_update_slice(embeds, next_embed, (0, position, 0))
        return tokens, embeds, done | jnp.isin(next_token, eos_ids)

    tokens, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, embeds, jnp.zeros((batch,), bool)))
    return tokens
