"""Serving many requests at once: a bounded queue in front of a fixed number of decode slots.

`Engine.submit` checks a request on the caller's thread (a bad one raises `RequestError` at
once and changes nothing) and queues it; the engine's thread runs rounds: free the slots of
finished and cancelled requests, prefill waiting requests into free slots (`slots.insert`),
handing each its first token as soon as its prefill is done, then advance every busy slot
`decode_steps` tokens (`slots.decode_slots`) and hand each request its new text. A request's tokens do not depend on the other slots: greedy answers are
`generate()`'s for that request alone, and a seed draws the same samples.

On several hosts every process runs the same rounds: process 0 decides each round (which
requests go into which slots, which slots to free) and broadcasts it (`rounds`); the others
call `Engine.follow()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import queue
import threading
import time

import jax
import numpy as np

from aria_jax.device_loop import decode_params
from aria_jax.host_loop import STOP_ID_SLOTS, RequestError, possible_stop_start
from aria_jax.pretrained import Prompt
from aria_jax.quantization import holds_quantized
from aria_jax.rounds import Admission, Round, broadcast_round
from aria_jax.sharding import MeshRunner, jit_for
from aria_jax.slots import decode_slots, empty_slots, insert

DEFAULT_MAX_LENGTH = 4096  # cache positions per slot, when the model's context is longer
DEFAULT_DECODE_STEPS = 8  # tokens per slot between rounds: new requests wait at most this long
DEFAULT_MAX_QUEUE = 64
FINISH_REASONS = ("stop", "length", "cancelled")


@functools.cache
def _jitted_for(platform: str, int4_weights: bool, function, **jit_options):
    """Made once per platform and options: compiled once per shape and config, whichever engine calls them."""
    return jit_for(platform, function, int4_weights, **jit_options)


def _jitted(run: MeshRunner, function, **jit_options):
    """`function` jitted as `run.jit` does it, shared by the engines that run like `run`."""
    return run.wrap(_jitted_for(run.platform, run.int4_weights, function, **jit_options))


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` requests: try again later."""


class EngineStopped(RuntimeError):
    """The engine has stopped and takes no more requests."""


class RoundFailed(RuntimeError):
    """The device work of a round failed: its requests, and those in the slots, are lost; the
    engine starts again from empty slots."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # the answer, before any stop string
    tokens: np.ndarray  # generated ids, through the one that stopped the answer
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int


class Handle:
    """One submitted request. Iterating it yields the answer's text as it grows (str pieces),
    then its `Completion`; `result()` waits for the completion alone. `cancel()` frees its slot
    (or takes it out of the queue); it then ends with finish_reason "cancelled".
    Made with an asyncio loop (`Engine.submit(loop=)`), it is iterated with `async for`."""

    def __init__(self, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None = None):
        self.prompt_tokens = prompt_tokens
        self.submitted = time.perf_counter()
        self._loop = loop
        self._events = asyncio.Queue() if loop else queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event) -> None:
        if self._loop is None:
            self._events.put(event)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def __iter__(self):
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Completion):
                return

    async def __aiter__(self):
        while True:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Completion):
                return

    def result(self) -> Completion:
        for event in self:
            if isinstance(event, Completion):
                return event
        raise AssertionError("a request ends with its completion")


@dataclasses.dataclass
class _Answer:
    """A request in a slot: what it generated so far and what its client has been shown."""

    handle: Handle
    prompt: Prompt
    stop_ids: frozenset[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    shown: str = ""
    last_delivery: float = 0.0


class Engine:
    """Continuous batching over `max_batch` slots of `max_length` cache positions each (prompt
    bucket + max_new_tokens of a request must fit). `decode_steps`: tokens per slot between
    rounds. `max_queue`: requests waiting beyond it raise `QueueFull`. `kv_cache_dtype`: the
    slots' cache, as `generate`'s. `metrics`: optional, told of every first token's latency
    (`first_token(seconds)`) and of the gaps between later tokens (`token_gap(seconds)`).

    Use it as a context manager (`with Engine(model) as engine:`) or `start()` / `stop()`."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 8,
        max_length: int | None = None,
        decode_steps: int = DEFAULT_DECODE_STEPS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        kv_cache_dtype: str | None = None,
        metrics=None,
    ):
        config = model.text_config
        context = config.max_position_embeddings
        max_length = min(context, DEFAULT_MAX_LENGTH) if max_length is None else max_length
        for name, value, low in (
            ("max_batch", max_batch, 1),
            ("max_length", max_length, 2),
            ("decode_steps", decode_steps, 1),
            ("max_queue", max_queue, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
        if max_length > context:
            raise ValueError(f"max_length={max_length} exceeds the model's context of {context} positions")
        if model.tokenizer is None:
            raise ValueError("the engine decodes answers to text: load the model with its tokenizer")
        self.model, self.max_batch, self.max_length = model, max_batch, max_length
        self.decode_steps, self.max_queue, self.kv_cache_dtype = decode_steps, max_queue, kv_cache_dtype
        self.metrics = metrics
        generator = model.generator
        self._generator, self._pad_id = generator, config.pad_id
        self._prefill = generator.prefill
        run = model.runner
        self._empty = functools.partial(
            _jitted(run, empty_slots, static_argnums=tuple(range(6))),
            config,
            max_batch,
            max_length,
            STOP_ID_SLOTS,
            model.dtype,
            kv_cache_dtype,
        )
        self._insert = _jitted(run, insert, donate_argnames=("slots",))
        self._decode = functools.partial(
            _jitted(run, decode_slots, static_argnames=("num_steps", "config", "dtype"), donate_argnames=("slots",)),
            config=config,
            dtype=model.dtype,
            num_steps=decode_steps,
        )
        self._run = run
        self._decode_inputs = None  # (params, layers) for `decode_slots`, made at the first round
        self._slots = None
        self._answers: dict[int, _Answer] = {}  # slot -> the request in it
        self._queue: collections.deque[tuple[Handle, Prompt]] = collections.deque()
        self._release = np.zeros((max_batch,), bool)  # slots to mark done at the next decode
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.tokens_generated = 0

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        input_ids,
        attention_mask=None,
        *media,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings=(),
        loop: asyncio.AbstractEventLoop | None = None,
        **named_media,
    ) -> Handle:
        """Queues one prompt, as the processor gives it (`engine.submit(**inputs, ...)`: token
        ids (1, T) or (T,), padding in `attention_mask` dropped, the model's image inputs by
        position or name as `generate` takes them) with `generate`'s settings; returns its
        `Handle`. Raises `RequestError` for a bad request, `QueueFull` when `max_queue` requests
        wait, `EngineStopped` after `stop()`."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise RequestError(f"input_ids of shape {ids.shape}: the engine takes one prompt per request")
        if attention_mask is not None:
            mask = np.asarray(attention_mask).reshape(-1)
            if mask.shape != ids.shape[1:] or not np.isin(mask, (0, 1)).all():
                raise RequestError(f"attention_mask must be 0s and 1s of input_ids' shape {ids.shape}")
            ids = ids[:, mask.astype(bool)]
        prompt = self.model.prompt(
            ids,
            None,
            *media,
            **named_media,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_strings=stop_strings,
        )
        needed = prompt.padded_ids.shape[1] + prompt.request.max_new_tokens
        if needed > self.max_length:
            raise RequestError(
                f"prompt of {ids.shape[1]} tokens (padded to {prompt.padded_ids.shape[1]}) + max_new_tokens="
                f"{prompt.request.max_new_tokens} needs {needed} cache positions; this engine's slots hold "
                f"{self.max_length} (max_length)"
            )
        handle = Handle(ids.shape[1], loop)
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine has stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue={self.max_queue})")
            self._queue.append((handle, prompt))
            self._lock.notify()
        return handle

    def warm_up(self) -> None:
        """Compiles the rounds' programs (prefill of the smallest prompt bucket, insert, decode)
        with a request of one token, run to its end before `start()`."""
        handle = self.submit([self.model.text_config.pad_id], max_new_tokens=2, stop_strings=None)
        while self.step():
            pass
        handle.result()
        self.tokens_generated = 0

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return len(self._answers)

    # ------------------------------------------------------------------ the thread

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="aria-jax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finishes the round under way, fails what is left with `EngineStopped`, and, on
        several hosts, tells the other processes to stop following."""
        with self._lock:
            self._stopped = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._queue and not self._answers:
                        self._lock.wait()
                    if self._stopped:
                        break
                try:
                    self.step()
                except Exception as error:  # noqa: BLE001 - the requests learn of it; serving goes on
                    self._fail_all(RoundFailed(f"the engine's round failed: {error!r}"), queued=False)
                    self._slots = None  # donated to the failed call: start from empty slots
                    self._release[:] = False
        finally:
            if jax.process_count() > 1:
                broadcast_round(Round.stopping(self.max_batch))
            self._fail_all(EngineStopped("the engine has stopped"), queued=True)

    def _fail_all(self, error: Exception, queued: bool) -> None:
        """Fails the requests in the slots (and with `queued`, those waiting) with `error`."""
        with self._lock:
            failed = [answer.handle for answer in self._answers.values()]
            self._answers.clear()
            if queued:
                failed += [handle for handle, _ in self._queue]
                self._queue.clear()
        for handle in failed:
            handle._emit(error)

    # ------------------------------------------------------------------ rounds

    def step(self) -> bool:
        """One round (the engine's thread runs them; call it yourself only without `start()`).
        Returns False when there was nothing to do."""
        round_ = self._plan()
        if not round_.admissions and not self._answers:
            return False
        if jax.process_count() > 1:
            broadcast_round(round_)
        decoded = self._run_round(round_, on_first_token=self._deliver_first_token)
        if decoded is not None:
            self._deliver(*decoded)
        return True

    def follow(self) -> None:
        """On every process but 0 of a multi-host mesh: runs the rounds process 0 broadcasts,
        until it stops."""
        while True:
            round_ = broadcast_round(None)
            if round_.stop:
                return
            self._run_round(round_)

    def _plan(self) -> Round:
        """Frees the slots of cancelled requests and fills free slots from the queue."""
        with self._lock:
            for slot, answer in list(self._answers.items()):
                if answer.handle.cancelled:
                    self._finish(slot, "cancelled")
            for handle, prompt in [entry for entry in self._queue if entry[0].cancelled]:
                self._queue.remove((handle, prompt))
                handle._emit(Completion("", np.zeros((0,), np.int32), "cancelled", handle.prompt_tokens))
            admissions = []
            free = [slot for slot in range(self.max_batch) if slot not in self._answers]
            while free and self._queue:
                handle, prompt = self._queue.popleft()
                slot = free.pop(0)
                self._answers[slot] = _Answer(
                    handle, prompt, frozenset(prompt.request.stop_ids.tolist()) - {-1}, last_delivery=handle.submitted
                )
                self._release[slot] = False  # a slot freed last round and filled now: insert resets it
                admissions.append(Admission(slot, prompt))
        release, self._release = self._release, np.zeros_like(self._release)
        return Round(admissions, release, decode=bool(self._answers))

    def _run_round(self, round_: Round, on_first_token=None):
        """The round's device work, the same on every process: prefill and insert each admission,
        then decode. `on_first_token(slot, token)` gets each admission's first token as soon as
        its prefill is done, so its client does not wait for the round's other prefills and its
        decode. Returns host arrays: the decode's new tokens (B, decode_steps), tokens generated
        per slot and done flags; None for a round without decode."""
        if self._slots is None:
            self._slots = self._empty()
        if self._decode_inputs is None:
            self._decode_inputs = self._params_for_decode()
        params = self.model.text_params
        for admission in round_.admissions:
            prompt, request = admission.prompt, admission.prompt.request
            embeds = self.model.prompt_embeddings(prompt)
            prefilled = self._prefill(
                params,
                embeds,
                prompt.padded_mask,
                request.sampling,
                request.stop_ids,
                **self.model.prefill_inputs(prompt, embeds),
                cache_length=self.max_length,
                # generate(max_length=) takes this capacity: the two share the compiled prefill
                max_new_tokens_capacity=self.max_length - prompt.padded_ids.shape[1],
                kv_cache_dtype=self.kv_cache_dtype,
                views=self.model.generator.views(params),
            )
            stop_ids = request.stop_ids[:STOP_ID_SLOTS]  # the rest stop on the host
            self._slots = self._insert(
                self._slots,
                prefilled,
                np.int32(admission.slot),
                np.int32(prompt.padded_ids.shape[1]),
                np.int32(request.max_new_tokens),
                request.sampling,
                stop_ids[None],
            )
            if on_first_token is not None:  # read after the insert is queued: it runs meanwhile
                on_first_token(admission.slot, int(jax.device_get(prefilled.tokens)[0, 0]))
        if not round_.decode:
            return None
        self._slots, new_tokens = self._decode(*self._decode_inputs, self._slots, round_.release)
        return jax.device_get((new_tokens, self._slots.generated, self._slots.done))

    def _params_for_decode(self) -> tuple:
        """On one CPU device, each layer's weights apart from the stacks, made once for the
        engine's life rather than at every round's decode call: the stacks' own memory
        (`layer_views`), or for quantized params a dequantized copy of all but the routed experts
        (`device_loop.decode_params`), for decode steps as fast as generate's. Elsewhere the
        params as they are."""
        config, dtype, params = self.model.text_config, self.model.dtype, self.model.text_params
        with jax.set_mesh(self.model.mesh) if self.model.mesh is not None else contextlib.nullcontext():
            _, layers = jax.eval_shape(functools.partial(decode_params, config=config, dtype=dtype), params)
        if layers is None:
            return params, None
        views = self.model.generator.views(params)
        if views is not None and not holds_quantized(params):
            return params, views
        return _jitted(self._run, decode_params, static_argnums=(1, 2))(params, config, dtype)

    def _deliver_first_token(self, slot: int, token: int) -> None:
        """Hands a request just prefilled its first token and text."""
        answer = self._answers[slot]
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.first_token(now - answer.last_delivery)
        answer.last_delivery = now
        self._take(slot, [token], device_done=False)

    def _deliver(self, new_tokens, generated, done) -> None:
        """Hands every request its new tokens and text; finishes those that stopped."""
        now = time.perf_counter()
        for slot, answer in list(self._answers.items()):
            count = int(generated[slot]) - len(answer.tokens)
            if count <= 0:
                if done[slot]:
                    self._take(slot, [], device_done=True)
                continue
            if self.metrics is not None:
                for _ in range(count):
                    self.metrics.token_gap((now - answer.last_delivery) / count)
            answer.last_delivery = now
            self._take(slot, new_tokens[slot, :count].tolist(), device_done=bool(done[slot]))

    def _take(self, slot: int, tokens: list[int], device_done: bool) -> None:
        """Appends a slot's new tokens to its answer (cut at the first stop id or stop string),
        sends the text that can no longer change, and finishes the answer once it has stopped."""
        answer = self._answers[slot]
        request = answer.prompt.request
        stopped = False
        for token in tokens:
            answer.tokens.append(token)
            self.tokens_generated += 1
            if token in answer.stop_ids:
                stopped = True
                break
        text = self._generator.answer_text(answer.tokens, answer.stop_ids, ())
        if not stopped and any(stop in text for stop in request.stop_texts):
            # the first token whose text completes a stop string ends the answer, as in generate
            end = next(
                k
                for k in range(1, len(answer.tokens) + 1)
                if any(
                    stop in self._generator.answer_text(answer.tokens[:k], answer.stop_ids, ())
                    for stop in request.stop_texts
                )
            )
            del answer.tokens[end:]
            stopped = True
        length_reached = len(answer.tokens) >= request.max_new_tokens
        if stopped or length_reached or device_done:
            self._finish(slot, "stop" if stopped or not length_reached else "length")
            return
        text = self._generator.answer_text(answer.tokens, answer.stop_ids, request.stop_texts)
        text = text[: len(text) - possible_stop_start(text, request.stop_texts)]
        self._send_new_text(answer, text)

    def _send_new_text(self, answer: _Answer, text: str) -> None:
        # Byte-fallback text can be rewritten while a UTF-8 sequence is incomplete: what was
        # shown stays shown, and only text beyond it is new.
        if len(text) > len(answer.shown):
            answer.handle._emit(text[len(answer.shown) :])
            answer.shown = text

    def _finish(self, slot: int, reason: str) -> None:
        answer = self._answers.pop(slot)
        self._release[slot] = True
        request = answer.prompt.request
        text = self._generator.answer_text(answer.tokens, answer.stop_ids, request.stop_texts)
        if reason != "cancelled":
            self._send_new_text(answer, text)
        answer.handle._emit(Completion(text, np.asarray(answer.tokens, np.int32), reason, answer.handle.prompt_tokens))
