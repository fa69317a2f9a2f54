"""The host side of generation: request checks, bucketing, the chunked decode loop, stop strings.

The model classes turn a request into prompt embeddings (image features merged in) and hand
them here; `Generator` pads the prompt to a bucket, runs the jitted `prefill` once and the
jitted `decode` loop in chunks (`device_loop`), and applies stop strings on decoded text between chunks.
Single-token stop strings (like `<|im_end|>`) are stopped on device, with the eos ids.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Iterator

import jax
import numpy as np

from aria_jax.buckets import bucket_length, prompt_bucket
from aria_jax.config import AriaTextConfig
from aria_jax.device_loop import DecodeState, Sampling, decode, prefill
from aria_jax.kv_cache import KV_CACHE_DTYPES
from aria_jax.layer_views import layer_views
from aria_jax.sharding import MeshRunner
from aria_jax.tokenizer import TokenizerError, check_text

DEFAULT_STOP_STRINGS = ("<|im_end|>",)
STOP_ID_SLOTS = 8  # stop ids checked on device; a request with more gets the next power of two
SEED_LIMIT = 2**64  # seeds are integers in [0, 2**64), numpy's convention
GENERATE_CHUNK = 32  # decode steps between host checks of multi-token stop strings
STREAM_CHUNK = 4  # decode steps between streamed pieces (see `Generator.stream`)


class RequestError(ValueError):
    """A generation request or model input that cannot be served; the message names the argument
    and its value. Raised before anything runs, so the model stays usable."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request, in host arrays."""

    max_new_tokens: int
    sampling: Sampling
    stop_ids: np.ndarray  # (STOP_ID_SLOTS or more,) eos ids + single-token stop strings, -1 padded
    stop_texts: tuple[str, ...]  # stop strings checked on decoded text
    kv_cache_dtype: str | None = None  # one of kv_cache.KV_CACHE_DTYPES


def check_request(
    batch: int,
    prompt_len: int,
    config: AriaTextConfig,
    tokenizer,
    *,
    max_new_tokens,
    do_sample,
    temperature,
    top_k,
    top_p,
    seed,
    stop_strings,
    kv_cache_dtype=None,
) -> Request:
    """Validates the settings (errors name the value) and broadcasts them to one per row.

    `stop_strings`: a str or strings, stopping in addition to `DEFAULT_STOP_STRINGS` (when there
    is a tokenizer); None: no stop strings at all. The config's eos ids always stop.
    `kv_cache_dtype`: None (keys and values in the compute dtype) or "int8" (`kv_cache`)."""
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise RequestError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if prompt_len + max_new_tokens > config.max_position_embeddings:
        raise RequestError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of {config.max_position_embeddings} positions"
        )
    if not isinstance(do_sample, (bool, np.bool_)):
        raise RequestError(f"do_sample={do_sample!r}: must be True or False")
    # isinstance first: an unhashable or array value must not reach the membership test.
    if not (kv_cache_dtype is None or isinstance(kv_cache_dtype, str)) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise RequestError(
            f"kv_cache_dtype={shorten(kv_cache_dtype)}: must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}"
        )

    def per_row(name, value, dtype, valid, why):
        values, scalar = rows_of(name, value, batch)
        bad = [v for v in values if not valid(v)]
        if bad:
            raise RequestError(f"{name}={bad[0]!r}: {why}")
        return np.asarray(values, dtype), scalar

    temperature, _ = per_row(
        "temperature", temperature, np.float32, lambda t: is_real(t) and 0 <= t < np.inf, "must be a finite number >= 0"
    )
    top_k, _ = per_row(
        "top_k", top_k, object, lambda k: is_integer(k) and k >= 0, "must be an integer >= 0 (0 turns it off)"
    )
    top_k = np.minimum(top_k, config.vocab_size).astype(np.int32)  # any k past the vocabulary keeps every token
    top_p, _ = per_row("top_p", top_p, np.float32, lambda p: is_real(p) and 0 < p <= 1, "must be a number in (0, 1]")
    seeds, scalar = per_row(
        "seed", seed, object, lambda s: is_integer(s) and 0 <= s < SEED_LIMIT, "must be an integer in [0, 2**64)"
    )
    if scalar:
        if seeds[0] + batch - 1 >= SEED_LIMIT:
            raise RequestError(f"seed={seed!r}: row {batch - 1} would use seed + {batch - 1}, past 2**64 - 1")
        seeds = seeds + np.arange(batch)
    if not do_sample:
        temperature = np.zeros_like(temperature)

    stop_strings = check_stop_strings(stop_strings, tokenizer)
    # As 32-bit words: without jax_enable_x64 the device holds no 64-bit integers.
    seed_words = np.asarray([[int(s) >> 32, int(s) & 0xFFFFFFFF] for s in seeds], np.uint32)
    sampling = Sampling(temperature, top_k, top_p, seed_words)
    return Request(int(max_new_tokens), sampling, *split_stop_strings(stop_strings, config, tokenizer), kv_cache_dtype)


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def rows_of(name: str, value, batch: int) -> tuple[list, bool]:
    """A single value or one per row -> (`batch` values, whether it was a single value)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        array = None
    if array is None or array.shape not in ((), (batch,)):
        raise RequestError(f"{name}={shorten(value)}: must be a single value or one per row ({batch})")
    # One by one: numpy would turn [7, np.uint64(9)] into floats.
    values = [np.asarray(v).item() for v in value] if isinstance(value, (list, tuple)) else array.reshape(-1).tolist()
    return (values * batch, True) if array.ndim == 0 else (values, False)


def shorten(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_stop_strings(stop_strings, tokenizer) -> tuple[str, ...]:
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    try:
        stop_strings = tuple(stop_strings)
    except TypeError:
        raise RequestError(f"stop_strings={shorten(stop_strings)}: must be a str, a list of str, or None") from None
    for text in stop_strings:
        if not isinstance(text, str) or not text:
            raise RequestError(f"stop_strings contains {shorten(text)}: stop strings must be non-empty text")
        try:
            check_text(text, "a stop string")
        except TokenizerError as err:
            raise RequestError(str(err)) from None
    if stop_strings and tokenizer is None:
        raise RequestError(
            f"stop_strings={shorten(list(stop_strings))} need the checkpoint's tokenizer; "
            f"this model was loaded without one"
        )
    if tokenizer is None:
        return ()
    return tuple(dict.fromkeys(DEFAULT_STOP_STRINGS + stop_strings))


def split_stop_strings(stop_strings, config: AriaTextConfig, tokenizer):
    """Single-token stop strings join the eos ids as stop ids (checked on device); the rest are
    checked on decoded text. No stop id is ever dropped: more than STOP_ID_SLOTS ids take a
    bigger buffer (a compilation for that size)."""
    ids, texts = list(config.eos_token_id), []
    for text in stop_strings:
        encoded = tokenizer.encode(text)
        if len(encoded) == 1 and tokenizer.decode(encoded) == text:
            ids.append(encoded[0])
        else:
            texts.append(text)
    ids = sorted(set(ids))
    slots = max(STOP_ID_SLOTS, 1 << (len(ids) - 1).bit_length())
    return np.asarray(ids + [-1] * (slots - len(ids)), np.int32), tuple(texts)


class Generator:
    """Compiled prefill and decode for one text config and dtype, and the loop that drives them."""

    def __init__(self, config: AriaTextConfig, dtype, tokenizer=None, runner: MeshRunner = MeshRunner()):
        self.config, self.dtype, self.tokenizer = config, dtype, tokenizer
        self.prefill = runner.jit(
            functools.partial(prefill, config=config, dtype=dtype),
            static_argnames=("cache_length", "max_new_tokens_capacity", "chunk", "kv_cache_dtype"),
        )
        self.decode = runner.jit(
            functools.partial(decode, config=config, dtype=dtype),
            static_argnames=("prompt_len",),
            donate_argnames=("state",),
        )
        self._views = (None, None)  # (params, their layer_views)

    def views(self, params) -> list | None:
        """`layer_views.layer_views` of `params`, made on the first call with these params."""
        if self._views[0] is not params:
            self._views = (params, layer_views(params, self.config.num_hidden_layers))
        return self._views[1]

    def pad_prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Left-pads to the prompt bucket (`buckets.prompt_bucket`); returns the padded ids and mask."""
        batch, length = input_ids.shape
        extra = prompt_bucket(length) - length
        ids = np.concatenate([np.full((batch, extra), self.config.pad_id, np.int32), input_ids], axis=1)
        mask = np.concatenate([np.zeros((batch, extra), np.int32), attention_mask], axis=1)
        return ids, mask

    def steps(
        self,
        params,
        prompt_embeds,
        attention_mask,
        request: Request,
        chunk: int,
        max_length: int | None = None,
        prefill_inputs: dict | None = None,
    ) -> Iterator[np.ndarray]:
        """Runs generation, yielding the (B, max_new_tokens) token buffer after prefill and after
        every decode chunk; rows stopped by a stop string are cut after the token completing it.
        `prefill_inputs`: what else the model's prompt takes (`prefill`'s position_ids, gate_inputs)."""
        batch, prompt_len, _ = prompt_embeds.shape
        needed = prompt_len + request.max_new_tokens
        if max_length is not None and not is_integer(max_length):
            raise RequestError(f"max_length={max_length!r}: must be an integer or None")
        cache_length = bucket_length(needed) if max_length is None else int(max_length)
        if cache_length < needed:
            raise RequestError(f"max_length={max_length} is shorter than the prompt bucket + max_new_tokens ({needed})")
        stop_ids, stop_texts = request.stop_ids, request.stop_texts
        state: DecodeState = self.prefill(
            params,
            prompt_embeds,
            attention_mask,
            request.sampling,
            stop_ids,
            **(prefill_inputs or {}),
            cache_length=cache_length,
            max_new_tokens_capacity=cache_length - prompt_len,
            kv_cache_dtype=request.kv_cache_dtype,
            views=self.views(params),
        )
        while True:
            tokens, step, done = jax.device_get((state.tokens, state.step, state.done))  # one transfer
            tokens = tokens[:, : request.max_new_tokens]
            if stop_texts:
                tokens, done = self._cut_at_stop_strings(tokens, int(step), done, stop_texts)
                # placed as the device copy was, or the next decode call would compile again for a host array
                state = state.replace(done=jax.device_put(done, state.done.sharding))
            yield tokens
            if step >= request.max_new_tokens or bool(np.all(done)):
                return
            state = self.decode(
                params,
                state,
                chunk,
                request.max_new_tokens,
                request.sampling,
                stop_ids,
                prompt_len=prompt_len,
                views=self.views(params),
            )

    def _cut_at_stop_strings(self, tokens, step, done, stop_texts):
        tokens, done = tokens.copy(), done.copy()
        for row in range(tokens.shape[0]):
            generated = tokens[row, :step]
            if not any(s in self.tokenizer.decode(generated) for s in stop_texts):
                continue
            end = next(
                k for k in range(1, step + 1) if any(s in self.tokenizer.decode(generated[:k]) for s in stop_texts)
            )
            tokens[row, end:] = self.config.pad_id
            done[row] = True
        return tokens, done

    def generate(
        self, params, prompt_embeds, attention_mask, request: Request, max_length=None, prefill_inputs=None
    ) -> np.ndarray:
        chunk = GENERATE_CHUNK if request.stop_texts else request.max_new_tokens
        for tokens in self.steps(params, prompt_embeds, attention_mask, request, chunk, max_length, prefill_inputs):
            pass
        return tokens

    def stream(
        self, params, prompt_embeds, attention_mask, request: Request, max_length=None, prefill_inputs=None
    ) -> Iterator[str | tuple[str, ...]]:
        """Decoded text as it grows, one piece per STREAM_CHUNK decode steps (a jitted call costs
        more than a loop iteration, so single-step calls would make streaming ~20% slower than
        `generate`; see benchmarks/stream_vs_generate.py): a str for one row, a tuple of str (one
        per row) for a batch. The text ends before a stop string: a tail that could begin one is
        held back until it cannot, as is a partial UTF-8 character until it is complete."""
        if self.tokenizer is None:
            raise RequestError("stream needs the checkpoint's tokenizer; this model was loaded without one")
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
                pieces.append(text[len(shown[row]) :])
                shown[row] = max(shown[row], text, key=len)
            return pieces[0] if batch == 1 else tuple(pieces)

        tokens = None
        for tokens in self.steps(
            params, prompt_embeds, attention_mask, request, STREAM_CHUNK, max_length, prefill_inputs
        ):
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
