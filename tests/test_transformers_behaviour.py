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
  test_apply_chat_template (a bare string content item is refused here, see below),
  test_image_chat_template_accepts_processing_kwargs (padding="max_length", truncation,
  max_length, return_dict, return_tensors through apply_chat_template),
  test_special_mm_token_truncation (truncating into image tokens is an error) -> the
  `test_processor_*` tests, on a processor checkpoint written by transformers with
  size_conversion {490: 2, 980: 2} as theirs uses.

Where we differ on purpose (README "Where aria-jax is stricter"): `num_crops` is one count per
image and each `<|img|>` is expanded by its own image's crop count (transformers uses the
batch-wide maximum, which breaks batches of split images with different crop counts), and a
bare string content item, which Aria's template would drop silently, is an error.
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
from repo_paths import TINY_RANDOM

IMAGE_TOKEN_ID = 9
TOLERANCE = 1e-4  # as tests/test_multimodal_parity.py: relative to the reference's scale


# ----------------------------------------------------------------------------- configs and model


def test_tester_style_config_matches_transformers(tmp_path):
    """A tiny model with the three traits of transformers' tester config: image_size 30 with
    patch 14 (2 x 2 patches, 2 pixels dropped), an unused key (16 patches > 4) and a query
    table of 9 rows (an unused key's count) where crops use 2 and 4. Crops of side 30 and 15
    (a 1 x 1 grid plus a 1-pixel remainder): logits as transformers'. (Greedy generation is
    held to transformers in test_multimodal_parity.py; here only the image path is new.)"""
    make_multimodal_model(
        tmp_path,
        seed=3,
        vision_overrides=dict(image_size=30, patch_size=14),
        projector_patch_to_query={1: 2, 4: 4, 16: 9},
    )
    reference = transformers.AriaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    assert reference.model.multi_modal_projector.query.shape[0] == 9
    ours = aria_jax.AriaForConditionalGeneration.from_pretrained(tmp_path, dtype="float32")
    assert ours.config.max_queries == 9 and ours.config.used_patch_to_query == ((1, 2), (4, 4))
    assert ours.params["multi_modal_projector"]["query"].shape[0] == 9

    rng = np.random.default_rng(0)
    for side, queries in ((30, 4), (15, 2)):
        pixel_values = rng.standard_normal((2, 3, side, side)).astype(np.float32)
        pixel_mask = np.ones((2, side, side), bool)
        pixel_mask[1, :, side * 2 // 3 :] = False  # the second crop is padded on the right
        # row 0: its crop's image tokens then text; row 1: left padding, its crop, text
        text = rng.integers(10, 128, (2, 5)).tolist()
        input_ids = np.asarray(
            [[IMAGE_TOKEN_ID] * queries + text[0], [2, 2] + [IMAGE_TOKEN_ID] * queries + text[1][:3]]
        )
        attention_mask = (np.arange(input_ids.shape[1]) >= np.asarray([[0], [2]])).astype(np.int64)
        position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
        with torch.no_grad():
            expected = reference(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(position_ids),
                pixel_values=torch.from_numpy(pixel_values),
                pixel_mask=torch.from_numpy(pixel_mask),
            ).logits.numpy()
        keep = attention_mask.astype(bool)
        scale = max(1.0, float(np.abs(expected[keep]).max()))
        got = np.asarray(
            ours(input_ids, attention_mask=attention_mask, pixel_values=pixel_values, pixel_mask=pixel_mask).logits
        )
        assert np.abs(got[keep] - expected[keep]).max() <= TOLERANCE * scale, side
        # the pixels past the last whole patch are not read; the others are
        whole = side // 14 * 14
        remainder_changed, inside_changed = pixel_values.copy(), pixel_values.copy()
        remainder_changed[:, :, whole:, :] = 7.0
        remainder_changed[:, :, :, whole:] = 7.0
        inside_changed[:, :, :whole, :whole] += 1.0
        for changed, same in ((remainder_changed, True), (inside_changed, False)):
            logits = np.asarray(
                ours(input_ids, attention_mask=attention_mask, pixel_values=changed, pixel_mask=pixel_mask).logits
            )
            assert np.array_equal(logits, got) == same, (side, same)


# ----------------------------------------------------------------------------- image processor
# test_image_processing_aria.py: AriaImageProcessingTester's options and random images of 30..40
# pixels, channels first, given as PIL images, numpy arrays channels last, torch tensors.

TESTER_OPTIONS = dict(
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    max_image_size=980,
    min_image_size=336,
    split_resolutions=[[980, 980]],
    split_image=True,
    do_convert_rgb=True,
    do_normalize=True,
    resample=Image.Resampling.BICUBIC,
)
BATCH_SIZE = 7


def make_tester_images(form: str, channels: int = 3, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(BATCH_SIZE):
        width, height = rng.integers(30, 40, 2)
        image = rng.integers(0, 255, (channels, width, height), dtype=np.uint8)
        images.append(
            {
                "pil": lambda: Image.fromarray(np.moveaxis(image, 0, -1)),
                "numpy": lambda: image.transpose(1, 2, 0),
                "torch": lambda: torch.from_numpy(image),
            }[form]()
        )
    return images


def test_image_processor_properties():
    processor = AriaImageProcessor(**TESTER_OPTIONS)
    for name in (
        "do_convert_rgb",
        "max_image_size",
        "min_image_size",
        "do_normalize",
        "image_mean",
        "image_std",
        "split_image",
    ):
        assert hasattr(processor, name), name


@pytest.mark.parametrize("form,channels", [("pil", 3), ("numpy", 3), ("numpy", 4), ("torch", 3)])
def test_image_processor_calls(form, channels):
    """test_call_pil / test_call_numpy / test_call_numpy_4_channels / test_call_pytorch: one
    image gives (1, 3, 980, 980), the batch (7, 3, 980, 980) (each image is one 980 crop of
    the single 980 x 980 split resolution); pixels equal AriaImageProcessorPil's."""
    ours, oracle = AriaImageProcessor(**TESTER_OPTIONS), transformers.AriaImageProcessorPil(**TESTER_OPTIONS)
    images = make_tester_images(form, channels)
    assert ours(images[0], return_tensors="pt")["pixel_values"].shape == (1, 3, 980, 980)
    got = ours(images, return_tensors="pt")
    assert tuple(got["pixel_values"].shape) == (BATCH_SIZE, 3, 980, 980)
    for index in (0, BATCH_SIZE - 1):
        expected = oracle(images[index], return_tensors="np")
        np.testing.assert_array_equal(got["pixel_values"][index].numpy(), expected["pixel_values"][0])
        np.testing.assert_array_equal(got["pixel_mask"][index].numpy(), expected["pixel_mask"][0])


def test_image_processor_num_patches_without_images():
    """test_get_num_patches_without_images and test_get_num_patches_ceil_matches_actual_patch_count:
    crop counts from the size alone, as get_number_of_image_patches gives them."""
    tester = AriaImageProcessor(**TESTER_OPTIONS)
    assert tester.count_crops(100, 100, split_image=False) == 1
    assert tester.count_crops(300, 500, split_image=True) == 1
    full = AriaImageProcessor(**{**TESTER_OPTIONS, "split_resolutions": None})
    oracle = transformers.AriaImageProcessorPil(**{**TESTER_OPTIONS, "split_resolutions": None})
    for height, width in ((300, 600), (600, 300), (300, 1470), (1470, 300), (800, 800)):
        expected = oracle.get_number_of_image_patches(height, width, {"split_image": True, "max_image_size": 980})
        assert full.count_crops(height, width, 980, split_image=True) == expected
        pixels = np.zeros((height, width, 3), np.uint8)
        assert full(pixels, max_image_size=980, split_image=True)["num_crops"].tolist() == [expected]


# ----------------------------------------------------------------------------- processor
# test_processing_aria.py: a processor with size_conversion {490: 2, 980: 2} (2 image tokens per
# crop) and the test's chat template, written by transformers; the photos it downloads are
# replaced by noise images of similar sizes.

TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": True,
    "legacy": True,
    "bos_token": None,
    "eos_token": None,
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "tokenizer_class": "LlamaTokenizer",
    "clean_up_tokenization_spaces": False,
}
IMAGE_SEQ_LEN = 2


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    root = tmp_path_factory.mktemp("aria_processor")
    source, out = root / "source", root / "processor"
    source.mkdir()
    shutil.copy(os.path.join(TINY_RANDOM, "tokenizer.model"), source)
    (source / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    tokenizer = transformers.TokenizersBackend.from_pretrained(source, extra_special_tokens={"image_token": "<|img|>"})
    transformers.AriaProcessor(
        image_processor=transformers.AriaImageProcessorPil(),
        tokenizer=tokenizer,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        size_conversion={490: IMAGE_SEQ_LEN, 980: IMAGE_SEQ_LEN},
    ).save_pretrained(out)
    return transformers.AriaProcessor.from_pretrained(out), AriaProcessor.from_pretrained(out)


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        for shape in ((120, 90, 3), (80, 120, 3), (60, 100, 3))
    ]


def test_processor_no_image_splitting(processors):
    """test_process_interleaved_images_prompts_no_image_splitting and
    test_non_nested_images_with_batched_text."""
    ref, ours = processors
    image1, image2, image3 = photos()
    inputs = ours(text="Ok<|img|>", images=image1)
    assert inputs["pixel_values"].shape == (1, 3, 980, 980) and inputs["pixel_mask"].shape == (1, 980, 980)

    text = "In this image, we see"
    inputs = ours(text="<|img|>" + text, images=image1, return_tensors=None)
    expected_ids = [[IMAGE_TOKEN_ID] * IMAGE_SEQ_LEN + ours.tokenizer.encode(text, add_special_tokens=False)]
    assert inputs["input_ids"] == expected_ids and inputs["attention_mask"] == [[1] * len(expected_ids[0])]

    prompts = ["<|img|>" + text, "<|img|><|img|>" + text]
    nested = ours(text=prompts, images=[[image1], [image2, image3]], padding=True)
    row_1 = [IMAGE_TOKEN_ID] * IMAGE_SEQ_LEN + ours.tokenizer.encode(text, add_special_tokens=False)
    row_2 = [IMAGE_TOKEN_ID] * 2 * IMAGE_SEQ_LEN + ours.tokenizer.encode(text, add_special_tokens=False)
    pad = len(row_2) - len(row_1)
    assert nested["attention_mask"].tolist() == [[0] * pad + [1] * len(row_1), [1] * len(row_2)]
    assert nested["pixel_values"].shape == (3, 3, 980, 980) and nested["pixel_mask"].shape == (3, 980, 980)
    flat = ours(text=prompts, images=[image1, image2, image3], padding=True)
    np.testing.assert_array_equal(flat["input_ids"], nested["input_ids"])
    expected = ref(
        text=prompts, images=[[image1], [image2, image3]], padding=True, padding_side="left", return_tensors="np"
    )
    np.testing.assert_array_equal(nested["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(nested["pixel_values"], expected["pixel_values"])


def test_processor_image_splitting(processors):
    """test_process_interleaved_images_prompts_image_splitting: a wide image in 2 crops of 980."""
    _, ours = processors
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (400, 1400, 3), dtype=np.uint8))
    inputs = ours(images=wide, text="Ok<|img|>", images_kwargs={"split_image": True})
    assert inputs["pixel_values"].shape == (2, 3, 980, 980) and inputs["pixel_mask"].shape == (2, 980, 980)
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 2 * IMAGE_SEQ_LEN


def test_processor_apply_chat_template(processors):
    """test_apply_chat_template: text and image items, several turns. transformers' test also
    has a bare string item, which Aria's template drops without a word; we refuse it instead
    (README: where aria-jax is stricter), and render the rest as transformers does."""
    ref, ours = processors
    with pytest.raises(ValueError, match="content item"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image"}, "What do these images show?"]}])
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What do these images show?"}, {"type": "image"}, {"type": "image"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first image shows the statue of Liberty."}]},
        {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]},
    ]
    rendered = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.startswith(
        "<|im_start|>user\nWhat do these images show?<fim_prefix><|img|><fim_suffix>"
        "<fim_prefix><|img|><fim_suffix><|im_end|>\n"
    )
    assert rendered.endswith("<|im_start|>user\nAnd who is that?<|im_end|>\n<|im_start|>assistant\n")


def test_processor_chat_template_accepts_processing_kwargs(processors, tmp_path):
    """test_image_chat_template_accepts_processing_kwargs."""
    _, ours = processors
    messages = [[{"role": "user", "content": [{"type": "text", "text": "What is shown in this image?"}]}]]
    tokenized = ours.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, padding="max_length", max_length=50
    )
    assert len(tokenized[0]) == 50
    tokenized = ours.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, truncation=True, max_length=5
    )
    assert len(tokenized[0]) == 5
    path = tmp_path / "stop.png"
    photos()[0].save(path)
    messages[0][0]["content"].append({"type": "image", "url": str(path)})
    out = ours.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, max_image_size=980, return_tensors="np"
    )
    assert list(out["pixel_values"].shape) == [1, 3, 980, 980]


def test_processor_special_mm_token_truncation(processors):
    """test_special_mm_token_truncation: truncation=None keeps every image token; truncating
    into them is a ValueError."""
    _, ours = processors
    prompts = ["lower newer <|img|>", "upper older longer string <|img|>"]
    batch = photos()[:2]
    ours(text=prompts, images=batch, return_tensors="pt", truncation=None, padding=True)
    with pytest.raises(ValueError, match="cuts row 0's image tokens"):
        ours(text=prompts, images=batch, return_tensors="pt", truncation=True, padding=True, max_length=3)
