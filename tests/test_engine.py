"""Continuous batching (aria_jax.engine): every request's answer is the one `generate()` gives
that request alone, whatever else shares the slots; stop strings, streaming, cancellation,
back-pressure and bad requests behave as documented and leave the engine serving."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import aria_jax
from aria_jax.engine import Completion, Engine, EngineStopped, QueueFull, RoundFailed
from aria_jax.rounds import Admission, Round, decode, encode

from repo_paths import SHAPES_PNG, TINY_RANDOM

SLOTS, MAX_LENGTH = 3, 128


@pytest.fixture(scope="module")
def tiny():
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM)
    return model, aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)


def chat_inputs(processor, question: str, images: list) -> dict:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return processor.from_messages([{"role": "user", "content": content}], images=images or None)


def mixed_requests(processor) -> list[tuple[dict, dict]]:
    """(inputs, settings): prompts of several buckets, zero to two images, greedy and sampled,
    answers of 1 to 40 tokens; more requests than slots."""
    shapes = Image.open(SHAPES_PNG)
    rng = np.random.default_rng(3)
    long_question = " ".join(rng.choice(["shape", "color", "left", "right", "count"], size=10))
    return [
        (chat_inputs(processor, "What is this?", [shapes]), dict(max_new_tokens=12)),
        (chat_inputs(processor, "Hi", []), dict(max_new_tokens=40)),
        (chat_inputs(processor, long_question, []), dict(max_new_tokens=7)),
        (chat_inputs(processor, "Compare them.", [shapes, shapes.rotate(90)]), dict(max_new_tokens=25)),
        (chat_inputs(processor, "Say one thing", []), dict(max_new_tokens=1)),
        (
            chat_inputs(processor, "Sample", [shapes]),
            dict(max_new_tokens=30, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=2**40 + 5),
        ),
        (chat_inputs(processor, "Sample again", []), dict(max_new_tokens=18, do_sample=True, temperature=1.3, seed=9)),
    ]


def solo_tokens(model, inputs: dict, settings: dict) -> np.ndarray:
    """generate() on the request alone: its new tokens, pads after a stop. (As long a cache as
    the engine's slots changes nothing but lets the two share compiled prefills.)"""
    return model.generate(**inputs, **settings, max_length=MAX_LENGTH)[0, inputs["input_ids"].shape[1] :]


def assert_same_answer(completion: Completion, solo: np.ndarray, pad_id: int, what: str) -> None:
    count = len(completion.tokens)
    np.testing.assert_array_equal(completion.tokens, solo[:count], err_msg=what)
    assert np.all(solo[count:] == pad_id), f"{what}: generate went on after the engine stopped: {solo}"


def submit(engine: Engine, inputs: dict, settings: dict):
    return engine.submit(**inputs, **settings)


def test_answers_equal_generate_alone_with_slots_reused(tiny):
    """Seven requests through three slots, on the engine's thread: each answer is generate()'s
    for that request alone, sampled ones included (same seed, same draws); the texts are the
    decoded tokens; finish reasons say why each ended."""
    model, processor = tiny
    requests = mixed_requests(processor)
    with Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH) as engine:
        handles = [submit(engine, inputs, settings) for inputs, settings in requests]
        completions = [handle.result() for handle in handles]
    pad_id = model.text_config.pad_id
    for index, ((inputs, settings), completion) in enumerate(zip(requests, completions)):
        solo = solo_tokens(model, inputs, settings)
        assert_same_answer(completion, solo, pad_id, f"request {index}")
        assert completion.prompt_tokens == inputs["input_ids"].shape[1]
        stopped = len(completion.tokens) < settings["max_new_tokens"]
        assert completion.finish_reason == ("stop" if stopped else "length"), (index, completion)
        expected_text = processor.decode(solo[: len(completion.tokens)], skip_special_tokens=True).split("<|im_end|>")[
            0
        ]
        assert completion.text == expected_text.rstrip("\ufffd")
    assert engine.busy_slots == 0 and engine.queue_length == 0
    assert engine.tokens_generated >= sum(len(c.tokens) for c in completions)


def test_stream_pieces_and_stop_strings(tiny):
    """Iterating a handle yields the text as it grows: the pieces join to the completion's text
    and to model.stream's. A stop string cuts the answer where generate() cuts it."""
    model, processor = tiny
    inputs = chat_inputs(processor, "Tell me more", [])
    settings = dict(max_new_tokens=40)
    full = processor.decode(solo_tokens(model, inputs, settings), skip_special_tokens=True)
    # three printable ASCII characters past the middle (not a partial UTF-8 character's U+FFFD)
    start = next(
        k
        for k in range(len(full) // 2, len(full) - 3)
        if full[k : k + 3].isascii() and full[k : k + 3].isprintable() and full[k : k + 3].strip() == full[k : k + 3]
    )
    stop = full[start : start + 3]
    with Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH) as engine:
        events = list(submit(engine, inputs, settings))
        stopped = submit(engine, inputs, {**settings, "stop_strings": [stop]}).result()
    pieces, completion = events[:-1], events[-1]
    assert all(isinstance(piece, str) and piece for piece in pieces) and len(pieces) > 3
    assert "".join(pieces) == completion.text == "".join(model.stream(**inputs, **settings))
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert stopped.text == full.split(stop, 1)[0].rstrip("\ufffd")
    assert_same_answer(
        stopped,
        solo_tokens(model, inputs, {**settings, "stop_strings": [stop]}),
        model.text_config.pad_id,
        "stop string",
    )


def test_cancel_frees_the_slot_and_others_are_unaffected(tiny):
    """A cancelled request ends "cancelled" and leaves its slot at once; the request queued
    behind it (one slot only) then runs and still equals generate() alone."""
    model, processor = tiny
    long_request = chat_inputs(processor, "A long answer", [])
    after = chat_inputs(processor, "Next", [])
    engine = Engine(model, max_batch=1, max_length=MAX_LENGTH)
    first = submit(engine, long_request, dict(max_new_tokens=90))
    second = submit(engine, after, dict(max_new_tokens=9))
    queued_then_cancelled = submit(engine, after, dict(max_new_tokens=9))
    engine.step()  # the first request takes the slot and decodes a few tokens
    assert engine.busy_slots == 1 and engine.queue_length == 2
    first.cancel()
    queued_then_cancelled.cancel()
    while engine.step():
        pass
    events = list(first)
    assert isinstance(events[-1], Completion) and events[-1].finish_reason == "cancelled"
    assert queued_then_cancelled.result().finish_reason == "cancelled"
    assert_same_answer(
        second.result(),
        solo_tokens(model, after, dict(max_new_tokens=9)),
        model.text_config.pad_id,
        "the request after a cancelled one",
    )
    assert engine.busy_slots == 0 and engine.queue_length == 0


def test_bad_requests_queue_full_and_stop(tiny):
    """Bad requests raise RequestError naming the problem before anything is queued; a full
    queue raises QueueFull; the engine then still answers, and after stop() refuses new work
    and fails what was left."""
    model, processor = tiny
    inputs = chat_inputs(processor, "Hello", [])
    engine = Engine(model, max_batch=1, max_length=MAX_LENGTH, max_queue=1)
    with pytest.raises(aria_jax.RequestError, match="temperature=-1"):
        submit(engine, inputs, dict(max_new_tokens=4, do_sample=True, temperature=-1))
    with pytest.raises(
        aria_jax.RequestError,
        match=r"padded to 32\) \+ max_new_tokens=100 needs 132 cache positions; "
        r"this engine's slots hold 128",
    ):
        submit(engine, inputs, dict(max_new_tokens=100))
    with pytest.raises(aria_jax.RequestError, match="one prompt per request"):
        engine.submit(np.zeros((2, 5), np.int32))
    with pytest.raises(aria_jax.RequestError, match="image tokens"):
        engine.submit(chat_inputs(processor, "Look", [Image.open(SHAPES_PNG)])["input_ids"][0])
    handle = submit(engine, inputs, dict(max_new_tokens=4))
    with pytest.raises(QueueFull, match="max_queue=1"):
        submit(engine, inputs, dict(max_new_tokens=4))
    with engine:
        assert_same_answer(
            handle.result(),
            solo_tokens(model, inputs, dict(max_new_tokens=4)),
            model.text_config.pad_id,
            "after rejected requests",
        )
    with pytest.raises(EngineStopped):
        submit(engine, inputs, dict(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_length=5000 exceeds the model's context of 4096"):
        Engine(model, max_length=5000)


def test_stop_fails_waiting_requests(tiny):
    model, processor = tiny
    engine = Engine(model, max_batch=1, max_length=MAX_LENGTH)
    handle = submit(engine, chat_inputs(processor, "Hello", []), dict(max_new_tokens=4))
    engine.start()
    engine.stop()
    try:  # answered before the stop, or failed by it: never left waiting
        assert isinstance(handle.result(), Completion)
    except EngineStopped:
        pass


def test_a_failed_round_fails_its_requests_and_serving_goes_on(tiny):
    """Device work that raises (say, out of memory) fails the requests in the slots with
    RoundFailed; the engine starts again from empty slots and answers the next one rightly."""
    model, processor = tiny
    inputs = chat_inputs(processor, "Hello", [])
    engine = Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH)
    working_decode, calls = engine._decode, []

    def failing_once(*args):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return working_decode(*args)

    engine._decode = failing_once
    with engine:
        with pytest.raises(RoundFailed, match="out of memory"):
            submit(engine, inputs, dict(max_new_tokens=6)).result()
        assert_same_answer(
            submit(engine, inputs, dict(max_new_tokens=6)).result(),
            solo_tokens(model, inputs, dict(max_new_tokens=6)),
            model.text_config.pad_id,
            "after a failed round",
        )
    assert len(calls) > 1


def test_int8_kv_cache_slots_equal_generate(tiny):
    model, processor = tiny
    requests = mixed_requests(processor)[:2]
    with Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH, kv_cache_dtype="int8") as engine:
        handles = [submit(engine, inputs, settings) for inputs, settings in requests]
        for (inputs, settings), handle in zip(requests, handles):
            assert_same_answer(
                handle.result(),
                solo_tokens(model, inputs, {**settings, "kv_cache_dtype": "int8"}),
                model.text_config.pad_id,
                "int8 KV cache",
            )


def test_metrics_hook_sees_every_token(tiny):
    model, processor = tiny

    class Recorded:
        def __init__(self):
            self.first, self.gaps = [], []

        def first_token(self, seconds):
            self.first.append(seconds)

        def token_gap(self, seconds):
            self.gaps.append(seconds)

    recorded = Recorded()
    requests = mixed_requests(processor)[1:3]
    with Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH, metrics=recorded) as engine:
        completions = [
            submit(engine, inputs, settings).result()
            for inputs, settings in [
                (requests[0][0], dict(max_new_tokens=10, stop_strings=None)),
                (requests[1][0], dict(max_new_tokens=6, stop_strings=None)),
            ]
        ]
    assert [len(c.tokens) for c in completions] == [10, 6]
    assert len(recorded.first) == 2 and len(recorded.gaps) == 10 + 6 - 2
    assert all(seconds >= 0 for seconds in recorded.first + recorded.gaps)


def test_each_first_token_is_handed_over_before_the_round_goes_on(tiny):
    """An admission's client gets its first token when its prefill is done, before the round's
    next prefill and its decode."""
    model, processor = tiny
    first_tokens, seen = [], []

    class Recorded:
        def first_token(self, seconds):
            first_tokens.append(seconds)

        def token_gap(self, seconds):
            pass

    engine = Engine(model, max_batch=SLOTS, max_length=MAX_LENGTH, metrics=Recorded())
    prefill, decode = engine._prefill, engine._decode
    engine._prefill = lambda *args, **kwargs: seen.append(("prefill", len(first_tokens))) or prefill(*args, **kwargs)
    engine._decode = lambda *args: seen.append(("decode", len(first_tokens))) or decode(*args)
    for inputs, _ in mixed_requests(processor)[1:3]:
        submit(engine, inputs, dict(max_new_tokens=4))
    assert engine.step()
    assert seen == [("prefill", 0), ("prefill", 1), ("decode", 2)]


def test_rounds_cross_processes_as_npz_without_pickle(tiny):
    """What process 0 broadcasts comes back whole: the prompt's device inputs and settings."""
    model, processor = tiny
    inputs = chat_inputs(processor, "Look", [Image.open(SHAPES_PNG)])
    prompt = model.prompt(
        inputs["input_ids"],
        None,
        inputs["pixel_values"],
        inputs["pixel_mask"],
        max_new_tokens=5,
        do_sample=True,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        seed=2**63,
        stop_strings=["ab"],
    )
    round_ = Round([Admission(2, prompt)], np.array([True, False, False]), decode=True)
    data = encode(round_)
    assert b"pickle" not in data
    back = decode(data)
    assert (back.decode, back.stop, back.release.tolist()) == (True, False, [True, False, False])
    (admission,) = back.admissions
    assert admission.slot == 2
    for name in ("padded_ids", "padded_mask"):
        np.testing.assert_array_equal(getattr(admission.prompt, name), getattr(prompt, name), err_msg=name)
    assert sorted(admission.prompt.media) == sorted(prompt.media) == ["pixel_mask", "pixel_values"]
    for name, value in prompt.media.items():
        np.testing.assert_array_equal(admission.prompt.media[name], value, err_msg=name)
    request = admission.prompt.request
    assert request.max_new_tokens == 5
    np.testing.assert_array_equal(request.stop_ids, prompt.request.stop_ids)
    for name in ("temperature", "top_k", "top_p", "seed"):
        np.testing.assert_array_equal(getattr(request.sampling, name), getattr(prompt.request.sampling, name))
    assert decode(encode(Round.stopping(3))).stop
