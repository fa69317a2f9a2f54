"""Image preprocessing: bit-identical to transformers' AriaImageProcessorPil, rhymes-ai's original
split mode against an independent implementation, image modes, checkpoint configs, errors.

The photographs are the real ones that ship inside the scikit-image wheel (`skimage/data`, a
`test` extra); they are read as files, so scikit-image itself is never imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import warnings
import zlib

import jax
import numpy as np
import transformers
import pytest
import torch
from PIL import Image, ImageOps

from aria_jax.image_processing import AriaImageProcessor, ImageError, select_split_ratio_original

from transformers import AriaImageProcessorPil

PHOTO_DIR = os.path.join(os.path.dirname(importlib.util.find_spec("skimage").origin), "data")
PHOTOS = [  # name: mode, (width, height)
    "astronaut.png",  # RGB 512x512
    "camera.png",  # L   512x512
    "chelsea.png",  # RGB 451x300
    "coffee.png",  # RGB 600x400
    "hubble_deep_field.jpg",  # RGB 1000x872
    "retina.jpg",  # RGB 1411x1411
    "rocket.jpg",  # RGB 427x640
    "motorcycle_left.png",  # RGB 741x500
    "text.png",  # L   448x172
    "logo.png",  # RGBA 500x500
    "horse.png",  # RGBA 400x328
]
CONFIGS = [(490, False), (490, True), (980, False), (980, True)]


def photo(name: str) -> str:
    return os.path.join(PHOTO_DIR, name)


@pytest.fixture(scope="module")
def oracle():
    return AriaImageProcessorPil()


@pytest.fixture(scope="module")
def ours():
    return AriaImageProcessor()


def run_oracle(oracle, image, size, split, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = oracle(image, max_image_size=size, split_image=split, return_tensors="np", **kwargs)
    return out["pixel_values"], out["pixel_mask"], int(out["num_crops"])


def assert_matches_oracle(ours, oracle, images, size, split, oracle_images=None, **oracle_kwargs):
    """Our batch output equals the oracle run image by image (which gives per-image counts)."""
    got = ours(images, max_image_size=size, split_image=split)
    refs = [
        run_oracle(oracle, image, size, split, **oracle_kwargs)
        for image in (images if oracle_images is None else oracle_images)
    ]
    want_values = np.concatenate([ref[0] for ref in refs])
    want_mask = np.concatenate([ref[1] for ref in refs])
    assert got["pixel_values"].dtype == np.float32 and got["pixel_mask"].dtype == bool
    assert got["pixel_values"].shape == want_values.shape
    assert np.array_equal(got["pixel_values"], want_values)
    assert np.array_equal(got["pixel_mask"], want_mask)
    assert got["num_crops"].tolist() == [ref[2] for ref in refs]
    assert int(got["num_crops"].sum()) == got["pixel_values"].shape[0]
    return got


# --------------------------------------------------------------------------------------------
# Parity with transformers on real photographs and synthetic extremes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,split", CONFIGS)
def test_photos_as_pil_images_match_transformers(ours, oracle, size, split):
    images = [Image.open(photo(name)) for name in PHOTOS]
    assert {image.mode for image in images} == {"RGB", "L", "RGBA"}
    got = assert_matches_oracle(ours, oracle, images, size, split)
    assert got["pixel_values"].shape[2:] == (size, size)
    if split:  # the big photos really are split
        assert got["num_crops"].max() > 1


@pytest.mark.parametrize("size,split", CONFIGS)
def test_photos_as_file_paths_match_transformers(ours, oracle, size, split):
    # paths take transformers' load_image route (EXIF transpose, plain convert("RGB"))
    names = ["hubble_deep_field.jpg", "camera.png", "logo.png", "horse.png", "rocket.jpg"]
    assert_matches_oracle(ours, oracle, [photo(name) for name in names], size, split)


def test_os_pathlike_is_accepted(ours, oracle):
    import pathlib

    got = ours(pathlib.Path(photo("chelsea.png")), max_image_size=490)
    want = run_oracle(oracle, photo("chelsea.png"), 490, False)
    assert np.array_equal(got["pixel_values"], want[0])


def test_batched_call_matches_transformers_and_counts_are_per_image(ours, oracle):
    # transformers returns one batch-wide num_crops (the maximum); we return one per image.
    images = [Image.open(photo(name)) for name in ("retina.jpg", "text.png", "coffee.png")]
    pixel_values, pixel_mask, batch_crops = run_oracle(oracle, images, 490, True)
    got = ours(images, max_image_size=490, split_image=True)
    assert np.array_equal(got["pixel_values"], pixel_values)
    assert np.array_equal(got["pixel_mask"], pixel_mask)
    assert got["num_crops"].sum() == pixel_values.shape[0]
    assert got["num_crops"].max() == batch_crops
    assert len(set(got["num_crops"].tolist())) > 1  # the case where the oracle's count is wrong
    assert got["num_crops"].tolist() == [run_oracle(oracle, image, 490, True)[2] for image in images]

    same = [Image.open(photo("astronaut.png")), Image.open(photo("camera.png"))]
    got = ours(same, max_image_size=980, split_image=True)
    _, _, batch_crops = run_oracle(oracle, same, 980, True)
    assert got["num_crops"].tolist() == [batch_crops, batch_crops]


def test_exif_orientation_of_files_is_applied(ours, oracle, tmp_path):
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.open(photo("coffee.png")).save(path, exif=exif, quality=95)  # 600x400 landscape
    got = assert_matches_oracle(ours, oracle, [path], 490, False)
    assert got["pixel_mask"][0, -1, :].any() and not got["pixel_mask"][0, :, -1].any()  # portrait


@pytest.mark.parametrize("size,split", CONFIGS)
def test_extreme_and_random_sizes_match_transformers(ours, oracle, size, split):
    rng = np.random.default_rng(size + split)
    shapes = [(1, 1), (40, 3000), (3000, 40)]  # (height, width)
    shapes += [tuple(int(v) for v in rng.integers(1, 1500, 2)) for _ in range(4)]
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    # as PIL images (unambiguous for the oracle) and as numpy arrays (oracle told HWC)
    assert_matches_oracle(ours, oracle, [Image.fromarray(a) for a in arrays], size, split)
    assert_matches_oracle(ours, oracle, arrays, size, split, input_data_format="channels_last")


def test_tiny_rgb_array_is_read_as_hwc(ours):
    # transformers guesses the channel axis: a (1, 1, 3) array would be a 1-channel 1x3 image.
    array = np.array([[[255, 0, 0]]], dtype=np.uint8)
    got = ours(array, max_image_size=490)
    assert got["pixel_values"][0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert got["pixel_mask"][0].all()


def test_batch_forms_are_equivalent(ours):
    rng = np.random.default_rng(9)
    arrays = [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8) for _ in range(3)]
    flat = ours(arrays, max_image_size=490, split_image=True)
    assert flat["num_crops"].tolist() == [2, 2, 2]
    for other in (
        ours(np.stack(arrays), max_image_size=490, split_image=True),
        ours([arrays[:1], arrays[1:]], max_image_size=490, split_image=True),
        ours(tuple(arrays), max_image_size=490, split_image=True),
    ):
        assert np.array_equal(other["pixel_values"], flat["pixel_values"])
        assert other["num_crops"].tolist() == flat["num_crops"].tolist()
    single = ours(arrays[1], max_image_size=490, split_image=True)
    assert np.array_equal(single["pixel_values"], flat["pixel_values"][2:4])


# --------------------------------------------------------------------------------------------
# Image modes
# --------------------------------------------------------------------------------------------


def mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    height, width = 45, 70
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    p_transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    p_transparent.info["transparency"] = 3
    p_alpha_table = rgba.convert("P")  # palette with per-entry alpha
    images = {
        "L": rgb.convert("L"),
        "LA": la,
        "RGBA": rgba,
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "P+transparency": p_transparent,
        "PA": rgba.convert("PA"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)),
        "I;16 small values": Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(-500, 70000, (height, width)).astype(np.int32)),
        "1": rgb.convert("1"),
        "F": Image.fromarray((rng.random((height, width)) * 300 - 20).astype(np.float32)),
        "YCbCr": rgb.convert("YCbCr"),
        "RGBa": rgba.convert("RGBa"),
    }
    assert p_alpha_table.mode == "P" and images["I;16"].mode == "I;16"
    assert images["I"].mode == "I" and images["F"].mode == "F"
    return images


@pytest.mark.parametrize("size,split", [(490, False), (980, True)])
def test_every_pil_mode_matches_transformers(ours, oracle, size, split):
    images = mode_images()
    got = assert_matches_oracle(ours, oracle, list(images.values()), size, split)
    assert np.isfinite(got["pixel_values"]).all()
    # alpha really is blended onto white: a fully transparent pixel becomes white (1.0)
    rgba = images["RGBA"].copy()
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    assert ours(rgba, max_image_size=490)["pixel_values"][0, :, 0, 0].tolist() == [1.0] * 3


FILE_FORMATS = {
    "L": "png",
    "LA": "png",
    "RGBA": "png",
    "P": "png",
    "P+transparency": "png",
    "CMYK": "jpeg",
    "I;16": "png",
    "I": "tiff",
    "1": "png",
    "F": "tiff",
}


def test_every_mode_from_files_matches_transformers(ours, oracle, tmp_path):
    paths = []
    for name, image in mode_images().items():
        if name in FILE_FORMATS:
            path = str(tmp_path / f"{len(paths)}.{FILE_FORMATS[name]}")
            image.save(path)
            paths.append(path)
    reopened = {Image.open(path).mode for path in paths}
    assert {"LA", "RGBA", "P", "CMYK", "I;16", "1", "F"} <= reopened
    assert_matches_oracle(ours, oracle, paths, 490, False)


def test_premultiplied_la_which_transformers_cannot_convert(ours, oracle):
    la = mode_images()["LA"]
    premultiplied = la.convert("La")
    with pytest.raises(ValueError):  # the oracle itself fails on "La"
        run_oracle(oracle, premultiplied, 490, False)
    got = ours(premultiplied, max_image_size=490)
    want = run_oracle(oracle, premultiplied.convert("LA"), 490, False)
    assert np.array_equal(got["pixel_values"], want[0])


def test_numpy_channel_counts(ours, oracle):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (30, 50), dtype=np.uint8)
    alpha = rng.integers(0, 256, (30, 50), dtype=np.uint8)
    rgba = np.dstack([gray, gray, gray, alpha])
    for array in (gray[:, :, None], np.dstack([gray] * 3), rgba):
        assert_matches_oracle(ours, oracle, [array], 490, False, input_data_format="channels_last")
    # (H, W) and (H, W, 2), which the oracle rejects: read as gray and gray + alpha
    assert np.array_equal(ours(gray)["pixel_values"], ours(gray[:, :, None])["pixel_values"])
    assert np.array_equal(ours(np.dstack([gray, alpha]))["pixel_values"], ours(rgba)["pixel_values"])
    with pytest.raises(ImageError, match="uint8"):
        ours(gray.astype(np.float32))
    with pytest.raises(ImageError, match="shape"):
        ours(np.zeros((5, 4, 6), dtype=np.uint8))  # no axis at either end is a channel count
    with pytest.raises(ImageError, match="got int"):
        ours(12345)


# --------------------------------------------------------------------------------------------
# split_mode="original" (rhymes-ai), against a straightforward implementation of it
# --------------------------------------------------------------------------------------------

# the 19 pairs, read by the original code as [ratio_w, ratio_h]
REFERENCE_RATIOS = [
    [1, 2],
    [1, 3],
    [1, 4],
    [1, 5],
    [1, 6],
    [1, 7],
    [1, 8],
    [2, 4],
    [2, 3],
    [2, 2],
    [2, 1],
    [3, 1],
    [3, 2],
    [4, 1],
    [4, 2],
    [5, 1],
    [6, 1],
    [7, 1],
    [8, 1],
]


def reference_ratio(width, height, max_size):
    aspect = width / height
    with np.errstate(over="ignore"):
        area = np.int32(width) * np.int32(height)
    chosen, best = None, float("inf")
    for ratio_w, ratio_h in REFERENCE_RATIOS:
        diff = abs(aspect - ratio_w / ratio_h)
        if diff < best:
            chosen, best = (ratio_w, ratio_h), diff
        elif diff == best and area > 0.5 * max_size * max_size * ratio_w * ratio_h:
            chosen = (ratio_w, ratio_h)
    return chosen


def reference_original(image: Image.Image, max_size: int):
    """rhymes-ai's original split, with PIL only: the closest [ratio_w, ratio_h] (ties: the later
    pair iff the image area > half the pair's), a stretch to (max_size * ratio_w, max_size * ratio_h)
    cut row-major into max_size tiles, the whole image first when there are >1 tiles; then each crop
    resized keeping the ratio (long side max_size, short side >= 336, truncated), padded right and
    bottom with 0, normalized to [-1, 1]."""
    image = image.convert("RGB")
    ratio_w, ratio_h = reference_ratio(image.width, image.height, max_size)
    stretched = image.resize((max_size * ratio_w, max_size * ratio_h), Image.Resampling.BICUBIC)
    crops = []
    for i in range(ratio_w * ratio_h):
        left, top = (i % ratio_w) * max_size, (i // ratio_w) * max_size
        crops.append(stretched.crop((left, top, left + max_size, top + max_size)))
    if len(crops) > 1:
        crops.insert(0, image)
    values, masks = [], []
    for crop in crops:
        width, height = crop.size
        scale = max_size / max(width, height)
        if width >= height:
            new_size = (max_size, max(int(height * scale), 336))
        else:
            new_size = (max(int(width * scale), 336), max_size)
        resized = crop.resize(new_size, resample=Image.Resampling.BICUBIC)
        padded = ImageOps.expand(resized, (0, 0, max_size - new_size[0], max_size - new_size[1]), fill=0)
        x = (np.asarray(padded).astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.float32(0.5)) / np.float32(0.5)
        values.append(x.transpose(2, 0, 1))
        mask = np.zeros((max_size, max_size), dtype=bool)
        mask[: new_size[1], : new_size[0]] = True
        masks.append(mask)
    return np.stack(values), np.stack(masks), len(crops)


# (width, height), max size -> crop counts of rhymes-ai's original split (global view included)
# and of transformers' split (no global view)
SPLIT_CROP_COUNTS = [
    ((768, 768), 490, 5, 4),
    ((768, 768), 980, 5, 1),
    ((300, 1200), 490, 5, 3),
    ((980, 1960), 980, 3, 2),
]


@pytest.mark.parametrize("wh,size,original_crops,transformers_crops", SPLIT_CROP_COUNTS)
def test_crop_counts_of_the_reference_examples(ours, oracle, wh, size, original_crops, transformers_crops):
    width, height = wh
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    got = ours(image, max_image_size=size, split_image=True, split_mode="original")
    assert got["num_crops"].tolist() == [original_crops]
    values, masks, count = reference_original(image, size)
    assert count == original_crops
    assert np.array_equal(got["pixel_values"], values) and np.array_equal(got["pixel_mask"], masks)
    # the global view (the whole image, unsplit) comes first
    whole = ours(image, max_image_size=size, split_image=False)
    assert np.array_equal(got["pixel_values"][:1], whole["pixel_values"])

    got = ours(image, max_image_size=size, split_image=True)  # split_mode="transformers"
    assert got["num_crops"].tolist() == [transformers_crops]
    assert run_oracle(oracle, image, size, True)[2] == transformers_crops
    assert ours.count_crops(height, width, size, True) == transformers_crops
    assert ours.count_crops(height, width, size, True, "original") == original_crops


@pytest.mark.parametrize(
    "name,size", [("chelsea.png", 490), ("camera.png", 980), ("rocket.jpg", 490), ("hubble_deep_field.jpg", 980)]
)
def test_original_mode_on_photos(ours, name, size):
    image = Image.open(photo(name))
    values, masks, count = reference_original(image, size)
    got = ours(image, max_image_size=size, split_image=True, split_mode="original")
    assert got["num_crops"].tolist() == [count] and count >= 3
    assert np.array_equal(got["pixel_values"], values)
    assert np.array_equal(got["pixel_mask"], masks)


def test_original_tie_rule_uses_int32_area(ours):
    # aspect 2 ties [2, 1] with [4, 2]; the later one wins iff w*h > 0.5 * S^2 * 8
    assert reference_ratio(1000, 500, 490) == (2, 1)
    assert reference_ratio(2000, 1000, 490) == (4, 2)
    assert reference_ratio(70000, 35000, 490) == (2, 1)  # the int32 product wraps negative
    sizes = [
        (1000, 500),
        (2000, 1000),
        (70000, 35000),
        (500, 1000),
        (1000, 2000),
        (980, 1960),
        (1, 1),
        (1, 5000),
        (5000, 1),
        (1234, 987),
    ]
    rng = np.random.default_rng(11)
    sizes += [tuple(int(v) for v in rng.integers(1, 60000, 2)) for _ in range(300)]
    ratios = [tuple(pair) for pair in REFERENCE_RATIOS]
    for width, height in sizes:
        for size in (490, 980):
            assert select_split_ratio_original(width, height, ratios, size) == reference_ratio(width, height, size), (
                width,
                height,
                size,
            )
    image = Image.fromarray(np.zeros((1000, 2000, 3), dtype=np.uint8))
    assert ours(image, max_image_size=490, split_image=True, split_mode="original")["num_crops"].tolist() == [9]


def test_count_crops_agrees_with_the_call(ours):
    rng = np.random.default_rng(5)
    for _ in range(6):
        height, width = (int(v) for v in rng.integers(1, 1200, 2))
        image = np.zeros((height, width, 3), dtype=np.uint8)
        for size in (490, 980):
            for mode in ("transformers", "original"):
                got = ours(image, max_image_size=size, split_image=True, split_mode=mode)
                assert got["num_crops"][0] == ours.count_crops(height, width, size, True, mode)
            assert ours.count_crops(height, width, size, False) == 1


# --------------------------------------------------------------------------------------------
# Checkpoint configs
# --------------------------------------------------------------------------------------------


def test_from_pretrained_reads_transformers_preprocessor_config(oracle, tmp_path):
    saved = AriaImageProcessorPil(
        max_image_size=490, min_image_size=300, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.45]
    )
    saved.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "preprocessor_config.json")
    ours = AriaImageProcessor.from_pretrained(tmp_path)
    assert (ours.max_image_size, ours.min_image_size) == (490, 300)
    assert ours.image_mean == (0.4, 0.5, 0.6) and ours.image_std == (0.2, 0.3, 0.45)
    assert ours.size_to_queries == {490: 128, 980: 256}
    reloaded = AriaImageProcessorPil.from_pretrained(str(tmp_path))
    for size, split in [(None, False), (None, True), (980, False)]:
        image = Image.open(photo("text.png"))  # 448x172: min_image_size kicks in
        got = ours(image, max_image_size=size, split_image=split)
        want = run_oracle(reloaded, image, size or 490, split)
        assert np.array_equal(got["pixel_values"], want[0])
        assert np.array_equal(got["pixel_mask"], want[1])


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<|img|>": 1, "a": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", extra_special_tokens={"image_token": "<|img|>"}
    )


def test_from_pretrained_reads_aria_processor_config(tmp_path):
    from transformers import AriaProcessor

    image_processor = AriaImageProcessorPil(max_image_size=490)
    AriaProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), size_conversion={490: 100, 980: 200}
    ).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert "image_processor" in config and config["size_conversion"] == {"490": 100, "980": 200}
    ours = AriaImageProcessor.from_pretrained(tmp_path)
    assert ours.max_image_size == 490
    assert ours.size_to_queries == {490: 100, 980: 200}
    assert ours.num_image_tokens() == 100 and ours.num_image_tokens(980) == 200
    assert len(ours.split_resolutions) == 19 and ours.resample == Image.Resampling.BICUBIC


def test_from_pretrained_defaults_and_bad_configs(tmp_path):
    defaults = AriaImageProcessor.from_pretrained(tmp_path)  # no files at all
    assert repr(defaults) == repr(AriaImageProcessor())
    # transformers' AriaImageProcessor default: Aria's 19 split grids in (height, width) pixels
    assert defaults.split_resolutions == tuple(map(tuple, transformers.AriaImageProcessor().split_resolutions))

    (tmp_path / "processor_config.json").write_text(json.dumps({"size_conversion": {"490": 128}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_image_size": 490}))
    only_490 = AriaImageProcessor.from_pretrained(tmp_path)
    # transformers' image processor takes 490 and 980 whatever size_conversion says; so do we,
    # but 980 has no token count here
    assert only_490.allowed_sizes == (490, 980)
    assert only_490(np.zeros((8, 8, 3), dtype=np.uint8), max_image_size=980)["pixel_values"].shape == (1, 3, 980, 980)
    with pytest.raises(ValueError, match="max_image_size=980 has no query count"):
        only_490.num_image_tokens(980)
    with pytest.raises(ValueError, match="max_image_size=700 .*490, 980"):
        only_490(np.zeros((8, 8, 3), dtype=np.uint8), max_image_size=700)

    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        AriaImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "rescale_factor": 0.5}))
    unnormalized = AriaImageProcessor.from_pretrained(tmp_path)
    assert not unnormalized.do_normalize and unnormalized.rescale_factor == 0.5
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"rescale_factor": "1/255"}))
    with pytest.raises(ValueError, match="rescale_factor"):
        AriaImageProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def assert_one_line_error(call, *needles):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return info.value


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR declaring width x height RGB pixels, and no real image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_unreadable_files_raise_one_line_value_errors(ours, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    error = assert_one_line_error(lambda: ours(str(corrupt)), str(corrupt))
    assert isinstance(error, ImageError)

    truncated = tmp_path / "truncated.jpg"
    data = open(photo("hubble_deep_field.jpg"), "rb").read()
    truncated.write_bytes(data[: len(data) // 5])
    assert_one_line_error(lambda: ours([photo("chelsea.png"), str(truncated)]), str(truncated))

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_one_line_error(lambda: ours(str(empty)), str(empty), "empty")

    missing = tmp_path / "missing.png"
    assert_one_line_error(lambda: ours(missing), str(missing), "no such file")


def test_decompression_bombs_are_errors_not_warnings(ours, tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    assert limit_before is not None
    huge = tmp_path / "bomb.png"  # 10^10 pixels: PIL itself raises DecompressionBombError
    huge.write_bytes(png_header(100_000, 100_000))
    assert_one_line_error(lambda: ours(str(huge)), str(huge), "too large", "10000000000 pixels")

    # above the limit but below twice it, where PIL only warns: still an error, and no warning
    side = math.isqrt(limit_before) + 1000
    over = tmp_path / "over_limit.png"
    over.write_bytes(png_header(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_one_line_error(lambda: ours(str(over)), str(over), f"{side}x{side}", "MAX_IMAGE_PIXELS")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's global setting left alone


def test_a_lowered_pil_limit_is_respected(ours, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # 512x512 is between 1x and 2x
    assert_one_line_error(lambda: ours(photo("camera.png")), "camera.png", "512x512", "decompression bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # over 2x: PIL raises by itself
    assert_one_line_error(lambda: ours(photo("camera.png")), "camera.png", "262144 pixels", "decompression bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # None disables the check, as in PIL
    assert ours(photo("camera.png"))["num_crops"].tolist() == [1]


def test_disallowed_max_image_size_and_split_mode(ours):
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    for bad in (224, 0, 1960, "980", 490.0):
        error = assert_one_line_error(lambda: ours(image, max_image_size=bad), repr(bad), "490, 980")
        assert not isinstance(error, ImageError)
    assert_one_line_error(lambda: AriaImageProcessor(max_image_size=336), "336", "490, 980")
    assert_one_line_error(lambda: ours(image, split_image=True, split_mode="llava"), "llava")
    assert_one_line_error(lambda: ours([]), "no images")
    assert_one_line_error(
        lambda: AriaImageProcessor(min_image_size=600)(image, max_image_size=490), "min_image_size=600"
    )


# --------------------------------------------------------------------------------------------
# transformers' constructor options and input types
# --------------------------------------------------------------------------------------------

OPTIONS = dict(
    image_mean=[0.48, 0.45, 0.4],
    image_std=[0.26, 0.26, 0.27],
    max_image_size=490,
    min_image_size=200,
    split_resolutions=[[980, 980]],
    split_image=True,
    do_convert_rgb=True,
    resample=Image.Resampling.BILINEAR,
)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"do_normalize": False},
        {"do_rescale": False},
        {"rescale_factor": 1 / 127.5},
        {"do_rescale": False, "do_normalize": False},
    ],
)
def test_constructor_options_match_transformers(changes):
    """Each option of transformers' AriaImageProcessor, and one image given as a torch tensor
    and a numpy array channels first, a numpy array channels last and a PIL image: the same
    pixel_values and pixel_mask as AriaImageProcessorPil with the same options."""
    options = {**OPTIONS, **changes}
    oracle, ours = AriaImageProcessorPil(**options), AriaImageProcessor(**options)
    rng = np.random.default_rng(7)
    chw = [rng.integers(0, 256, (3, 35, 31), dtype=np.uint8), rng.integers(0, 256, (3, 50, 120), dtype=np.uint8)]
    expected = oracle(chw, return_tensors="np")
    expected_values = np.asarray(expected["pixel_values"], np.float32)
    assert expected_values.shape == (8, 3, 490, 490)  # 2 x 2 crops of 490 per image
    for images in (
        [torch.from_numpy(image) for image in chw],
        chw,
        [image.transpose(1, 2, 0) for image in chw],
        [Image.fromarray(image.transpose(1, 2, 0)) for image in chw],
    ):
        got = ours(images)
        np.testing.assert_array_equal(got["pixel_values"], expected_values)
        np.testing.assert_array_equal(got["pixel_mask"], expected["pixel_mask"])
        assert got["num_crops"].tolist() == [4, 4]
    batch = torch.from_numpy(np.stack([chw[0][:, :30, :30], chw[0][:, 5:, 1:]]))  # one (N, C, H, W) tensor
    expected = oracle(list(batch), return_tensors="np")
    got = ours(batch)
    np.testing.assert_array_equal(got["pixel_values"], np.asarray(expected["pixel_values"], np.float32))
    np.testing.assert_array_equal(got["pixel_mask"], expected["pixel_mask"])


def test_do_convert_rgb_false_takes_rgb_images_only():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    plain, unconverted = (
        AriaImageProcessor(max_image_size=490),
        AriaImageProcessor(max_image_size=490, do_convert_rgb=False),
    )
    np.testing.assert_array_equal(unconverted(rgb)["pixel_values"], plain(rgb)["pixel_values"])
    np.testing.assert_array_equal(unconverted(Image.fromarray(rgb))["pixel_values"], plain(rgb)["pixel_values"])
    np.testing.assert_array_equal(
        unconverted(photo(PHOTOS[0]))["pixel_values"], plain(photo(PHOTOS[0]))["pixel_values"]
    )
    with pytest.raises(ImageError, match="do_convert_rgb=False takes RGB images only.*LA image"):
        unconverted(Image.fromarray(rgb).convert("LA"))
    with pytest.raises(ImageError, match=r"do_convert_rgb=False .*shape \(20, 30\)"):
        unconverted(rgb[:, :, 0])


def test_return_tensors():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    processor = AriaImageProcessor(max_image_size=490)
    arrays = processor(image)
    as_torch = processor(image, return_tensors="pt")
    as_jax = processor(image, return_tensors="jax")
    for key, value in arrays.items():
        assert isinstance(as_torch[key], torch.Tensor) and isinstance(as_jax[key], jax.Array)
        np.testing.assert_array_equal(as_torch[key].numpy(), value)
        np.testing.assert_array_equal(np.asarray(as_jax[key]), value)
    with pytest.raises(ValueError, match="return_tensors='tf'"):
        processor(image, return_tensors="tf")
