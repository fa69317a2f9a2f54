"""Hostile generation requests (issue 15, items 10, 12, 19-22): every bad argument is a
`RequestError` naming it, raised before anything runs; seeds cover [0, 2**64) without aliasing;
stop strings are never split or lost; `aria-jax chat` survives undecodable input.

One models/tiny-random model serves every request here (batch 1, one prompt bucket), so the
whole file compiles prefill and decode twice: once, and once more for a bigger stop-id buffer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import aria_jax
from aria_jax.cli import main
from aria_jax.device_loop import seed_keys
from aria_jax.host_loop import STOP_ID_SLOTS, check_request
from repo_paths import DEMO_MODEL, ROOT, TINY_RANDOM

PROMPT = "<|im_start|>user\nDescribe the sea in detail.<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 24
SAMPLED = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.5, stop_strings=None)


@pytest.fixture(scope="module")
def tiny():
    """(processor, model, inputs, greedy tokens, tokens sampled with seed 3), the last two taken
    from the fresh model, before any bad request has reached it."""
    processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, dtype="float32")
    inputs = processor(text=PROMPT)
    greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None)
    sampled = model.generate(**inputs, seed=3, **SAMPLED)
    assert (greedy[0, inputs["input_ids"].shape[1] :] != model.text_config.pad_token_id).all(), "pick another prompt"
    return processor, model, inputs, greedy, sampled


def with_defaults(**settings):
    return {
        **dict(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop_strings=()),
        **settings,
    }


# ----------------------------------------------------------------------------- seeds (items 10, 19)


def test_seeds_below_2_31_keep_their_keys(tiny):
    """A seed's key is the one `jax.random.key(seed)` gave before seeds had 64 bits, so the
    samples of every seed that was valid then are unchanged."""
    _, model, *_ = tiny
    for seed in (0, 5, 2**31 - 1):
        sampling = check_request(2, 8, model.text_config, None, **with_defaults(seed=seed, stop_strings=None)).sampling
        expected = np.stack([jax.random.key_data(jax.random.key(seed + row)) for row in range(2)])
        np.testing.assert_array_equal(jax.random.key_data(seed_keys(sampling.seed)), expected)


def test_seeds_do_not_alias_modulo_2_31(tiny):
    _, model, inputs, _, sampled = tiny
    for other in (3 + 2**31, 3 + 2**32, 3 + 2**63):
        assert (model.generate(**inputs, seed=other, **SAMPLED) != sampled).any(), other
    np.testing.assert_array_equal(model.generate(**inputs, seed=np.uint64(3), **SAMPLED), sampled)


def test_seed_range_is_0_to_2_64(tiny):
    _, model, inputs, _, _ = tiny
    top = model.generate(**inputs, seed=2**64 - 1, **SAMPLED)
    np.testing.assert_array_equal(model.generate(**inputs, seed=np.uint64(2**64 - 1), **SAMPLED), top)
    np.testing.assert_array_equal(model.generate(**inputs, seed=[2**64 - 1], **SAMPLED), top)
    for seed in (2**64, 2**70, -1, -(2**31) + 3):
        with pytest.raises(aria_jax.RequestError, match=rf"seed={seed}: .*\[0, 2\*\*64\)"):
            model.generate(**inputs, seed=seed, **SAMPLED)


@pytest.mark.parametrize(
    "seed, named",
    [
        (True, "seed=True"),
        (3.0, "seed=3.0"),
        ("3", "seed='3'"),
        (None, "seed=None"),
        (np.float64(3), "seed=3.0"),
        ([1, 2], r"seed=\[1, 2\]: must be a single value or one per row \(1\)"),
    ],
)
def test_seed_of_another_type_is_refused(tiny, seed, named):
    _, model, *_ = tiny
    with pytest.raises(aria_jax.RequestError, match=named):
        check_request(1, 8, model.text_config, None, **with_defaults(seed=seed, stop_strings=None))


def test_every_row_of_a_scalar_seed_stays_in_range(tiny):
    _, model, *_ = tiny
    settings = with_defaults(stop_strings=None)
    rows = check_request(3, 8, model.text_config, None, **{**settings, "seed": 2**64 - 3}).sampling.seed
    np.testing.assert_array_equal(rows, [[2**32 - 1, 2**32 - 3], [2**32 - 1, 2**32 - 2], [2**32 - 1, 2**32 - 1]])
    with pytest.raises(aria_jax.RequestError, match=rf"seed={2**64 - 2}: row 2 would use seed \+ 2"):
        check_request(3, 8, model.text_config, None, **{**settings, "seed": 2**64 - 2})


def test_cli_seed_past_int64_is_one_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for seed in ("100000000000000000000000", "-1"):
        code = main(["generate", "--model", TINY_RANDOM, "--prompt", "hi", "--temperature", "1", "--seed", seed])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("aria-jax: error: ") and f"seed={seed}" in lines[0], captured.err


# ----------------------------------------------------------------------------- stop strings (item 20)


def test_a_str_is_one_stop_string_added_to_the_default(tiny):
    processor, model, *_ = tiny
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = set(model.text_config.eos_token_id)
    assert im_end not in eos  # else the default stop would be invisible here
    for stop_strings in ("xyz", ["xyz"], ("xyz", "<|im_end|>")):
        stops = check_request(1, 8, model.text_config, model.tokenizer, **with_defaults(stop_strings=stop_strings))
        assert stops.stop_texts == ("xyz",) and set(stops.stop_ids.tolist()) - {-1} == eos | {im_end}, stop_strings
    default = check_request(1, 8, model.text_config, model.tokenizer, **with_defaults())
    assert default.stop_texts == () and set(default.stop_ids.tolist()) - {-1} == eos | {im_end}
    off = check_request(1, 8, model.text_config, model.tokenizer, **with_defaults(stop_strings=None))
    assert off.stop_texts == () and set(off.stop_ids.tolist()) - {-1} == eos


def test_a_str_stop_string_stops_where_it_is_complete(tiny):
    """A stop string of a one-character token and the next token's text: split into characters
    it would stop a token early."""
    processor, model, inputs, greedy, _ = tiny
    tokenizer, prompt = processor.tokenizer, inputs["input_ids"].shape[1]
    generated = greedy[0, prompt:].tolist()
    k = next(
        k
        for k, token in enumerate(generated[:-2])
        if len(tokenizer.decode([token])) == 1
        and tokenizer.encode(tokenizer.decode([token])) == [token]
        and token not in generated[:k]
        and tokenizer.decode(generated[k + 1 : k + 2]).isprintable()
    )
    stop = tokenizer.decode(generated[k : k + 2])
    assert len(stop) >= 2 and stop not in tokenizer.decode(generated[: k + 1])
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=stop)[0, prompt:]
    np.testing.assert_array_equal(out[: k + 2], generated[: k + 2])
    assert (out[k + 2 :] == model.text_config.pad_token_id).all(), (stop, out)


def test_single_token_stop_strings_beyond_the_device_slots_still_stop(tiny):
    processor, model, inputs, greedy, _ = tiny
    tokenizer, prompt = processor.tokenizer, inputs["input_ids"].shape[1]
    generated = greedy[0, prompt:].tolist()

    def single_token(token):
        text = tokenizer.decode([token])
        return text.isprintable() and text.strip() == text and text and tokenizer.encode(text) == [token]

    # The stop's id is larger than STOP_ID_SLOTS others, so a buffer of the smallest ids drops it.
    k = next(
        k for k in range(2, len(generated) - 2) if single_token(generated[k]) and generated[k] not in generated[:k]
    )
    fillers = [t for t in range(5, generated[k]) if single_token(t) and t not in generated[: k + 1]][:STOP_ID_SLOTS]
    assert len(fillers) == STOP_ID_SLOTS
    stop_strings = [tokenizer.decode([t]) for t in fillers + [generated[k]]]
    assert (
        check_request(1, 8, model.text_config, model.tokenizer, **with_defaults(stop_strings=stop_strings)).stop_texts
        == ()
    )  # all on device
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=stop_strings)[0, prompt:]
    np.testing.assert_array_equal(out[: k + 1], generated[: k + 1])
    assert (out[k + 1 :] == model.text_config.pad_token_id).all(), out


@pytest.mark.parametrize(
    "stop_strings, named",
    [
        ([""], "stop_strings contains ''"),
        (["ok", 3], "stop_strings contains 3"),
        (b"xyz", "stop_strings contains 120"),
        (["\ud800"], "a stop string is not valid Unicode: lone surrogate U\\+D800"),
        (5, "stop_strings=5"),
    ],
)
def test_bad_stop_strings_are_refused(tiny, stop_strings, named):
    _, model, *_ = tiny
    with pytest.raises(aria_jax.RequestError, match=named):
        check_request(1, 8, model.text_config, model.tokenizer, **with_defaults(stop_strings=stop_strings))


# ----------------------------------------------------------------------------- sampling settings (item 21)


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(top_k=2.7), "top_k=2.7: must be an integer"),
        (dict(top_k=3.0), "top_k=3.0: must be an integer"),
        (dict(top_k=True), "top_k=True: must be an integer"),
        (dict(top_k=-1), "top_k=-1: must be an integer >= 0"),
        (dict(top_k="5"), "top_k='5'"),
        (dict(temperature="hot"), "temperature='hot': must be a finite number"),
        (dict(temperature=None), "temperature=None: must be a finite number"),
        (dict(temperature=1j), r"temperature=1j: must be a finite number"),
        (dict(temperature=True), "temperature=True: must be a finite number"),
        (dict(temperature=float("inf")), "temperature=inf"),
        (dict(top_p="all"), "top_p='all': must be a number"),
        (dict(top_p=[0.5, 0.5, 0.5]), r"top_p=\[0\.5, 0\.5, 0\.5\]: must be a single value or one per row \(2\)"),
        (dict(temperature=[[1.0, 1.0]]), r"temperature=\[\[1\.0, 1\.0\]\]: must be a single value or one per row"),
        (dict(top_k=[1, [2]]), r"top_k=\[1, \[2\]\]: must be a single value or one per row"),
        (dict(do_sample="no"), "do_sample='no': must be True or False"),
        (dict(max_new_tokens=2.0), "max_new_tokens=2.0"),
    ],
)
def test_bad_sampling_settings_are_refused(tiny, settings, named):
    _, model, *_ = tiny
    with pytest.raises(aria_jax.RequestError, match=named):
        check_request(2, 8, model.text_config, None, **with_defaults(stop_strings=None, **settings))


def test_good_sampling_settings_of_every_integer_and_number_type(tiny):
    _, model, *_ = tiny
    sampling = check_request(
        2,
        8,
        model.text_config,
        None,
        **with_defaults(
            stop_strings=None, top_k=np.int64(3), temperature=np.float32(0.5), top_p=[1, 0.5], seed=[7, np.uint64(9)]
        ),
    ).sampling
    np.testing.assert_array_equal(sampling.top_k, [3, 3])
    np.testing.assert_array_equal(sampling.top_p, [1.0, 0.5])
    np.testing.assert_array_equal(sampling.seed, [[0, 7], [0, 9]])
    huge = check_request(1, 8, model.text_config, None, **with_defaults(stop_strings=None, top_k=2**70)).sampling
    assert huge.top_k.tolist() == [model.text_config.vocab_size]  # keeps every token, as any k that large


# ----------------------------------------------------------------------------- prompts (item 22)


def test_empty_prompt_is_refused_by_generate_and_forward(tiny):
    _, model, *_ = tiny
    for ids in (np.zeros((1, 0), np.int32), np.zeros((0, 4), np.int32)):
        with pytest.raises(aria_jax.RequestError, match=rf"input_ids has shape \({ids.shape[0]}, {ids.shape[1]}\)"):
            model.generate(ids, max_new_tokens=4)
        with pytest.raises(aria_jax.RequestError, match=r"input_ids has shape"):
            model(ids)


def test_row_attending_to_nothing_is_refused(tiny):
    _, model, inputs, _, _ = tiny
    ids = np.repeat(inputs["input_ids"], 2, axis=0)
    mask = np.ones_like(ids)
    mask[1] = 0
    with pytest.raises(aria_jax.RequestError, match="attention_mask row 1 is all zeros"):
        model.generate(ids, mask, max_new_tokens=4)
    with pytest.raises(aria_jax.RequestError, match="attention_mask row 1 is all zeros"):
        model.stream(ids, mask, max_new_tokens=4)


@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_attention_mask_of_other_values_is_refused(tiny, value):
    _, model, inputs, _, _ = tiny
    mask = np.ones(inputs["input_ids"].shape, np.float32 if value == 0.5 else np.int32)
    mask[0, 3] = value
    for call in (model.generate, model):
        with pytest.raises(aria_jax.RequestError, match=rf"attention_mask row 0 holds {value}: must be 0 .* or 1"):
            call(inputs["input_ids"], mask)


# ----------------------------------------------------------------------------- the model stays usable


def test_rejected_requests_leave_the_model_as_fresh(tiny):
    _, model, inputs, greedy, sampled = tiny
    bad = [
        dict(seed=2**70),
        dict(top_k=2.7),
        dict(temperature="hot"),
        dict(stop_strings=[""]),
        dict(max_length="x"),
        dict(input_ids=np.zeros((1, 0), np.int32)),
        dict(attention_mask=np.zeros_like(inputs["input_ids"])),
    ]
    for settings in bad:
        with pytest.raises(aria_jax.RequestError):
            model.generate(**{**inputs, **SAMPLED, **settings})
    with pytest.raises(aria_jax.RequestError):
        list(model.stream(**inputs, max_length=1))
    np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, stop_strings=None), greedy)
    np.testing.assert_array_equal(model.generate(**inputs, seed=3, **SAMPLED), sampled)


def test_request_errors_are_value_errors_exported_by_the_package():
    assert issubclass(aria_jax.RequestError, ValueError) and "RequestError" in aria_jax.__all__


# ----------------------------------------------------------------------------- aria-jax chat (item 12)


def test_chat_survives_undecodable_and_binary_lines():
    """A strict UTF-8 decoder (what a UTF-8 locale gives stdin) fails the whole read buffer on one
    bad byte: the bad line must be refused alone and the questions after it answered."""
    lines = [
        b"\xff\xfe not UTF-8 \xc3\x28",
        b"\x00\x01\x02binary\x00\x7f\x1b[31m",  # valid UTF-8 junk: answered or refused, never the end
        b"/reset",
        b"/image examples/demo_shapes.png",
        b"What shape is in the image?",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "aria_jax.cli", "chat", "--model", DEMO_MODEL, "--max-new-tokens", "8"],
        input=b"\n".join(lines) + b"\n",
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("aria-jax: error: ")]
    assert len(errors) <= 2, stderr
    assert "not valid UTF-8" in errors[0] and r"\xff\xfe not UTF-8" in errors[0], stderr
    assert result.stdout.decode().endswith("triangle\n"), (result.stdout, stderr)
