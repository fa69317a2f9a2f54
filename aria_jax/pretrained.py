"""User-facing model classes: thin holders of (config, params, compiled functions).

All computation is in the functional modules (`modeling.py`); these classes load weights,
keep them, and call jitted functions with them.
"""

from __future__ import annotations

import functools
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.config import AriaTextConfig, text_config_from_pretrained
from aria_jax.generate import greedy_generate
from aria_jax.modeling import init_text_params, text_forward, text_param_shapes
from aria_jax.weights import HubCheckpoint, load_text_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return jnp.dtype(dtype).type


@flax.struct.dataclass
class CausalLMOutput:
    logits: jax.Array


def param_shapes(config: AriaTextConfig, dtype) -> dict:
    """The params tree as tuples of shapes, for the loader."""
    boxed = text_param_shapes(config, dtype)
    return jax.tree_util.tree_map(lambda p: tuple(p.value.shape), boxed,
                                  is_leaf=lambda x: hasattr(x, "names"))


class AriaTextForCausalLM:
    """The Aria MoE decoder alone: token ids -> logits, and greedy generation."""

    def __init__(self, config: AriaTextConfig, params: dict, dtype="float32"):
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype)
        self._forward = jax.jit(functools.partial(text_forward, config=config, dtype=self.dtype))
        self._generate = jax.jit(
            functools.partial(greedy_generate, config=config, dtype=self.dtype),
            static_argnames=("max_new_tokens",),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype="float32") -> "AriaTextForCausalLM":
        """Loads the text model of a hub-format directory (text-only or multimodal checkpoint,
        transformers or original rhymes-ai naming)."""
        jdtype = resolve_dtype(dtype)
        checkpoint = HubCheckpoint(path)  # refuses pickles and unreadable files before anything else
        config = text_config_from_pretrained(path)
        params = load_text_params(checkpoint, param_shapes(config, jdtype), config.num_hidden_layers, jdtype)
        return cls(config, params, jdtype)

    @classmethod
    def from_random(cls, config: AriaTextConfig, seed: int = 0, dtype="float32") -> "AriaTextForCausalLM":
        jdtype = resolve_dtype(dtype)
        return cls(config, init_text_params(config, jax.random.key(seed), jdtype), jdtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> CausalLMOutput:
        input_ids = _check_ids(input_ids, self.config.vocab_size)
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, np.int32)
        attention_mask = _check_mask(attention_mask, input_ids.shape)
        if position_ids is not None:
            position_ids = np.asarray(position_ids, np.int32)
        return CausalLMOutput(self._forward(self.params, input_ids=input_ids,
                                            attention_mask=attention_mask, position_ids=position_ids))

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32) -> np.ndarray:
        """Greedy decoding. Returns (B, T + max_new_tokens) int32: the prompt, then new tokens,
        then the pad id once a row has produced an eos id."""
        input_ids = _check_ids(input_ids, self.config.vocab_size)
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, np.int32)
        attention_mask = _check_mask(attention_mask, input_ids.shape)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
        return np.asarray(self._generate(self.params, input_ids, attention_mask, max_new_tokens=max_new_tokens))


def _check_ids(input_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a (batch, length) integer array, got shape {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int32)


def _check_mask(mask, shape) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {shape}")
    return mask.astype(np.int32)
