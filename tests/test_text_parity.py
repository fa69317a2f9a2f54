"""Float32 parity of the JAX text decoder with transformers' PyTorch Aria on the same weights.

Each tiny config is built once (random weights, norms included; tests/tiny_models.py), saved
with `save_pretrained`, and loaded from that directory by both sides:
- the oracle: transformers `AriaTextForCausalLM.from_pretrained(dir)` in float32, with
  `experts_implementation="eager"`: transformers' default ("grouped_mm") calls
  `torch._grouped_mm`, which on CPU requires 16-byte-aligned strides and so rejects the odd
  widths below ("strides should be multiple of 16 bytes"); eager is the same math.
- ours: `aria_jax.AriaTextForCausalLM.from_pretrained(dir, dtype="float32")`.

Logits are compared only where the attention mask is 1 (a left pad's row is garbage on both
sides) with one tolerance, LOGIT_TOLERANCE, relative to the logits' scale.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import aria_jax
from aria_jax.moe import route
from tiny_models import make_multimodal_model, make_text_model

# max |ours - reference| <= LOGIT_TOLERANCE * max(1, max |reference|), over attended positions.
LOGIT_TOLERANCE = 1e-4

PAD_ID = 2  # pad_token_id and eos_token_id of the tiny configs (transformers' defaults)
FIRST_TEXT_ID = 3  # prompts use ids >= 3: no bos/eos/pad inside a prompt
IMAGE_TOKEN_ID = 9  # AriaForConditionalGeneration's image token; never in a text-only prompt
LONG_PROMPT = 520  # > 512 positions, so RoPE is exercised far from 0 (rope_theta 10000)

# Every config is valid for both transformers and aria-jax: hidden_size % heads == 0 and an even
# head_dim. "odd_hidden" gets an odd hidden size (33) by giving head_dim explicitly (3 heads x 10
# = 30 != 33), which both implementations allow; its vocabulary (97) and expert width (11) are odd
# too. rope_theta is 10000 everywhere (tiny_models.TEXT_DEFAULTS).
CONFIGS = {
    "mha_top1_1layer": dict(
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=16,
        moe_num_experts=4,
        moe_topk=1,
        moe_num_shared_experts=2,
        num_hidden_layers=1,
    ),
    "gqa6x2_top2_3layers": dict(
        vocab_size=128,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=16,
        moe_num_experts=6,
        moe_topk=2,
        moe_num_shared_experts=2,
        num_hidden_layers=3,
        rms_norm_eps=1e-5,
    ),
    "gqa4x2_topk_eq_experts_shared1": dict(
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=12,
        moe_num_experts=3,
        moe_topk=3,
        moe_num_shared_experts=1,
        num_hidden_layers=2,
        hidden_act="gelu_pytorch_tanh",
    ),
    "odd_hidden33_gqa3x1_3layers": dict(
        vocab_size=97,
        hidden_size=33,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=10,
        intermediate_size=11,
        moe_num_experts=5,
        moe_topk=2,
        moe_num_shared_experts=3,
        num_hidden_layers=3,
    ),
}


@dataclasses.dataclass
class Pair:
    name: str
    reference: torch.nn.Module  # transformers, float32
    ours: aria_jax.AriaTextForCausalLM  # aria-jax, float32

    @property
    def vocab_size(self) -> int:
        return self.ours.config.vocab_size


def load_reference(cls, directory):
    return cls.from_pretrained(directory, dtype=torch.float32, experts_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory) -> Pair:
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    make_text_model(directory, seed=list(CONFIGS).index(name), **CONFIGS[name])
    reference = load_reference(transformers.AriaTextForCausalLM, directory)
    ours = aria_jax.AriaTextForCausalLM.from_pretrained(directory, dtype="float32")
    return Pair(name, reference, ours)


# ----------------------------------------------------------------------------- helpers


def random_ids(seed: int, shape, vocab_size: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(FIRST_TEXT_ID, vocab_size, size=shape)
    return np.where(ids == IMAGE_TOKEN_ID, IMAGE_TOKEN_ID + 1, ids).astype(np.int64)


def left_padded(seed: int, lengths, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the given lengths, left-padded with PAD_ID to the longest."""
    width = max(lengths)
    ids = random_ids(seed, (len(lengths), width), vocab_size)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = PAD_ID
        mask[row, width - length :] = 1
    return ids, mask


def cumsum_positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def reference_logits(model, ids, mask=None, position_ids=None) -> np.ndarray:
    kwargs = {"input_ids": torch.from_numpy(ids)}
    if mask is not None:
        kwargs["attention_mask"] = torch.from_numpy(mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(position_ids)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def assert_logits_close(ours, reference, mask=None, what="") -> float:
    """Asserts the tolerance over attended positions; returns the max abs diff."""
    ours = np.asarray(ours, np.float32)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    keep = np.ones(reference.shape[:2], bool) if mask is None else mask.astype(bool)
    assert np.isfinite(ours[keep]).all(), f"{what}: non-finite logits at attended positions"
    diff = float(np.abs(ours[keep] - reference[keep]).max())
    scale = max(1.0, float(np.abs(reference[keep]).max()))
    print(
        f"[{what}] max|diff| = {diff:.3e}  max|logit| = {scale:.3f}  "
        f"ratio = {diff / scale:.2e} (tolerance {LOGIT_TOLERANCE:.0e})"
    )
    assert diff <= LOGIT_TOLERANCE * scale, f"{what}: max |logit diff| {diff:.3e} > {LOGIT_TOLERANCE} * {scale:.3f}"
    return diff


# ----------------------------------------------------------------------------- forward parity

# The unpadded and left-padded batches share one shape, so ours compiles once for both.
BATCH_LENGTHS = (21, 14, 6, 1)


def test_logits_match(pair):
    ids = random_ids(1, (len(BATCH_LENGTHS), max(BATCH_LENGTHS)), pair.vocab_size)
    reference = reference_logits(pair.reference, ids)
    assert_logits_close(pair.ours(ids).logits, reference, what=f"{pair.name} {ids.shape}")


def test_left_padded_batch(pair):
    ids, mask = left_padded(2, BATCH_LENGTHS, pair.vocab_size)
    positions = cumsum_positions(mask)
    # transformers does not derive positions from the mask in a forward call: pass them.
    reference = reference_logits(pair.reference, ids, mask, positions)
    # Ours counts attended tokens by default; it must agree without and with explicit positions.
    default = pair.ours(ids, attention_mask=mask).logits
    assert_logits_close(default, reference, mask, what=f"{pair.name} left-padded, default positions")
    given = pair.ours(ids, attention_mask=mask, position_ids=positions).logits
    assert_logits_close(given, reference, mask, what=f"{pair.name} left-padded, given positions")


def test_positions_follow_the_mask(pair):
    """RoPE sees relative positions only, so with left padding any per-row constant offset (e.g.
    arange instead of the cumsum rule) gives the same logits: the test above cannot tell the
    default positions apart. Masks with holes (0s between tokens) can: there the cumsum rule and
    arange differ by more than a per-row constant."""
    ids, mask = left_padded(7, BATCH_LENGTHS, pair.vocab_size)
    mask[0, [3, 4, 10]] = 0
    mask[1, [9, 15]] = 0
    positions = cumsum_positions(mask)
    reference = reference_logits(pair.reference, ids, mask, positions)
    default = pair.ours(ids, attention_mask=mask).logits
    assert_logits_close(default, reference, mask, what=f"{pair.name} holes, default positions")
    # Given positions are used as given: arange matches transformers given arange, and differs.
    arange = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    reference_arange = reference_logits(pair.reference, ids, mask, arange)
    given = pair.ours(ids, attention_mask=mask, position_ids=arange).logits
    assert_logits_close(given, reference_arange, mask, what=f"{pair.name} holes, arange positions")
    changed = np.abs(reference_arange - reference)[mask.astype(bool)].max()
    assert changed > 100 * LOGIT_TOLERANCE, f"positions hardly matter here ({changed}): the test is blind"


def test_long_prompt(pair):
    ids = random_ids(3, (1, LONG_PROMPT), pair.vocab_size)
    reference = reference_logits(pair.reference, ids)
    assert_logits_close(pair.ours(ids).logits, reference, what=f"{pair.name} 1x{LONG_PROMPT}")


def test_router_choices_match(pair):
    """Both routers, fed transformers' own MoE inputs, pick the same experts with the same
    weights: a parity failure elsewhere is then not a routing tie."""
    captured = []
    hooks = [
        layer.mlp.router.register_forward_hook(lambda mod, args, out: captured.append((args[0], out)))
        for layer in pair.reference.model.layers
    ]
    try:
        reference_logits(pair.reference, random_ids(4, (2, 64), pair.vocab_size))
    finally:
        for hook in hooks:
            hook.remove()
    config = pair.ours.config
    assert len(captured) == config.num_hidden_layers
    kernels = np.asarray(pair.ours.params["layers"]["mlp"]["router"])  # (layers, D, E)
    for layer, (hidden, (ref_logits, ref_weights, ref_ids)) in enumerate(captured):
        logits, weights, ids = route(jnp.asarray(hidden.numpy()), jnp.asarray(kernels[layer]), config.moe_topk)
        np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(), rtol=0, atol=1e-5)
        sorted_logits = np.sort(ref_logits.numpy(), axis=-1)[:, ::-1]
        if config.moe_topk < config.moe_num_experts:
            margin = (sorted_logits[:, config.moe_topk - 1] - sorted_logits[:, config.moe_topk]).min()
            print(f"[{pair.name} layer {layer}] smallest top-k margin {margin:.3e}")
        order, ref_order = np.argsort(np.asarray(ids), -1), np.argsort(ref_ids.numpy(), -1)
        np.testing.assert_array_equal(
            np.take_along_axis(np.asarray(ids), order, -1), np.take_along_axis(ref_ids.numpy(), ref_order, -1)
        )
        # Softmax moves by at most the largest change of its inputs, so the weights may differ by
        # as much as the logits do (plus rounding), and no more.
        logit_error = float(np.abs(np.asarray(logits) - ref_logits.numpy()).max())
        np.testing.assert_allclose(
            np.take_along_axis(np.asarray(weights), order, -1),
            np.take_along_axis(ref_weights.numpy(), ref_order, -1),
            rtol=0,
            atol=logit_error + 1e-7,
        )


# ----------------------------------------------------------------------------- generation

GENERATE_TOKENS = 20


def reference_generate(model, ids, mask, eos_token_id) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=GENERATE_TOKENS,
            pad_token_id=PAD_ID,
            eos_token_id=eos_token_id,
        ).numpy()
    full = ids.shape[1] + GENERATE_TOKENS
    if out.shape[1] < full:
        # transformers stops once every row has produced eos; ours always returns the full
        # buffer. Only legitimate if every row did stop.
        new = out[:, ids.shape[1] :]
        assert np.isin(new, [eos_token_id]).any(axis=1).all(), out
        out = np.pad(out, ((0, 0), (0, full - out.shape[1])), constant_values=PAD_ID)
    return out


GENERATE_LENGTHS = (9, 5, 2)


def test_greedy_generate(pair):
    """Identical tokens to transformers' greedy generate on a left-padded batch."""
    ids, mask = left_padded(5, GENERATE_LENGTHS, pair.vocab_size)
    expected = reference_generate(pair.reference, ids, mask, PAD_ID)
    ours = pair.ours.generate(ids, mask, max_new_tokens=GENERATE_TOKENS)
    assert ours.shape == (len(GENERATE_LENGTHS), ids.shape[1] + GENERATE_TOKENS)
    np.testing.assert_array_equal(ours, expected)


# The stopping logic does not depend on the config: one config is enough.
@pytest.mark.parametrize("pair", ["gqa6x2_top2_3layers"], indirect=True)
def test_greedy_generate_pads_after_eos(pair):
    """With an eos that row 0 emits mid-way (and row 1 never does), row 0 is padded after it while
    the other rows keep generating, exactly as in transformers."""
    ids, mask = left_padded(5, GENERATE_LENGTHS, pair.vocab_size)
    prompt = ids.shape[1]
    new = reference_generate(pair.reference, ids, mask, PAD_ID)[:, prompt:]
    candidates = [
        (step, int(token))
        for step, token in enumerate(new[0, : GENERATE_TOKENS - 3])
        if step >= 1 and token != PAD_ID and token not in new[0, :step] and token not in new[1]
    ]
    assert candidates, f"no token usable as a mid-generation eos in {new}"
    step, eos = candidates[0]
    expected = reference_generate(pair.reference, ids, mask, eos)
    assert (expected[0, prompt + step + 1 :] == PAD_ID).all(), "reference did not stop row 0 at the eos"
    assert (expected[1, prompt:] != PAD_ID).all(), "reference stopped row 1"
    with_eos = aria_jax.AriaTextForCausalLM(
        dataclasses.replace(pair.ours.config, eos_token_id=(eos,)), pair.ours.params, "float32"
    )
    np.testing.assert_array_equal(with_eos.generate(ids, mask, max_new_tokens=GENERATE_TOKENS), expected)


# ----------------------------------------------------------------------------- multimodal checkpoint


def test_multimodal_checkpoint_text_logits(tmp_path_factory):
    """The text model of an `AriaForConditionalGeneration` checkpoint (language_model.* keys,
    next to vision tower and projector) gives the full transformers model's text-only logits."""
    directory = tmp_path_factory.mktemp("multimodal")
    make_multimodal_model(directory, seed=11, num_hidden_layers=2, moe_topk=2)
    reference = load_reference(transformers.AriaForConditionalGeneration, directory)
    ours = aria_jax.AriaTextForCausalLM.from_pretrained(directory, dtype="float32")

    ids, mask = left_padded(6, (30, 17), ours.config.vocab_size)
    assert not (ids == IMAGE_TOKEN_ID).any()
    expected = reference_logits(reference, ids, mask, cumsum_positions(mask))
    assert_logits_close(ours(ids, attention_mask=mask).logits, expected, mask, what="multimodal checkpoint")
