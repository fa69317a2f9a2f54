"""What transformers' Aria accepts, we accept, with the same results.

Ports of transformers' own tests for Aria (tests/models/aria/) that need no hub download and
whose expectations are about behaviour, each run against aria-jax and, where the result is a
value, held to transformers' output on the same input:

- test_modeling_aria.py, AriaVisionText2TextModelTester's config: vision image_size 358 with
  patch_size 10 (a floored 35 x 35 grid), projector_patch_to_query_dict {1225: 128, 4900: 256}
  whose 4900 key no crop can have, and a query table of max(values) rows, more than any used
  count -> `test_tester_style_config_matches_transformers` (logits parity on a tiny random
  model with all three traits).
- test_image_processing_aria.py: test_image_processor_properties, test_call_numpy,
  test_call_numpy_4_channels, test_call_pil, test_call_pytorch (channels-first tensors),
  test_get_num_patches_without_images (via `count_crops`) -> the `test_image_processor_*` tests,
  which also compare pixel_values / pixel_mask with AriaImageProcessorPil.
- test_processing_aria.py: test_process_interleaved_images_prompts_no_image_splitting (nested
  per-prompt images, left padding), test_non_nested_images_with_batched_text,
  test_apply_chat_template (rendering with a string content item mixed in),
  test_image_chat_template_accepts_processing_kwargs (padding="max_length", truncation,
  max_length, return_dict, return_tensors through apply_chat_template),
  test_special_mm_token_truncation (truncating into image tokens is an error) -> the
  `test_processor_*` tests, on a processor checkpoint written by transformers with
  size_conversion {490: 2, 980: 2} as theirs uses.

Where we differ on purpose (README "Where aria-jax is stricter"): `num_crops` is one count per
image and each `<|img|>` is expanded by its own image's crop count (transformers uses the
batch-wide maximum, which breaks batches of split images with different crop counts).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import aria_jax
from aria_jax.image_processing import AriaImageProcessor
from aria_jax.processing import AriaProcessor
from aria_jax.tokenizer import DEFAULT_CHAT_TEMPLATE
from tiny_models import make_multimodal_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-random")
IMAGE_TOKEN_ID = 9
TOLERANCE = 1e-4  # as tests/test_multimodal_parity.py: relative to the reference's scale


# ----------------------------------------------------------------------------- configs and model

def test_tester_style_config_matches_transformers(tmp_path):
    """A tiny model with the three traits of transformers' tester config: image_size 30 with
    patch 14 (2 x 2 patches, 2 pixels dropped), an unused key (16 patches > 4) and a query
    table of 9 rows (an unused key's count) where crops use 2 and 4. Crops of side 30 and 15
    (a 1 x 1 grid plus a 1-pixel remainder): logits and greedy tokens as transformers'."""
    make_multimodal_model(tmp_path, seed=3, vision_overrides=dict(image_size=30, patch_size=14),
                          projector_patch_to_query={1: 2, 4: 4, 16: 9})
    reference = transformers.AriaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, experts_implementation="eager").eval()
    assert reference.model.multi_modal_projector.query.shape[0] == 9
    ours = aria_jax.AriaForConditionalGeneration.from_pretrained(tmp_path, dtype="float32")
    assert ours.config.max_queries == 9 and ours.config.used_patch_to_query == ((1, 2), (4, 4))
    assert ours.params["multi_modal_projector"]["query"].shape[0] == 9

    rng = np.random.default_rng(0)
    for side, queries in ((30, 4), (15, 2)):
        pixel_values = rng.standard_normal((2, 3, side, side)).astype(np.float32)
        pixel_mask = np.ones((2, side, side), bool)
        pixel_mask[1, :, side * 2 // 3:] = False   # the second crop is padded on the right
        text = rng.integers(10, 128, (2, 5))
        input_ids = np.concatenate([np.full((2, queries), IMAGE_TOKEN_ID), text], axis=1)
        input_ids[0, queries:] = text[0]
        attention_mask = np.ones_like(input_ids)
        attention_mask[1, :2] = 0                  # row 1 is left-padded
        input_ids[1] = np.concatenate([[2, 2], input_ids[1, :-2]])
        input_ids[1, 2:2 + queries] = IMAGE_TOKEN_ID
        input_ids[1, 2 + queries:] = text[1, :5 - 2]
        # crop 0 goes to row 0, crop 1 to row 1
        position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
        with torch.no_grad():
            expected = reference(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                                 position_ids=torch.from_numpy(position_ids),
                                 pixel_values=torch.from_numpy(pixel_values),
                                 pixel_mask=torch.from_numpy(pixel_mask)).logits.numpy()
        got = np.asarray(ours(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              pixel_mask=pixel_mask).logits)
        keep = attention_mask.astype(bool)
        scale = max(1.0, float(np.abs(expected[keep]).max()))
        assert np.abs(got[keep] - expected[keep]).max() <= TOLERANCE * scale, side

        with torch.no_grad():
            expected_tokens = reference.generate(
                input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                pixel_values=torch.from_numpy(pixel_values), pixel_mask=torch.from_numpy(pixel_mask),
                do_sample=False, max_new_tokens=6, pad_token_id=2, eos_token_id=2).numpy()
        got_tokens = np.asarray(ours.generate(input_ids, attention_mask, pixel_values, pixel_mask, max_new_tokens=6))
        # transformers stops once every row has ended; ours fills the rest with the pad id (2)
        np.testing.assert_array_equal(got_tokens[:, :expected_tokens.shape[1]], expected_tokens)
        assert (got_tokens[:, expected_tokens.shape[1]:] == 2).all()
