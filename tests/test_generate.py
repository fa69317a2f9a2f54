"""Generation: greedy parity with transformers over 100 tokens, cached vs uncached logits at every
step (and an int8 cache's against a float64 reference that rounds keys and values alike), zero
recompilation across requests within a bucket, sampling statistics, request checks,
stop strings and streaming.

Tiny random transformers models (tests/tiny_models.py) are loaded by both sides, as in
test_text_parity.py / test_multimodal_parity.py: the oracle with `experts_implementation="eager"`,
ours with `from_pretrained(dir, dtype="float32")`. Stop strings and streaming need a tokenizer:
they run on models/tiny-random, which ships one (its weights are random too).
"""

from __future__ import annotations

import functools

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

import aria_jax
import aria_jax.self_attention
from aria_jax.buckets import bucket_length
from aria_jax.config import AriaTextConfig
from aria_jax.device_loop import Sampling, sample_tokens
from aria_jax.hlo_text import Module, arrays_of
from aria_jax.kv_cache import init_cache, per_layer
from aria_jax.modeling import TextDecoder, init_text_params, scanned_cached_step, text_forward, unrolled_cached_step
from test_multimodal_parity import build_rows, emulated_crop, noise_image
from tiny_models import make_multimodal_model, make_text_model
from repo_paths import TINY_RANDOM

# max |ours - reference| <= LOGIT_TOLERANCE * max(1, max |reference|), as in test_text_parity.py.
LOGIT_TOLERANCE = 1e-4

PAD_ID = 2  # pad_token_id and eos_token_id of the tiny configs
FIRST_TEXT_ID = 3
IMAGE_TOKEN_ID = 9
NEW_TOKENS = 100
CONTEXT = 256  # max_position_embeddings of the tiny text model (for the "prompt too long" check)
IMAGE_SIDE = 28  # tiny_models.VISION_DEFAULTS: 28-pixel crops of 2x2 patches -> 4 queries
QUERIES = {28: 4, 14: 2}


# One torch thread: with two, torch's OpenMP workers and XLA's thread pool oversubscribe a small
# machine and transformers' 100-token generate gets ~10x slower after JAX has run.
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHAT_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Pair:
    reference: torch.nn.Module
    ours: object
    no_eos: object = None  # ours over the same weights with no eos id, for 100-token parity


def without_eos(reference, ours):
    """Both sides with no eos id, so that 100 greedy tokens are all compared (random models emit
    the tiny configs' eos, id 2, within a few tokens)."""
    reference.generation_config.eos_token_id = None
    if isinstance(ours, aria_jax.AriaTextForCausalLM):
        return aria_jax.AriaTextForCausalLM(dataclasses.replace(ours.config, eos_token_id=()), ours.params, "float32")
    config = dataclasses.replace(ours.config, text_config=dataclasses.replace(ours.text_config, eos_token_id=()))
    return aria_jax.AriaForConditionalGeneration(config, ours.params, "float32")


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory) -> Pair:
    directory = tmp_path_factory.mktemp("text")
    make_text_model(directory, seed=3, max_position_embeddings=CONTEXT)
    reference = transformers.AriaTextForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    ours = aria_jax.AriaTextForCausalLM.from_pretrained(directory, dtype="float32")
    assert ours.config.max_position_embeddings == CONTEXT
    return Pair(reference, ours, without_eos(reference, ours))


@pytest.fixture(scope="module")
def mm_pair(tmp_path_factory) -> Pair:
    directory = tmp_path_factory.mktemp("multimodal")
    make_multimodal_model(directory, seed=4)
    reference = transformers.AriaForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    ours = aria_jax.AriaForConditionalGeneration.from_pretrained(directory, dtype="float32")
    return Pair(reference, ours, without_eos(reference, ours))


@pytest.fixture(scope="module")
def tiny_random():
    processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, dtype="float32")
    assert model.tokenizer is not None
    return processor, model


# ----------------------------------------------------------------------------- helpers


def left_padded(seed: int, lengths, vocab_size: int):
    width = max(lengths)
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_TEXT_ID, vocab_size, size=(len(lengths), width))
    ids = np.where(ids == IMAGE_TOKEN_ID, IMAGE_TOKEN_ID + 1, ids).astype(np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = PAD_ID
        mask[row, width - length :] = 1
    return ids, mask


def image(label, seed, w, h):
    pv, pm = emulated_crop(noise_image(seed, w, h), IMAGE_SIDE, 0)
    return label, pv[None], pm[None]


def reference_generate(model, ids, mask, pixel_values=None, pixel_mask=None, new_tokens=NEW_TOKENS):
    kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    if pixel_values is not None:
        kwargs.update(pixel_values=torch.from_numpy(pixel_values), pixel_mask=torch.from_numpy(pixel_mask))
    with torch.no_grad():
        out = model.generate(
            **kwargs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=PAD_ID, eos_token_id=None
        ).numpy()
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), "the reference stopped early"
    return out


def assert_logits_close(ours, reference, what):
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    assert np.isfinite(ours).all(), what
    diff = float(np.abs(ours - reference).max())
    scale = max(1.0, float(np.abs(reference).max()))
    assert diff <= LOGIT_TOLERANCE * scale, f"{what}: max |diff| {diff:.3e} > {LOGIT_TOLERANCE} * {scale:.3f}"


# ----------------------------------------------------------------------------- 1. greedy parity


def check_greedy(pair, ids, mask, pixel_values=None, pixel_mask=None):
    expected = reference_generate(pair.reference, ids, mask, pixel_values, pixel_mask)
    kwargs = {} if pixel_values is None else dict(pixel_values=pixel_values, pixel_mask=pixel_mask)
    ours = pair.no_eos.generate(ids, mask, **kwargs, max_new_tokens=NEW_TOKENS, stop_strings=None)
    assert ours.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    # Not degenerate: many distinct tokens in every row.
    assert all(len(set(row.tolist())) > 5 for row in expected[:, ids.shape[1] :]), expected
    np.testing.assert_array_equal(ours, expected)


def test_greedy_100_tokens_text_only(text_pair):
    ids, mask = left_padded(1, (11,), text_pair.ours.config.vocab_size)
    check_greedy(text_pair, ids, mask)


def test_greedy_100_tokens_text_only_batch(text_pair):
    ids, mask = left_padded(2, (13, 4, 8), text_pair.ours.config.vocab_size)
    check_greedy(text_pair, ids, mask)


def test_greedy_100_tokens_one_image(mm_pair):
    rng = np.random.default_rng(5)
    ids, mask, pv, pm, _ = build_rows(rng, [[3, image("landscape", 1, 40, 17), 4]], QUERIES, 128)
    assert not pm.all(), "the crop should be partly padded"
    check_greedy(mm_pair, ids, mask, pv, pm)


def test_greedy_100_tokens_two_images(mm_pair):
    rng = np.random.default_rng(6)
    rows = [[2, image("landscape", 2, 50, 20), 3, image("portrait", 3, 15, 33), 2]]
    ids, mask, pv, pm, _ = build_rows(rng, rows, QUERIES, 128)
    assert pv.shape[0] == 2
    check_greedy(mm_pair, ids, mask, pv, pm)


def test_greedy_100_tokens_batch_of_three_with_images(mm_pair):
    rng = np.random.default_rng(7)
    rows = [
        [5, image("a", 4, 60, 30), 6, image("b", 5, 28, 28), 3],
        [2, image("c", 6, 20, 45), 1],
        [1, image("d", 7, 33, 30), 9],
    ]
    ids, mask, pv, pm, _ = build_rows(rng, rows, QUERIES, 128)
    lengths = mask.sum(axis=1)
    assert len(set(lengths.tolist())) == 3 and (mask[:, 0] == 0).sum() == 2, lengths
    check_greedy(mm_pair, ids, mask, pv, pm)


# ----------------------------------------------------------------------------- 2. cached vs uncached

STEPS = 24


def greedy_cached_steps(model, ids, mask, cache=None):
    """Prefill, then greedy decode steps against the KV cache exactly as device_loop.py runs them
    (prompt at index 0, token i at index T + i - 1 with position prompt_len + i - 1), STEPS
    tokens in all. `cache`: the empty stacked cache to prefill (default: float32). Returns each
    step's logits, the tokens, and the per-layer cache."""
    config = model.config
    decoder = TextDecoder(config)
    batch, prompt = ids.shape
    cache_length = prompt + STEPS
    key_mask = jnp.concatenate([jnp.asarray(mask, bool), jnp.ones((batch, STEPS), bool)], axis=1)

    @jax.jit
    def prefill_step(params, token_ids, positions, cache):
        embeds = decoder.apply({"params": params}, token_ids, method=TextDecoder.embed)
        return decoder.apply({"params": params}, embeds, key_mask, positions, cache, 0, method=TextDecoder.cached_step)

    @jax.jit
    def step(params, token_ids, positions, cache, index):  # decode: the layers unrolled, one cache per layer
        embeds = decoder.apply({"params": params}, token_ids, method=TextDecoder.embed)
        return unrolled_cached_step(params, embeds, key_mask, positions, cache, index, config=config)

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    if cache is None:
        cache = init_cache(config, batch, cache_length, jnp.float32)
    logits, cache = prefill_step(model.params, ids, positions, cache)
    cache = per_layer(cache, cache_length)
    step_logits, tokens = [], []
    for i in range(STEPS):
        step_logits.append(np.asarray(logits))
        tokens.append(np.argmax(step_logits[-1], axis=-1))
        if i + 1 < STEPS:
            logits, cache = step(model.params, tokens[-1][:, None], (mask.sum(1) + i)[:, None], cache, prompt + i)
    return step_logits, tokens, cache


def test_prefill_loop_over_layers_equals_the_decoder_scan(text_pair):
    """What generation prefills a prompt with (`scanned_cached_step`: the layer loop with the
    routed experts left in their stacks, read at the loop's index) against the decoder module's
    own layer scan: the same logits and cache."""
    model = text_pair.no_eos
    config = model.config
    ids, mask = left_padded(8, (10, 3), config.vocab_size)
    decoder = TextDecoder(config)
    embeds = decoder.apply({"params": model.params}, jnp.asarray(ids), method=TextDecoder.embed)
    key_mask = jnp.asarray(mask, bool)
    positions = jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    cache = init_cache(config, *ids.shape, jnp.float32)
    expected = decoder.apply(
        {"params": model.params}, embeds, key_mask, positions, cache, 0, method=TextDecoder.cached_step
    )
    got = jax.jit(functools.partial(scanned_cached_step, config=config))(
        model.params, embeds, key_mask, positions, cache, 0
    )
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(expected[0]), rtol=1e-6, atol=1e-6, err_msg="logits")
    # (layers, B, K, S, H) -> the real tokens' entries: padding's are never read, and one CPU
    # device routes padding to no expert where the mask is known (`MoE`)
    real = mask.astype(bool)
    for name in ("k", "v"):
        a, b = (np.moveaxis(np.asarray(cache[name]), (1, 3), (0, 1))[real] for cache in (got[1], expected[1]))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_cached_logits_equal_uncached_forward_at_every_step(text_pair):
    """Runs the decoder step by step against the KV cache exactly as device_loop.py does (prompt
    at index 0, token i at index T + i - 1 with position prompt_len + i - 1), greedily, and
    compares every step's logits with one uncached forward over prompt + generated tokens
    (causal, so position t of the full forward is the uncached logits of the prefix up to t)."""
    model = text_pair.no_eos  # no eos: every row runs all STEPS
    config = model.config
    ids, mask = left_padded(8, (10, 3), config.vocab_size)
    batch, prompt = ids.shape
    step_logits, tokens, _ = greedy_cached_steps(model, ids, mask)

    full_ids = np.concatenate([ids, np.stack(tokens, axis=1)], axis=1)
    full_mask = np.concatenate([mask, np.ones((batch, STEPS), np.int64)], axis=1)
    full_logits = np.asarray(model(full_ids, attention_mask=full_mask).logits)
    for i in range(STEPS):
        assert_logits_close(step_logits[i], full_logits[:, prompt + i - 1], what=f"step {i}")
    # And the jitted prefill/decode loop (chunks of one step) picks the same tokens.
    padded_ids, padded_mask = model.generator.pad_prompt(ids.astype(np.int32), mask.astype(np.int32))
    embeds = model._embed(model.params, padded_ids)
    request = aria_jax.host_loop.check_request(
        batch,
        prompt,
        config,
        None,
        max_new_tokens=STEPS,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings=None,
    )
    buffers = list(model.generator.steps(model.params, embeds, padded_mask, request, chunk=1))
    assert len(buffers) == STEPS, "expected one buffer after prefill and one per single decode step"
    np.testing.assert_array_equal(buffers[-1], full_ids[:, prompt:])


ROUNDING_NOISE = 1e-3  # steps of a scale: how far float32 noise may move a number between two forwards


def float64_attention_over_int8_cache(cache: list[dict], checked: list):
    """A stand-in for `attention.attention` in an uncached forward over the tokens an int8 `cache`
    holds (one dict per layer, as decode left it): causal attention in float64 numpy, over keys and
    values rounded per (row, kv head, position) as `kv_cache.to_int8` rounds them. Scales are
    absmax / 127 of this forward's own keys and values, in float64. The integers are the cache's,
    once checked to be this forward's numbers rounded to the nearest step: the two forwards differ
    by float32 noise, which may round a number within ROUNDING_NOISE of a tie the other way (as
    router ties are compared first). The last position, which the cache never holds, is rounded
    here. Each call (the layers run in order) appends what it checked to `checked`."""

    def on_host(q, k, v, key_mask, query_offset):
        layer = cache[len(checked)]
        q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
        key_mask = np.asarray(key_mask, bool)
        batch, length, heads, head_dim = q.shape
        held_positions = (key_mask & (np.arange(length) < length - 1))[:, None, :]  # (B, 1, S)
        found = {}

        def rounded(x, name):
            absmax = np.abs(x).max(axis=-1)
            scale = np.where(absmax > 0, absmax / 127, 1.0)
            steps = x / scale[..., None]
            held = np.asarray(layer[name], np.float64)[:, :, :length]
            found[name] = (
                np.abs(held - steps).max(axis=-1)[held_positions.repeat(x.shape[1], 1)].max(),
                np.abs(np.asarray(layer[f"{name}_scale"])[:, :, :length] / scale - 1)[
                    held_positions.repeat(x.shape[1], 1)
                ].max(),
            )
            integers = np.where(held_positions[..., None], held, np.clip(np.round(steps), -127, 127))
            return integers * scale[..., None]

        k, v = rounded(k, "k"), rounded(v, "v")
        checked.append(found)
        kv_heads = k.shape[1]
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        scores = np.einsum("btkgh,bksh->bkgts", q, k) / np.sqrt(head_dim)
        positions = np.arange(length)
        allowed = (positions[None, :] <= positions[:, None] + int(query_offset))[None] & key_mask[:, None, :]
        scores = np.where(allowed[:, None, None], scores, -np.inf)
        top = scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
        probs = probs / np.maximum(probs.sum(axis=-1, keepdims=True), 1e-300)  # a left pad attends nothing: 0
        out = np.einsum("bkgts,bksh->btkgh", probs, v).reshape(batch, length, heads, head_dim)
        return out.astype(np.float32)

    def attention(q, k, v, key_mask, query_offset=None, *, scales=None):
        assert scales is None and query_offset is not None, "the uncached forward: causal, unquantized keys"
        return jax.pure_callback(
            on_host, jax.ShapeDtypeStruct(q.shape, jnp.float32), q, k, v, key_mask, jnp.asarray(query_offset, jnp.int32)
        )

    return attention


@pytest.mark.parametrize("path", ["beside_cache", "generic"])
def test_int8_cache_logits_are_attention_over_rounded_keys_and_values(text_pair, path, monkeypatch):
    """Prefill and decode steps against an int8 cache (as device_loop.py runs them, greedily), every
    step's logits against one uncached forward over the same tokens whose attention is float64
    numpy over keys and values rounded as the cache rounds them: equal within float32 tolerance,
    and farther from the unquantized forward's. The current token attends to its own rounded key,
    as every later one does. `path`: decode's attention beside the cache (one CPU device), or the
    generic one (the cache written, then read whole by `attention`)."""
    if path == "generic":
        monkeypatch.setattr(aria_jax.self_attention, "on_one_cpu", lambda: False)
    model = text_pair.no_eos
    config = model.config
    ids, mask = left_padded(8, (10, 3), config.vocab_size)
    batch, prompt = ids.shape
    cache_length = prompt + STEPS
    int8_cache = init_cache(config, batch, cache_length, jnp.float32, "int8")
    assert {name: buffer.dtype for name, buffer in int8_cache.items()} == {
        "k": jnp.int8,
        "v": jnp.int8,
        "k_scale": jnp.float32,
        "v_scale": jnp.float32,
    }
    step_logits, tokens, cache = greedy_cached_steps(model, ids, mask, int8_cache)
    assert cache[0]["k"].dtype == jnp.int8 and cache[0]["k_scale"].shape == (
        batch,
        config.num_key_value_heads,
        cache_length,
    )

    full_ids = np.concatenate([ids, np.stack(tokens, axis=1)], axis=1)
    full_mask = np.concatenate([mask, np.ones((batch, STEPS), np.int64)], axis=1)

    def uncached_forward():  # traced afresh at each call, so that it sees the attention of the moment
        return np.asarray(jax.jit(lambda params: text_forward(params, config, full_ids, full_mask))(model.params))

    unquantized = uncached_forward()
    checked = []
    with monkeypatch.context() as patch:
        patch.setattr(
            aria_jax.self_attention,
            "attention",
            float64_attention_over_int8_cache([jax.device_get(layer) for layer in cache], checked),
        )
        reference = uncached_forward()
    assert len(checked) == config.num_hidden_layers
    for layer, found in enumerate(checked):
        for name, (steps_off, scale_off) in found.items():
            # The cache holds every real token's numbers rounded to the nearest step of its scale.
            assert steps_off <= 0.5 + ROUNDING_NOISE, (layer, name, steps_off)
            assert scale_off <= 1e-5, (layer, name, scale_off)
    farthest_from_unquantized = 0.0
    for i in range(STEPS):
        assert_logits_close(step_logits[i], reference[:, prompt + i - 1], what=f"step {i}")
        diff = np.abs(step_logits[i] - unquantized[:, prompt + i - 1]).max()
        farthest_from_unquantized = max(farthest_from_unquantized, diff / max(1.0, np.abs(unquantized).max()))
    # The rounding is seen: without it, the logits would be 30x farther than the tolerance.
    assert farthest_from_unquantized > 30 * LOGIT_TOLERANCE, farthest_from_unquantized

    # The jitted prefill/decode loop with kv_cache_dtype="int8" picks the same tokens.
    padded_ids, padded_mask = model.generator.pad_prompt(ids.astype(np.int32), mask.astype(np.int32))
    embeds = model._embed(model.params, padded_ids)
    request = aria_jax.host_loop.check_request(
        batch,
        prompt,
        config,
        None,
        max_new_tokens=STEPS,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stop_strings=None,
        kv_cache_dtype="int8",
    )
    *_, tokens_generated = model.generator.steps(model.params, embeds, padded_mask, request, chunk=8)
    np.testing.assert_array_equal(tokens_generated, full_ids[:, prompt:])


# ----------------------------------------------------------------------------- 3. compile counting


def compile_counts(model):
    return (model.generator.prefill._cache_size(), model.generator.decode._cache_size(), model._embed._cache_size())


def test_no_recompilation_within_a_bucket(text_pair):
    """After warm-up, other prompt lengths in the same bucket, sampling settings and
    max_new_tokens in the same cache bucket compile nothing."""
    # A fresh model object over the same weights: its jitted functions start with empty caches.
    model = aria_jax.AriaTextForCausalLM(text_pair.ours.config, text_pair.ours.params, "float32")
    vocab = model.config.vocab_size
    lengths = (9, 10, 12, 13, 15, 16)
    assert len({bucket_length(n) for n in lengths}) == 1
    new_tokens = (10, 14)
    assert len({bucket_length(bucket_length(16) + n) for n in new_tokens}) == 1
    ids, _ = left_padded(0, (lengths[0],), vocab)
    model.generate(ids, max_new_tokens=new_tokens[0])
    model.generate(ids, max_new_tokens=new_tokens[0], do_sample=True, temperature=0.7, top_p=0.9)
    warm = compile_counts(model)
    assert warm == (1, 1, 1), warm

    events = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outputs = []
        for i, length in enumerate(lengths):
            ids, _ = left_padded(10 + i, (length,), vocab)
            for temperature in (0.5, 1.0, 1.7):
                for top_p in (0.8, 1.0):
                    n = new_tokens[(i + int(top_p)) % 2]
                    out = model.generate(
                        ids, max_new_tokens=n, do_sample=True, temperature=temperature, top_p=top_p, seed=i
                    )
                    assert out.shape == (1, length + n)
                    outputs.append(out[0, length:])
            model.generate(ids, max_new_tokens=new_tokens[i % 2])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compile_counts(model) == warm
    assert len({tuple(o.tolist()) for o in outputs}) > 1, "sampling settings changed nothing"
    print(f"backend compilations after warm-up (any function): {len(events)}")


# Layers of weights that no instruction of a CPU decode step may copy: they reach the loop over
# steps whole (a layer's attention and shared experts) or are gathered from (routed experts).
# Sizes chosen so that no other array of the loop has a weight's size (one expert's weights, which
# the looped backend copies, included).
CPU_DECODE = AriaTextConfig(
    vocab_size=96,
    hidden_size=40,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=5,
    num_key_value_heads=5,
    head_dim=16,
    moe_num_experts=12,
    moe_topk=2,
    moe_num_shared_experts=3,
    max_position_embeddings=128,
)
CPU_DECODE_CACHE = 80


def step_loop_instructions(module: Module) -> list:
    """The instructions of the entry's loops, and of the loops and branches inside them (not the
    insides of fusions)."""
    entry = module.computations[module.entry]
    pending = [
        name
        for instruction in entry.instructions
        if instruction.opcode == "while"
        for name in instruction.called("body")
    ]
    found = []
    while pending:
        for instruction in module.computations[pending.pop()].instructions:
            found.append(instruction)
            for key in ("body", "condition", "branch_computations", "true_computation", "false_computation"):
                pending += instruction.called(key)
    return found


@pytest.mark.parametrize("batch", [1, 3])  # 2 (token, slot) pairs: gathered experts; 6: looped
def test_cpu_decode_step_copies_no_layer_weights(batch):
    """XLA:CPU copies a slice of the layer-stacked weights for every matmul that reads it: decode
    on one CPU device takes each layer's weights out of the stacks once per call, ahead of its
    loop over steps, and the MoE reads the experts it needs in the stacks. No instruction of the
    loop that makes an array (not a view of the loops' state) has the size of a layer's weight
    matrix or of a layer's routed experts; the only ones of a layer cache's size are the caches'
    in-place writes (`attention.attention_beside_cache`)."""
    config = CPU_DECODE
    model = aria_jax.AriaTextForCausalLM(config, init_text_params(config, jax.random.key(0)), "float32")
    layers = model.params["layers"]
    weight_sizes = {leaf.size // config.num_hidden_layers for leaf in jax.tree.leaves(layers) if leaf.ndim >= 3}
    assert len(weight_sizes) >= 3, weight_sizes  # attention, shared experts, routed experts
    ids, mask = left_padded(5, (9,) * batch, config.vocab_size)
    prompt = model.prompt(
        ids, mask, max_new_tokens=8, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop_strings=None
    )
    embeds, padded_mask, request = model.prompt_embeddings(prompt), prompt.padded_mask, prompt.request
    prompt_len = embeds.shape[1]
    generator = model.generator
    state = generator.prefill(
        model.text_params,
        embeds,
        jnp.asarray(padded_mask),
        request.sampling,
        request.stop_ids,
        cache_length=CPU_DECODE_CACHE,
        max_new_tokens_capacity=CPU_DECODE_CACHE - prompt_len,
    )
    hlo = (
        generator.decode.lower(
            model.text_params, state, 8, 8, request.sampling, request.stop_ids, prompt_len=prompt_len
        )
        .compile()
        .as_text()
    )
    made = [
        instruction
        for instruction in step_loop_instructions(Module.parse(hlo))
        if instruction.opcode not in ("parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional")
    ]
    assert any(instruction.opcode == "dot" for instruction in made), "no matmul found in the loop over steps"

    def making(sizes):
        return [
            f"{instruction.name} = {instruction.shape}"
            for instruction in made
            if any(math.prod(array.dims) in sizes for array in arrays_of(instruction.shape))
        ]

    copies = making(weight_sizes)
    assert not copies, f"the loop over decode steps makes arrays the size of a layer's weights: {copies}"
    # Each layer's keys and values are written in place, and not copied to be read or written.
    cache_size = batch * config.num_key_value_heads * CPU_DECODE_CACHE * config.head_dim
    assert cache_size not in weight_sizes
    writes = making({cache_size})
    assert len(writes) == 2 * config.num_hidden_layers, writes
    assert all("dynamic-update-slice" in write.split(" = ")[0] for write in writes), writes


# ----------------------------------------------------------------------------- 4. sampling

ROWS = 40_000
LOGITS = np.array([2.0, 1.2, 0.9, 0.3, -0.4, -1.0, -1.5, -2.5], np.float32)

_sample = jax.jit(sample_tokens)


def seed_words(first: int, rows: int) -> jax.Array:
    """Seeds first, first + 1, ... as Sampling holds them: (rows, 2) uint32 [high, low] words."""
    low = jnp.arange(first, first + rows, dtype=jnp.uint32)
    return jnp.stack([jnp.zeros_like(low), low], axis=-1)


def sample_many(logits, temperature, top_k=0, top_p=1.0, seed_offset=0, step=0, rows=ROWS):
    sampling = Sampling(
        jnp.full((rows,), temperature, jnp.float32),
        jnp.full((rows,), top_k, jnp.int32),
        jnp.full((rows,), top_p, jnp.float32),
        seed_words(seed_offset, rows),
    )
    return np.asarray(_sample(jnp.broadcast_to(jnp.asarray(logits), (rows, len(logits))), jnp.int32(step), sampling))


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def assert_matches_distribution(samples, probs, what):
    counts = np.bincount(samples, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, f"{what}: samples outside the support: {counts}"
    if support.sum() == 1:
        return
    result = scipy.stats.chisquare(counts[support], probs[support] / probs[support].sum() * len(samples))
    assert result.pvalue > 1e-3, f"{what}: chi2 {result.statistic:.1f}, p {result.pvalue:.2e}, counts {counts}"


@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.5])
def test_sampling_frequencies_match_softmax(temperature):
    samples = sample_many(LOGITS, temperature)
    assert_matches_distribution(samples, softmax(LOGITS / temperature), f"t={temperature}")
    # Not blind: the frequencies are far from the untempered distribution when t != 1.
    if temperature != 1.0:
        counts = np.bincount(samples, minlength=len(LOGITS))
        assert scipy.stats.chisquare(counts, softmax(LOGITS) * ROWS).pvalue < 1e-6


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_only_emits_the_k_largest(top_k):
    samples = sample_many(LOGITS[::-1].copy(), 1.5, top_k=top_k)  # largest logits at the end
    allowed = np.argsort(-LOGITS[::-1])[:top_k]
    probs = np.zeros(len(LOGITS))
    probs[allowed] = softmax(LOGITS[::-1][allowed] / 1.5)
    assert_matches_distribution(samples, probs, f"top_k={top_k}")
    assert set(np.unique(samples)) == set(allowed.tolist())


@pytest.mark.parametrize("top_p, temperature", [(0.5, 1.0), (0.8, 1.0), (0.9, 0.7)])
def test_top_p_only_emits_the_nucleus(top_p, temperature):
    probs = softmax(LOGITS / temperature)
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    size = int(np.argmax(cumulative >= top_p)) + 1  # smallest set with mass >= top_p
    assert abs(cumulative[size - 1] - top_p) > 1e-3 and (size == 1 or abs(cumulative[size - 2] - top_p) > 1e-3)
    nucleus = order[:size]
    samples = sample_many(LOGITS, temperature, top_p=top_p)
    expected = np.zeros(len(LOGITS))
    expected[nucleus] = probs[nucleus]
    assert_matches_distribution(samples, expected, f"top_p={top_p}")
    assert set(np.unique(samples)) == set(nucleus.tolist()), (np.unique(samples), nucleus)


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (256, 50)) * 3
    sampling = Sampling(jnp.zeros(256), jnp.full(256, 5, jnp.int32), jnp.full(256, 0.3), seed_words(0, 256))
    np.testing.assert_array_equal(
        np.asarray(_sample(logits, jnp.int32(3), sampling)), np.argmax(np.asarray(logits), axis=-1)
    )


def test_seeds_reproduce_and_differ():
    first = sample_many(LOGITS, 1.0, rows=2000)
    np.testing.assert_array_equal(first, sample_many(LOGITS, 1.0, rows=2000))
    assert (first != sample_many(LOGITS, 1.0, rows=2000, seed_offset=2000)).mean() > 0.3
    assert (first != sample_many(LOGITS, 1.0, rows=2000, step=1)).mean() > 0.3


def test_model_sampling_seed_reproduces(text_pair):
    ids, mask = left_padded(3, (6, 9), text_pair.ours.config.vocab_size)
    kwargs = dict(max_new_tokens=20, do_sample=True, temperature=1.5)
    a = text_pair.ours.generate(ids, mask, seed=1, **kwargs)
    np.testing.assert_array_equal(a, text_pair.ours.generate(ids, mask, seed=1, **kwargs))
    assert (a != text_pair.ours.generate(ids, mask, seed=5, **kwargs)).any()


# ----------------------------------------------------------------------------- 5. invalid requests


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(do_sample=True, temperature=-0.5), "temperature=-0.5"),
        (dict(do_sample=True, top_p=0.0), "top_p=0.0"),
        (dict(do_sample=True, top_p=1.5), "top_p=1.5"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8'"),
        (dict(kv_cache_dtype=np.int8), "kv_cache_dtype=<class 'numpy.int8'>"),
    ],
)
def test_invalid_request_is_rejected_and_model_still_serves(text_pair, settings, named):
    model = text_pair.ours
    ids, mask = left_padded(4, (7, 12), model.config.vocab_size)
    before = model.generate(ids, mask, max_new_tokens=16)
    with pytest.raises(aria_jax.RequestError, match=named.replace(".", r"\.")):
        model.generate(ids, mask, **{"max_new_tokens": 16, **settings})
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=16), before)


def test_prompt_longer_than_context_is_rejected(text_pair):
    model = text_pair.ours
    ids, mask = left_padded(4, (7, 12), model.config.vocab_size)
    before = model.generate(ids, mask, max_new_tokens=16)
    long_ids, _ = left_padded(9, (CONTEXT + 5,), model.config.vocab_size)
    with pytest.raises(aria_jax.RequestError, match=rf"{CONTEXT + 5} tokens.*{CONTEXT}"):
        model.generate(long_ids, max_new_tokens=1)
    # Fits alone but not with the new tokens.
    with pytest.raises(aria_jax.RequestError, match=rf"max_new_tokens=20.*{CONTEXT}"):
        model.generate(long_ids[:, : CONTEXT - 10], max_new_tokens=20)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=16), before)


def test_more_images_than_markers_is_rejected(tiny_random):
    processor, model = tiny_random
    images = [noise_image(1, 60, 40), noise_image(2, 30, 50)]
    inputs = processor(text=CHAT_PROMPT.format("<|img|>What is this?"), images=images[:1])
    before = model.generate(**inputs, max_new_tokens=8, stop_strings=None)
    with pytest.raises(ValueError, match=r"1 <\|img\|> placeholder\(s\) but 2 image\(s\)"):
        processor(text=CHAT_PROMPT.format("<|img|>What is this?"), images=images)
    # The model itself refuses pixel values that do not match its image tokens (two images' crops).
    two = processor(text=CHAT_PROMPT.format("<|img|><|img|>"), images=images)
    with pytest.raises(aria_jax.RequestError, match=r"image tokens and image features do not match"):
        model.generate(
            inputs["input_ids"], inputs["attention_mask"], two["pixel_values"], two["pixel_mask"], max_new_tokens=8
        )
    np.testing.assert_array_equal(model.generate(**inputs, max_new_tokens=8, stop_strings=None), before)


# ----------------------------------------------------------------------------- 6. stop strings, streaming

STOP_TOKENS = 40


def pick_stop_string(tokenizer, generated):
    """A stop string spanning the boundary between tokens k and k + 1 (mid-generation), first
    complete once token k + 1 is there. -> (stop, k + 1).

    Only where decoding is prefix-stable up to token k + 1 (each prefix's text extends the
    previous one): byte-fallback tokens can change the text of earlier bytes (see the report on
    `Generator.stream`), which is not what this test is about."""
    texts = [tokenizer.decode(generated[:j]) for j in range(len(generated) + 1)]
    for k in range(4, len(generated) - 2):
        if not all(texts[j + 1].startswith(texts[j]) for j in range(k + 2)):
            break
        a, b, c = texts[k], texts[k + 1], texts[k + 2]
        if len(b) - len(a) < 2 or len(c) - len(b) < 2:
            continue
        stop = b[-2:] + c[len(b) : len(b) + 2]
        if "\ufffd" in stop or "<" in stop or stop in b or len(tokenizer.encode(stop)) < 2 or not stop.isprintable():
            continue
        return stop, k + 1
    raise AssertionError(f"no usable stop string in {texts[-1]!r}")


@pytest.fixture(scope="module")
def greedy_story(tiny_random):
    processor, model = tiny_random
    inputs = processor(text=CHAT_PROMPT.format("Describe the sea in detail."))
    prompt = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=STOP_TOKENS, stop_strings=None)[0, prompt:]
    assert (generated != model.text_config.pad_token_id).all(), "generation ended early; pick another prompt"
    return inputs, generated


def test_multi_token_stop_string_stops_after_completing_token(tiny_random, greedy_story):
    processor, model = tiny_random
    inputs, generated = greedy_story
    stop, last = pick_stop_string(processor.tokenizer, generated)
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=STOP_TOKENS, stop_strings=[stop])[0, prompt:]
    np.testing.assert_array_equal(out[: last + 1], generated[: last + 1])
    assert (out[last + 1 :] == model.text_config.pad_token_id).all(), (stop, last, out)
    assert stop in processor.decode(out[: last + 1])
    assert stop not in processor.decode(out[:last])


def stream_case(tiny_random, greedy_story):
    processor, model = tiny_random
    inputs, generated = greedy_story
    stop, last = pick_stop_string(processor.tokenizer, generated)
    pieces = list(model.stream(**inputs, max_new_tokens=STOP_TOKENS, stop_strings=[stop]))
    expected = processor.decode(generated[: last + 1], skip_special_tokens=True).split(stop, 1)[0]
    return pieces, expected, stop


def test_stream_stops_at_stop_string(tiny_random, greedy_story):
    """The stream stops at the stop string, never shows it whole, and before it shows exactly the
    decoded answer."""
    pieces, expected, stop = stream_case(tiny_random, greedy_story)
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    text = "".join(pieces)
    assert text.startswith(expected) and len(text) < len(expected) + len(stop) and stop not in text, (text, stop)


def test_stream_matches_decoded_answer_up_to_stop(tiny_random, greedy_story):
    pieces, expected, _ = stream_case(tiny_random, greedy_story)
    assert "".join(pieces) == expected


def test_stream_without_stop_string_is_the_decoded_answer(tiny_random, greedy_story):
    processor, model = tiny_random
    inputs, generated = greedy_story
    stop, last = pick_stop_string(processor.tokenizer, generated)
    pieces = list(model.stream(**inputs, max_new_tokens=last + 1, stop_strings=None))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == processor.decode(generated[: last + 1], skip_special_tokens=True)


def test_stream_batch_yields_tuples(tiny_random):
    processor, model = tiny_random
    inputs = processor(text=[CHAT_PROMPT.format("Hi"), CHAT_PROMPT.format("Describe the sea in detail.")])
    prompt = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=16, stop_strings=None)[:, prompt:]
    pieces = list(model.stream(**inputs, max_new_tokens=16, stop_strings=None))
    assert pieces and all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pieces)
    eos = set(model.text_config.eos_token_id)
    for row in range(2):
        ids = generated[row].tolist()
        end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        expected = processor.decode(ids[:end], skip_special_tokens=True).rstrip("\ufffd")
        assert "".join(p[row] for p in pieces) == expected
        assert expected


def test_stream_keeps_going_after_byte_fallback_rewrites_text(tiny_random):
    """Byte tokens that form an invalid UTF-8 sequence rewrite earlier decoded text; the stream
    must not fall silent after that: it still ends with the answer's last characters."""
    processor, model = tiny_random
    inputs = processor(text="<|im_start|>user\nTell me a story about a cat.<|im_end|>\n<|im_start|>assistant\n")
    generated = model.generate(**inputs, max_new_tokens=40, stop_strings=None)[0, inputs["input_ids"].shape[1] :]
    final = processor.decode(generated, skip_special_tokens=True)
    streamed = "".join(model.stream(**inputs, max_new_tokens=40, stop_strings=None))
    assert len(streamed) == len(final) and streamed[-5:] == final[-5:], (streamed, final)
