"""The host side of generation: request checks, bucketing, the chunked decode loop, stop strings.

The model classes turn a request into prompt embeddings (image features merged in) and hand
them here; `Generator` pads the prompt to a bucket, runs the jitted `prefill` once and the
jitted `decode` loop in chunks, and applies stop strings on decoded text between chunks.
Single-token stop strings (like `<|im_end|>`) are stopped on device, with the eos ids.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import numpy as np

from aria_jax.config import AriaTextConfig
from aria_jax.generate import DecodeState, Sampling, decode, prefill
from aria_jax.kv_cache import bucket_length
from aria_jax.sharding import MeshRunner

DEFAULT_STOP_STRINGS = ("<|im_end|>",)
MAX_STOP_IDS = 8          # stop token ids checked on device (eos ids + single-token stop strings)
GENERATE_CHUNK = 32       # decode steps between host checks of multi-token stop strings
STREAM_CHUNK = 4          # decode steps between streamed pieces (see `Generator.stream`)


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request, in host arrays."""

    max_new_tokens: int
    sampling: Sampling
    stop_ids: np.ndarray            # (MAX_STOP_IDS,) eos ids + single-token stop strings, -1 padded
    stop_texts: tuple[str, ...]     # stop strings checked on decoded text


def check_request(batch: int, prompt_len: int, config: AriaTextConfig, tokenizer, *, max_new_tokens, do_sample,
                  temperature, top_k, top_p, seed, stop_strings) -> Request:
    """Validates the settings (errors name the value) and broadcasts them to one per row."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if prompt_len + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of {config.max_position_embeddings} positions"
        )

    def per_row(name, value, dtype, valid, why):
        values = np.broadcast_to(np.asarray(value, dtype), (batch,)).copy()
        bad = values[~valid(values)]
        if bad.size:
            raise ValueError(f"{name}={bad[0].item()!r}: {why}")
        return values

    temperature = per_row("temperature", temperature, np.float32, lambda t: np.isfinite(t) & (t >= 0), "must be >= 0")
    top_k = per_row("top_k", top_k, np.int32, lambda k: k >= 0, "must be >= 0 (0 turns it off)")
    top_p = per_row("top_p", top_p, np.float32, lambda p: (p > 0) & (p <= 1), "must be in (0, 1]")
    seeds = np.asarray(seed, np.int64)
    seeds = seeds + np.arange(batch) if seeds.ndim == 0 else seeds
    if seeds.shape != (batch,):
        raise ValueError(f"seed must be an int or one per row ({batch}), got shape {seeds.shape}")
    if not do_sample:
        temperature = np.zeros_like(temperature)

    if stop_strings == "default":
        stop_strings = DEFAULT_STOP_STRINGS if tokenizer is not None else ()
    stop_strings = tuple(stop_strings or ())
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the checkpoint's tokenizer; this model was loaded without one")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings={stop_strings!r}: must be non-empty strings")
    sampling = Sampling(temperature, top_k, top_p, (seeds % (2**31)).astype(np.int32))
    return Request(int(max_new_tokens), sampling, *split_stop_strings(stop_strings, config, tokenizer))


def split_stop_strings(stop_strings, config: AriaTextConfig, tokenizer):
    """Single-token stop strings join the eos ids as stop ids (checked on device); the rest are
    checked on decoded text."""
    ids, texts = list(config.eos_token_id), []
    for text in stop_strings:
        encoded = tokenizer.encode(text)
        if len(encoded) == 1 and tokenizer.decode(encoded) == text:
            ids.append(encoded[0])
        else:
            texts.append(text)
    ids = sorted(set(ids))[:MAX_STOP_IDS]
    return np.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), np.int32), tuple(texts)


class Generator:
    """Compiled prefill and decode for one text config and dtype, and the loop that drives them."""

    def __init__(self, config: AriaTextConfig, dtype, tokenizer=None, runner: MeshRunner = MeshRunner()):
        self.config, self.dtype, self.tokenizer = config, dtype, tokenizer
        self.prefill = runner.wrap(jax.jit(
            functools.partial(prefill, config=config, dtype=dtype),
            static_argnames=("cache_length", "max_new_tokens_capacity"),
        ))
        self.decode = runner.wrap(jax.jit(
            functools.partial(decode, config=config, dtype=dtype),
            static_argnames=("prompt_len",), donate_argnames=("state",),
        ))

    def pad_prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Left-pads to the prompt bucket; returns the padded ids and mask."""
        batch, length = input_ids.shape
        extra = bucket_length(length) - length
        ids = np.concatenate([np.full((batch, extra), self.config.pad_id, np.int32), input_ids], axis=1)
        mask = np.concatenate([np.zeros((batch, extra), np.int32), attention_mask], axis=1)
        return ids, mask

    def steps(self, params, prompt_embeds, attention_mask, request: Request, chunk: int,
              max_length: int | None = None) -> Iterator[np.ndarray]:
        """Runs generation, yielding the (B, max_new_tokens) token buffer after prefill and after
        every decode chunk; rows stopped by a stop string are cut after the token completing it."""
        batch, prompt_len, _ = prompt_embeds.shape
        needed = prompt_len + request.max_new_tokens
        cache_length = bucket_length(needed) if max_length is None else max_length
        if cache_length < needed:
            raise ValueError(f"max_length={max_length} is shorter than the prompt bucket + max_new_tokens ({needed})")
        stop_ids, stop_texts = request.stop_ids, request.stop_texts
        state: DecodeState = self.prefill(
            params, prompt_embeds, attention_mask, request.sampling, stop_ids,
            cache_length=cache_length, max_new_tokens_capacity=cache_length - prompt_len,
        )
        while True:
            tokens, step, done = jax.device_get((state.tokens, state.step, state.done))  # one transfer
            tokens = tokens[:, : request.max_new_tokens]
            if stop_texts:
                tokens, done = self._cut_at_stop_strings(tokens, int(step), done, stop_texts)
                state = state.replace(done=done)
            yield tokens
            if step >= request.max_new_tokens or bool(np.all(done)):
                return
            state = self.decode(params, state, chunk, request.max_new_tokens, request.sampling, stop_ids,
                                prompt_len=prompt_len)

    def _cut_at_stop_strings(self, tokens, step, done, stop_texts):
        tokens, done = tokens.copy(), done.copy()
        for row in range(tokens.shape[0]):
            generated = tokens[row, :step]
            if not any(s in self.tokenizer.decode(generated) for s in stop_texts):
                continue
            end = next(k for k in range(1, step + 1)
                       if any(s in self.tokenizer.decode(generated[:k]) for s in stop_texts))
            tokens[row, end:] = self.config.pad_id
            done[row] = True
        return tokens, done

    def generate(self, params, prompt_embeds, attention_mask, request: Request, max_length=None) -> np.ndarray:
        chunk = GENERATE_CHUNK if request.stop_texts else request.max_new_tokens
        for tokens in self.steps(params, prompt_embeds, attention_mask, request, chunk, max_length):
            pass
        return tokens

    def stream(self, params, prompt_embeds, attention_mask, request: Request,
               max_length=None) -> Iterator[str | tuple[str, ...]]:
        """Decoded text as it grows, one piece per STREAM_CHUNK decode steps (a jitted call costs
        more than a loop iteration, so single-step calls would make streaming ~20% slower than
        `generate`; see benchmarks/stream_vs_generate.py): a str for one row, a tuple of str (one
        per row) for a batch. The text ends before a stop string: a tail that could begin one is
        held back until it cannot, as is a partial UTF-8 character until it is complete."""
        if self.tokenizer is None:
            raise ValueError("stream needs the checkpoint's tokenizer; this model was loaded without one")
        stop_ids, stop_texts = set(request.stop_ids.tolist()), request.stop_texts
        batch = prompt_embeds.shape[0]
        shown = [""] * batch

        def new_pieces(tokens, final: bool):
            pieces = []
            for row, row_tokens in enumerate(tokens):
                text = self.answer_text(row_tokens, stop_ids, stop_texts)
                if not final:
                    text = text[: len(text) - possible_stop_start(text, stop_texts)]
                # Byte-fallback text can be rewritten while a UTF-8 sequence is incomplete; what
                # was shown stays shown and only text beyond it is new.
                pieces.append(text[len(shown[row]):])
                shown[row] = max(shown[row], text, key=len)
            return pieces[0] if batch == 1 else tuple(pieces)

        tokens = None
        for tokens in self.steps(params, prompt_embeds, attention_mask, request, STREAM_CHUNK, max_length):
            pieces = new_pieces(tokens, final=False)
            if any(pieces):
                yield pieces
        pieces = new_pieces(tokens, final=True)
        if any(pieces):
            yield pieces

    def answer_text(self, row_tokens, stop_ids: set[int], stop_texts) -> str:
        """The text of one row's generated tokens, up to the first stop id or stop string."""
        ids = [int(t) for t in row_tokens]
        end = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        for stop in stop_texts:
            text = text.split(stop, 1)[0]
        return text.rstrip("\ufffd")


def possible_stop_start(text: str, stop_texts: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that a stop string begins with (0 if none)."""
    return max((k for stop in stop_texts for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
