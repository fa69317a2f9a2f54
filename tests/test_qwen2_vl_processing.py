"""Qwen2-VL preprocessing against transformers 5: image processor (bit-identical to its PIL backend),
processor (ids, masks, pixels, grids), chat template, tokenizer, smart_resize, errors.

The checkpoint is the tiny one of tests/qwen2_vl_models.py (min_pixels 56*56, max_pixels
28*28*64). The photographs are the real ones inside the scikit-image wheel, read as files.
transformers' processor is assembled by `load_transformers_processor` (its `from_pretrained`
needs torchvision for the video processor).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from aria_jax.image_processing import ImageError
from aria_jax.processing import ProcessorError
from aria_jax.qwen2_vl.image_processing import Qwen2VLImageProcessor, smart_resize
from aria_jax.qwen2_vl.processing import Qwen2VLProcessor
from aria_jax.tokenizer import AriaTokenizer
from qwen2_vl_models import CHAT_TEMPLATE, MAX_PIXELS, MIN_PIXELS, SPECIAL_TOKENS, load_transformers_processor
from qwen2_vl_models import tiny_qwen2_vl_dir

PHOTO_DIR = os.path.join(os.path.dirname(importlib.util.find_spec("skimage").origin), "data")


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """A scikit-image photograph as an RGB PIL image, resized to (width, height) if given."""
    with Image.open(os.path.join(PHOTO_DIR, name)) as image:
        image = image.convert("RGB")
    return image.resize(size, Image.Resampling.BICUBIC) if size else image


def photos() -> list[Image.Image]:
    return [
        photo("astronaut.png"),  # 512 x 512
        photo("chelsea.png"),  # 451 x 300
        photo("coffee.png"),  # 600 x 400
        photo("rocket.jpg"),  # 640 x 427
        photo("astronaut.png", (333, 97)),  # odd sides
        photo("chelsea.png", (1500, 20)),  # very wide (75:1)
        photo("coffee.png", (41, 23)),  # below min_pixels: scaled up
        photo("rocket.jpg", (29, 57)),
    ]


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return tiny_qwen2_vl_dir()


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_transformers_processor(checkpoint, image_processor=Qwen2VLImageProcessorPil.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def processor(checkpoint) -> Qwen2VLProcessor:
    return Qwen2VLProcessor.from_pretrained(checkpoint)


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# The tiny checkpoint and the tokenizer
# --------------------------------------------------------------------------------------------


def test_tiny_checkpoint_is_laid_out_like_the_hub(checkpoint):
    from transformers import Qwen2VLConfig

    names = set(os.listdir(checkpoint))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "chat_template.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    config = Qwen2VLConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS))) and ids[-1] == len(tokenizer) - 1
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    with open(os.path.join(checkpoint, "chat_template.json"), encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE


TEXTS = [
    "The cat looks at the rocket, isn't it? 12345",
    "  leading spaces\n\n\ttabs and\r\nwindows lines  ",
    "Ünïcödé 😀 日本語 naïve café",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What?<|im_end|>\n",
    "I'LL DON'T we'd 3.14159 <|endoftext|>tail<|video_pad|>",
    "",
]


def test_tokenizer_gives_transformers_ids_and_text(checkpoint):
    ours, theirs = AriaTokenizer.from_pretrained(checkpoint, byte_level=True), AutoTokenizer.from_pretrained(checkpoint)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert sorted(ours.all_special_ids) == sorted(theirs.all_special_ids)
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (
        theirs.pad_token_id,
        theirs.eos_token_id,
        theirs.bos_token_id,
    )


def test_tokenizer_refuses_byte_level_unless_asked(checkpoint):
    from aria_jax.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="ByteLevel"):
        AriaTokenizer.from_pretrained(checkpoint)


# --------------------------------------------------------------------------------------------
# smart_resize and the image processor
# --------------------------------------------------------------------------------------------


def test_smart_resize_table_matches_transformers():
    sides = [1, 2, 13, 14, 27, 28, 29, 41, 42, 55, 56, 70, 97, 111, 224, 299, 333, 448, 511, 640, 1000, 1023, 2777]
    bounds = [(MIN_PIXELS, MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1280 * 28 * 28), (100, 10**8)]
    checked = 0
    for height in sides:
        for width in sides:
            for factor in (28, 32):
                for low, high in bounds:
                    try:
                        want = reference_smart_resize(height, width, factor, low, high)
                    except ValueError:
                        with pytest.raises(ImageError, match="aspect ratio"):
                            smart_resize(height, width, factor, low, high)
                        continue
                    assert smart_resize(height, width, factor, low, high) == want, (height, width, factor, low, high)
                    checked += 1
    assert checked > 3000
    # A tie rounds to even, as Python's round: 42 / 28 = 1.5 -> 56, 70 / 28 = 2.5 -> 56.
    assert smart_resize(42, 70, 28, 1, 10**9) == (56, 56)
    with pytest.raises(ImageError, match="aspect ratio 201.0; Qwen2-VL takes at most 200"):
        smart_resize(10, 2010)


@pytest.mark.parametrize("settings", [{"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}, {}])
def test_photos_match_transformers_pil_backend_bit_for_bit(settings):
    ours, theirs = Qwen2VLImageProcessor(**settings), Qwen2VLImageProcessorPil(**settings)
    images = photos() if settings else photos()[:2] + photos()[4:]  # the default 1280-token cap is slow
    got = ours(images)
    want = quiet(theirs, images, return_tensors="np")
    assert got["pixel_values"].dtype == np.float32 and got["image_grid_thw"].dtype == np.int64
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert np.array_equal(got["pixel_values"], want["pixel_values"])
    # Each image: t*h*w rows, and a grid whose area is within the pixel bounds.
    grids = got["image_grid_thw"]
    assert grids.prod(axis=1).sum() == got["pixel_values"].shape[0]
    assert all(ours.min_pixels <= h * w * 14 * 14 <= ours.max_pixels for _, h, w in grids.tolist())
    if settings:
        assert grids.tolist()[5:] == [[1, 2, 108], [1, 4, 6], [1, 6, 4]]  # wide, small, small portrait


def test_patch_order_is_merge_window_by_window():
    """Row r of pixel_values is patch (y, x) of the image, with the 2 x 2 windows row-major."""
    ours = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    height, width = 56, 84  # 4 x 6 patches, 2 x 3 windows
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = ours(image)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    rows = out["pixel_values"].reshape(24, 3, 2, 14, 14)
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])  # the still image is both frames
    order = [(2 * wy + dy, 2 * wx + dx) for wy in range(2) for wx in range(3) for dy in range(2) for dx in range(2)]
    for row, (y, x) in enumerate(order):
        want = image[14 * y : 14 * y + 14, 14 * x : 14 * x + 14].transpose(2, 0, 1)
        assert np.array_equal(rows[row, :, 0], want.astype(np.float32))


def test_input_kinds_give_the_same_pixels(tmp_path):
    ours = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image = photo("chelsea.png", (201, 133))
    array = np.asarray(image)
    path = tmp_path / "chelsea.png"
    image.save(path)
    want = ours(image)["pixel_values"]
    for kind in (array, array.transpose(2, 0, 1), torch.from_numpy(array.copy()), str(path), path, [[image]]):
        assert np.array_equal(ours(kind)["pixel_values"], want)
    theirs = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert np.array_equal(quiet(theirs, array.transpose(2, 0, 1), return_tensors="np")["pixel_values"], want)
    gray = photo("coffee.png", (90, 60)).convert("L")  # (transformers takes no 2-D arrays; we do)
    want = quiet(theirs, gray, return_tensors="np")["pixel_values"]
    assert np.array_equal(ours(gray)["pixel_values"], want)
    assert np.array_equal(ours(np.asarray(gray))["pixel_values"], want)


def test_return_tensors():
    ours = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image = photo("coffee.png", (64, 48))
    numpy_out = ours(image)
    assert isinstance(ours(image, return_tensors="pt")["pixel_values"], torch.Tensor)
    jax_out = ours(image, return_tensors="jax")
    assert isinstance(jax_out["image_grid_thw"], jax.Array)
    assert np.array_equal(np.asarray(jax_out["pixel_values"]), numpy_out["pixel_values"])
    with pytest.raises(ValueError, match="return_tensors='tf'"):
        ours(image, return_tensors="tf")


def test_from_pretrained_reads_both_config_generations(tmp_path):
    common = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    old = {**common, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 20}  # transformers 4.45, the hub's
    new = {**common, "size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 20}}  # transformers 5
    image = photo("rocket.jpg")
    results = []
    for name, settings in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(settings))
        ours = Qwen2VLImageProcessor.from_pretrained(tmp_path / name)
        assert (ours.min_pixels, ours.max_pixels) == (28 * 28 * 4, 28 * 28 * 20)
        theirs = Qwen2VLImageProcessorPil.from_pretrained(tmp_path / name)
        got, want = ours(image), quiet(theirs, image, return_tensors="np")
        assert np.array_equal(got["pixel_values"], want["pixel_values"])
        results.append(got["image_grid_thw"].tolist())
    assert results[0] == results[1] == [[1, 6, 10]]
    # transformers 5's processor_config.json wins over preprocessor_config.json.
    (tmp_path / "new" / "processor_config.json").write_text(
        json.dumps({"image_processor": {"max_pixels": 28 * 28 * 8}})
    )
    assert Qwen2VLImageProcessor.from_pretrained(tmp_path / "new").max_pixels == 28 * 28 * 8
    (tmp_path / "new" / "processor_config.json").write_text(json.dumps({"image_processor": {"patch_size": "14"}}))
    with pytest.raises(ValueError, match="processor_config.json: patch_size must be a positive int"):
        Qwen2VLImageProcessor.from_pretrained(tmp_path / "new")


def test_image_errors():
    ours = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageError, match=r"10x2500 \(height x width\) has aspect ratio 250.0"):
        ours(np.zeros((10, 2500, 3), np.uint8))
    with pytest.raises(ImageError, match="must be uint8"):
        ours(np.zeros((30, 30, 3), np.float32))
    with pytest.raises(ImageError, match="no pixels"):
        ours(np.zeros((0, 30, 3), np.uint8))
    with pytest.raises(ImageError, match="PIL images, uint8 arrays"):
        ours([object()])
    with pytest.raises(ImageError, match="multiples of 28"):
        Qwen2VLImageProcessor(do_resize=False)(np.zeros((30, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        ours([])
    with pytest.raises(ValueError, match="min_pixels=4000 is above max_pixels=3000"):
        Qwen2VLImageProcessor(min_pixels=4000, max_pixels=3000)
    with pytest.raises(ValueError, match="size=.*takes shortest_edge and longest_edge"):
        Qwen2VLImageProcessor(size={"height": 3})


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------

ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
TWO_IMAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare it with"}, {"type": "image"}]},
    {"role": "assistant", "content": "A cat and a cup."},
    {"role": "user", "content": [{"type": "text", "text": "Which is older?"}]},
]
NO_IMAGE = [{"role": "user", "content": "Tell me about rockets."}]


def test_chat_template_renders_like_transformers(processor, reference):
    for messages in (ONE_IMAGE, TWO_IMAGES, NO_IMAGE, [ONE_IMAGE, TWO_IMAGES]):
        for generation_prompt in (False, True):
            assert processor.apply_chat_template(
                messages, add_generation_prompt=generation_prompt
            ) == reference.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert processor.apply_chat_template(TWO_IMAGES, add_vision_id=True) == reference.apply_chat_template(
        TWO_IMAGES, add_vision_id=True
    )
    assert processor.apply_chat_template(ONE_IMAGE, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    )


def assert_same_inputs(got: dict, want: dict, keys=("input_ids", "attention_mask", "pixel_values", "image_grid_thw")):
    assert set(keys) <= set(got)
    for key in keys:
        assert np.asarray(got[key]).shape == np.asarray(want[key]).shape, key
        assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), key


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_different_image_counts_matches_transformers(processor, reference, padding_side):
    pictures = photos()
    prompts = [
        processor.apply_chat_template(ONE_IMAGE, add_generation_prompt=True),
        processor.apply_chat_template(TWO_IMAGES, add_generation_prompt=True),
    ]
    images = [[pictures[5]], [pictures[1], pictures[6]]]
    want = quiet(reference, text=prompts, images=images, padding=True, padding_side=padding_side, return_tensors="np")
    got = processor(text=prompts, images=images, padding_side=padding_side, return_mm_token_type_ids=True)
    assert_same_inputs(got, want, keys=(*want.keys(),))
    assert got["input_ids"].dtype == np.int32 and got["pixel_values"].dtype == np.float32
    assert got["attention_mask"].sum(axis=1).tolist() != [got["input_ids"].shape[1]] * 2  # padded
    # A flat image list means the same, and each placeholder took t*h*w/4 tokens.
    flat = processor(text=prompts, images=[pictures[5], pictures[1], pictures[6]], padding_side=padding_side)
    assert_same_inputs(flat, got)
    tokens = (got["input_ids"] == processor.image_token_id).sum()
    assert tokens == got["image_grid_thw"].prod(axis=1).sum() // 4


def test_single_prompts_and_text_only_match_transformers(processor, reference):
    pictures = photos()
    for index in (0, 2, 3, 4, 7):
        prompt = processor.apply_chat_template(ONE_IMAGE, add_generation_prompt=True)
        want = quiet(reference, text=prompt, images=pictures[index], return_tensors="np")
        assert_same_inputs(processor(text=prompt, images=pictures[index]), want)
    text = processor.apply_chat_template(NO_IMAGE, add_generation_prompt=True)
    got, want = processor(text=[text, "Hi"]), quiet(reference, text=[text, "Hi"], padding=True, padding_side="left")
    assert_same_inputs(got, want, keys=("input_ids", "attention_mask"))
    assert set(got) == {"input_ids", "attention_mask"}
    images_only = processor(images=pictures[:2])
    assert set(images_only) == {"pixel_values", "image_grid_thw"}


def test_padding_truncation_and_tensor_types(processor, reference):
    picture = photos()[6]
    prompts = [processor.apply_chat_template(ONE_IMAGE, add_generation_prompt=True), "Short text."]
    images = [picture]
    for options in (
        {"padding": "max_length", "max_length": 80},
        {"padding": True, "truncation": True, "max_length": 45},
        {"padding": False},
    ):
        want = quiet(reference, text=prompts, images=images, padding_side="right", **options)
        got = processor(text=prompts, images=images, padding_side="right", return_tensors=None, **options)
        assert got["input_ids"] == [list(row) for row in want["input_ids"]], options
        assert got["attention_mask"] == [list(row) for row in want["attention_mask"]], options
    with pytest.raises(
        ProcessorError, match=r"truncation to max_length=20 cuts row 0's <\|image_pad\|> tokens \(0 of 6 kept\)"
    ):
        processor(text=prompts, images=images, truncation=True, max_length=20)
    with pytest.raises(ValueError):  # transformers refuses the same cut
        quiet(reference, text=prompts, images=images, truncation=True, max_length=20)
    with pytest.raises(ProcessorError, match="padding=False cannot make return_tensors='np' arrays"):
        processor(text=prompts, images=images, padding=False)
    torch_out = processor(text=prompts, images=images, return_tensors="pt")
    jax_out = processor(text=prompts, images=images, return_tensors="jax")
    numpy_out = processor(text=prompts, images=images)
    assert isinstance(torch_out["input_ids"], torch.Tensor) and isinstance(jax_out["pixel_values"], jax.Array)
    for key in numpy_out:
        assert np.array_equal(torch_out[key].numpy(), numpy_out[key])
        assert np.array_equal(np.asarray(jax_out[key]), numpy_out[key])


def test_apply_chat_template_tokenize_matches_transformers(processor, reference):
    pictures = photos()
    own = [
        {"role": "user", "content": [{"type": "image", "image": pictures[1]}, {"type": "text", "text": "And this?"}]}
    ]
    got = processor.apply_chat_template(own, add_generation_prompt=True, tokenize=True, return_dict=True)
    want = quiet(reference.apply_chat_template, own, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert got["input_ids"] == [list(row) for row in want["input_ids"]]
    assert np.array_equal(got["pixel_values"], np.asarray(want["pixel_values"]))
    # Items without an image of their own take `images=` in order.
    ids = processor.apply_chat_template(
        [ONE_IMAGE, TWO_IMAGES], add_generation_prompt=True, tokenize=True, images=pictures[:3]
    )
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in (ONE_IMAGE, TWO_IMAGES)]
    assert ids == processor(text=texts, images=pictures[:3], padding=False, return_tensors=None)["input_ids"]
    with pytest.raises(ProcessorError, match="3 image item.* but 1 image"):
        processor.apply_chat_template([ONE_IMAGE, TWO_IMAGES], tokenize=True, images=pictures[:1])


def test_decode_and_replies(processor, reference):
    pictures = photos()
    prompts = [
        processor.apply_chat_template(ONE_IMAGE, add_generation_prompt=True),
        processor.apply_chat_template(NO_IMAGE, add_generation_prompt=True),
    ]
    inputs = processor(text=prompts, images=pictures[6:7])
    answer = processor.tokenizer.encode("A small dog.")
    im_end, pad = processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.pad_token_id
    first, second = answer + [im_end, 7], processor.tokenizer.encode("Yes") + [im_end]
    new = [first, second + [pad] * (len(first) - len(second))]  # rows stop at <|im_end|>, then padding
    generated = np.concatenate([inputs["input_ids"], np.asarray(new, np.int32)], axis=1)
    assert processor.decode_replies(generated, inputs) == ["A small dog.", "Yes"]
    assert processor.decode_replies(np.asarray(new), None) == ["A small dog.", "Yes"]
    row = generated[0].tolist()
    assert processor.decode(row) == reference.decode(row)
    assert processor.batch_decode(generated, skip_special_tokens=True) == reference.batch_decode(
        generated.tolist(), skip_special_tokens=True
    )


def test_processor_errors(processor, reference, checkpoint, tmp_path):
    pictures = photos()
    prompt = processor.apply_chat_template(ONE_IMAGE)
    with pytest.raises(ProcessorError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image\(s\)"):
        processor(text=prompt, images=pictures[:2])
    with pytest.raises(ValueError, match="tokens in the prompts should be the same as the number of images"):
        quiet(reference, text=prompt, images=pictures[:2])
    with pytest.raises(ProcessorError, match=r"1 <\|image_pad\|> placeholder\(s\) but 0 image\(s\)"):
        processor(text=prompt)
    with pytest.raises(ProcessorError, match=r"prompt 0 has 1 .* but 0 image\(s\) were passed for it"):
        processor(text=[prompt, "no image"], images=[[], [pictures[0]]])
    with pytest.raises(ImageError, match="aspect ratio"):
        processor(text=prompt, images=np.zeros((5, 1200, 3), np.uint8))
    with pytest.raises(ImageError, match="must be uint8"):
        processor(text=prompt, images=np.zeros((50, 50, 3), np.float64))
    with pytest.raises(ProcessorError, match=r"1 <\|video_pad\|> placeholder\(s\) but 0 video\(s\)"):
        processor(text="<|vision_start|><|video_pad|><|vision_end|>")
    with pytest.raises(ImageError, match="frames must all have one size; got 30x40, 40x30"):
        processor(text="<|video_pad|>", videos=[np.zeros((30, 40, 3), np.uint8), np.zeros((40, 30, 3), np.uint8)])
    with pytest.raises(ProcessorError, match="text must be a string or a list of strings, got int in the list"):
        processor(text=["a", 3])
    with pytest.raises(ProcessorError, match="padding_side"):
        processor(text="a", padding_side="middle")
    with pytest.raises(ProcessorError, match="pass text, images or videos"):
        processor()
    # config.json's image token must be the tokenizer's.
    for name in os.listdir(checkpoint):
        if name != "model.safetensors":
            (tmp_path / name).write_bytes((open(os.path.join(checkpoint, name), "rb")).read())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_token_id": 3}))
    with pytest.raises(ProcessorError, match="config.json has image_token_id=3"):
        Qwen2VLProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# Videos (transformers 5's video processor needs torchvision: checked against our image path)
# --------------------------------------------------------------------------------------------


def test_video_patches_are_frame_pairs_of_the_image_path():
    ours = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    frames = [np.asarray(photo(name, (150, 100))) for name in ("astronaut.png", "chelsea.png", "coffee.png")]
    still = ours.process_videos([frames[0], frames[0]])
    assert np.array_equal(still["pixel_values_videos"], ours(frames[0])["pixel_values"])
    video = ours.process_videos([np.stack(frames)])  # one (T, H, W, C) array; 3 frames -> 2 groups
    grid_t, grid_h, grid_w = video["video_grid_thw"][0].tolist()
    assert (grid_t, grid_h, grid_w) == (2, *ours(frames[0])["image_grid_thw"][0, 1:].tolist())
    rows = video["pixel_values_videos"].reshape(grid_t, grid_h * grid_w, 3, 2, 14, 14)
    singles = [ours(frame)["pixel_values"].reshape(grid_h * grid_w, 3, 2, 14, 14)[:, :, 0] for frame in frames]
    assert np.array_equal(rows[0, :, :, 0], singles[0]) and np.array_equal(rows[0, :, :, 1], singles[1])
    # The odd frame count is completed with the last frame, as transformers does.
    assert np.array_equal(rows[1, :, :, 0], singles[2]) and np.array_equal(rows[1, :, :, 1], singles[2])


def test_processor_expands_video_placeholders(processor):
    frames = [np.asarray(photo("rocket.jpg", (120, 80)))] * 4
    conversation = [
        {
            "role": "user",
            "content": [{"type": "video", "video": frames}, {"type": "image"}, {"type": "text", "text": "Same?"}],
        }
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.count("<|video_pad|>") == 1 and prompt.count("<|image_pad|>") == 1
    image = photo("coffee.png", (60, 40))
    inputs = processor(text=prompt, images=[image], videos=[frames], return_mm_token_type_ids=True)
    video_tokens = int(inputs["video_grid_thw"].prod()) // 4
    assert (inputs["input_ids"] == processor.video_token_id).sum() == video_tokens
    assert (inputs["mm_token_type_ids"] == 2).sum() == video_tokens
    assert (inputs["mm_token_type_ids"] == 1).sum() == int(inputs["image_grid_thw"].prod()) // 4
    assert inputs["pixel_values_videos"].shape[0] == int(inputs["video_grid_thw"].prod())
    # apply_chat_template(tokenize=True) takes the video item's own frames.
    ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, images=[image])
    assert ids == [inputs["input_ids"][0].tolist()]
    file_item = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]
    with pytest.raises(ProcessorError, match='needs "video": its frames .* got str'):
        processor.apply_chat_template(file_item, tokenize=True)
