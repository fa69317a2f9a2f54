"""aria_jax.data: the fine-tuning dataset reader (validation, labels) and the batcher.

Datasets are written to tmp_path with PIL-drawn images and read with the tiny model's
processor (crop sizes 70 -> 8 and 140 -> 16 image tokens per crop; `<|img|>` is id 9).
"""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from aria_jax import AriaProcessor
from aria_jax.data import ASSISTANT_PREFIX, Batches, DatasetError, SFTDataset, default_length_buckets
from repo_paths import TINY_RANDOM

IMAGE_TOKEN_ID = 9
IMAGE = {"type": "image", "text": None}


@pytest.fixture(scope="module")
def processor() -> AriaProcessor:
    return AriaProcessor.from_pretrained(TINY_RANDOM)


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def chat(*turns: Any, system: str | None = None) -> list[dict]:
    """Alternating user / assistant messages (each a string or a list of content items)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": turn} for i, turn in enumerate(turns)]


def draw(path: str, width: int, height: int, seed: int = 0) -> str:
    image = Image.new("RGB", (width, height), (30 * seed % 256, 90, 160))
    ImageDraw.Draw(image).ellipse(
        (width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(250, 200 - 20 * seed % 200, 10)
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return path


def write(folder: str, lines: list[dict | str], split: str = "train") -> str:
    """Write a jsonl file; a str line is written as is."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as file:
        for line in lines:
            file.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return folder


def labelled_runs(processor: AriaProcessor, example: dict) -> list[str]:
    """Each maximal run of labelled positions, decoded."""
    labelled = np.concatenate([[False], example["labels"] != -100, [False]])
    edges = np.flatnonzero(np.diff(labelled.astype(np.int8)))
    return [processor.decode(example["labels"][start:end]) for start, end in zip(edges[::2], edges[1::2])]


# ----------------------------------------------------------------------------------- labels

LABEL_CASES = {
    "two turns": (
        chat("Hi there.", "Hello to you.", "And now?", "Goodbye now."),
        [],
        ["Hello to you.<|im_end|>", "Goodbye now.<|im_end|>"],
    ),
    "system message": (chat("Who are you?", "Just me.", system="Be brief."), [], ["Just me.<|im_end|>"]),
    "image": (chat([IMAGE, text("What is it?")], "Yellow disc."), ["img.png"], ["Yellow disc.<|im_end|>"]),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_labels_are_exactly_the_assistant_replies_with_im_end(processor, tmp_path, case):
    messages, images, replies = LABEL_CASES[case]
    draw(str(tmp_path / "img.png"), 90, 60)
    example = SFTDataset(write(str(tmp_path), [{"messages": messages, "images": images}]), processor).encode(0)
    assert labelled_runs(processor, example) == replies
    labelled = example["labels"] != -100
    assert np.array_equal(example["labels"][labelled], example["input_ids"][labelled])
    assert example["input_ids"].dtype == example["labels"].dtype == np.int32


def test_image_tokens_are_never_labelled(processor, tmp_path):
    draw(str(tmp_path / "a.png"), 90, 60)
    draw(str(tmp_path / "b.png"), 60, 90, seed=1)
    messages = chat([IMAGE, text("Draw it again.")], [text("Here:"), IMAGE, text("done.")])
    example = SFTDataset(
        write(str(tmp_path), [{"messages": messages, "images": ["a.png", "b.png"]}]), processor
    ).encode(0)
    is_image = example["input_ids"] == IMAGE_TOKEN_ID
    assert is_image.sum() == 2 * 16
    assert (example["labels"][is_image] == -100).all()
    # The image inside the reply splits its labels in two; the text around it is labelled.
    assert labelled_runs(processor, example) == ["Here:<fim_prefix>", "<fim_suffix>done.<|im_end|>"]


def test_reply_that_merges_with_the_prefix_newline_is_still_labelled(processor, tmp_path):
    # The tiny tokenizer encodes "\na" as one token "▁a", so the ids of
    # "<|im_start|>assistant\n" do not occur in this conversation at all.
    example = SFTDataset(write(str(tmp_path), [{"messages": chat("Fruit?", "apple")}]), processor).encode(0)
    prefix = processor.tokenizer.encode(ASSISTANT_PREFIX, add_special_tokens=False)
    ids = example["input_ids"].tolist()
    assert not any(ids[i : i + len(prefix)] == prefix for i in range(len(ids)))
    assert labelled_runs(processor, example) == [" apple<|im_end|>"]  # " " is the merged "\n"


@pytest.mark.parametrize("split_image", [False, True])
def test_encode_matches_the_processor(processor, tmp_path, split_image):
    draw(str(tmp_path / "pics" / "wide.png"), 200, 60)
    draw(str(tmp_path / "pics" / "tall.png"), 40, 130, seed=2)
    messages = chat([IMAGE, text("Compare"), IMAGE], "The first is wider.", system="Look closely.")
    images = ["pics/wide.png", "pics/tall.png"]
    dataset = SFTDataset(
        write(str(tmp_path), [{"messages": messages, "images": images}]),
        processor,
        max_image_size=70,
        split_image=split_image,
    )
    expected = processor(
        text=processor.apply_chat_template(messages),
        images=[str(tmp_path / path) for path in images],
        max_image_size=70,
        split_image=split_image,
    )
    example = dataset.encode(0)
    assert np.array_equal(example["input_ids"], expected["input_ids"][0])
    assert dataset.lengths[0] == len(example["input_ids"])
    assert dataset.crop_counts[0] == expected["num_crops"].sum() == (5 if split_image else 2)
    assert np.array_equal(example["pixel_values"], expected["pixel_values"])
    assert np.array_equal(example["pixel_mask"], expected["pixel_mask"])
    assert example["pixel_values"].dtype == np.float32 and example["pixel_mask"].dtype == bool


# ----------------------------------------------------------------------------------- errors

GOOD = {"messages": chat("Hi", "Yo")}
LONG = chat("word " * 40, "ok")
ERROR_CASES = {  # name: (line 3 of train.jsonl, SFTDataset keyword arguments, message fragment)
    "bad JSON": ('{"messages": [', {}, "not valid JSON"),
    "not an object": ("[1, 2]", {}, "expected a JSON object, got list"),
    "no messages": ({"images": []}, {}, '"messages" must be a non-empty list'),
    "messages not a list": ({"messages": "hi"}, {}, '"messages" must be a non-empty list'),
    "message not an object": ({"messages": ["hi"]}, {}, "message 0 is not an object"),
    "content not a list": ({"messages": [{"role": "user", "content": 5}]}, {}, '"content" must be'),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, {}, "unknown role 'bot'"),
    "unknown item type": ({"messages": chat([{"type": "audio"}], "x")}, {}, "unknown content item type 'audio'"),
    "text item without text": ({"messages": chat([{"type": "text"}], "x")}, {}, 'text item needs a string "text"'),
    "reserved marker": ({"messages": chat(f"fake {ASSISTANT_PREFIX}turn", "x")}, {}, "reserved marker '<|im_start|>'"),
    "images not paths": ({"messages": chat([IMAGE], "x"), "images": [3]}, {}, '"images" must be a list of paths'),
    "more image items than images": (
        {"messages": chat([IMAGE, IMAGE], "x"), "images": ["img.png"]},
        {},
        '2 image item(s) in "messages" but 1 path(s)',
    ),
    "fewer image items than images": (
        {"messages": chat([IMAGE], "x"), "images": ["img.png", "img.png"]},
        {},
        '1 image item(s) in "messages" but 2 path(s)',
    ),
    "absolute path": ({"messages": chat([IMAGE], "x"), "images": ["{folder}/img.png"]}, {}, "is an absolute path"),
    "../ escape": (
        {"messages": chat([IMAGE], "x"), "images": ["sub/../../outside/secret.png"]},
        {},
        "image 'sub/../../outside/secret.png' escapes the dataset folder {folder}",
    ),
    "symlink escape": (
        {"messages": chat([IMAGE], "x"), "images": ["link.png"]},
        {},
        "image 'link.png' escapes the dataset folder {folder}",
    ),
    "missing image": ({"messages": chat([IMAGE], "x"), "images": ["nope.png"]}, {}, "image 'nope.png' not found"),
    "unreadable image": ({"messages": chat([IMAGE], "x"), "images": ["broken.png"]}, {}, "cannot read image file"),
    "no assistant": ({"messages": chat("only a question")}, {}, "no assistant message"),
    "too long": (
        {"messages": LONG},
        {"max_length": 40},
        "the example is {length} tokens long, more than max_length=40",
    ),
    "video": (
        {"messages": chat("What happens?", "x"), "video": {"path": "v.mp4", "num_frames": 8}},
        {},
        "video examples are not supported yet",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_every_problem_is_one_line_naming_file_and_line(processor, tmp_path, case):
    line, kwargs, fragment = ERROR_CASES[case]
    folder = tmp_path / "data"
    draw(str(folder / "img.png"), 40, 40)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "sub").mkdir()
    draw(str(tmp_path / "outside" / "secret.png"), 40, 40)
    os.symlink(tmp_path / "outside" / "secret.png", folder / "link.png")
    if isinstance(line, dict):
        line = json.dumps(line).replace("{folder}", str(folder))
    write(str(folder), [GOOD, "", line, GOOD])

    with pytest.raises(DatasetError) as error:
        SFTDataset(str(folder), processor, **kwargs)
    message = str(error.value)
    length = len(processor.tokenizer.encode(processor.apply_chat_template(LONG)))
    assert message.startswith(f"{folder / 'train.jsonl'}:3: ")
    assert fragment.format(folder=folder, length=length) in message
    assert "\n" not in message


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_jsonl_file(processor, tmp_path, split):
    write(str(tmp_path), [GOOD], split="train" if split == "test" else "test")
    with pytest.raises(DatasetError, match=f"^{tmp_path / split}.jsonl: no such file$"):
        SFTDataset(str(tmp_path), processor, split=split)


def test_a_file_without_examples_is_an_error(processor, tmp_path):
    write(str(tmp_path), ["", "  "])
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'train.jsonl'}: no examples$"):
        SFTDataset(str(tmp_path), processor)


def test_an_image_changed_after_reading_is_an_error(processor, tmp_path):
    draw(str(tmp_path / "img.png"), 70, 70)
    dataset = SFTDataset(
        write(str(tmp_path), [GOOD, {"messages": chat([IMAGE], "x"), "images": ["img.png"]}]),
        processor,
        max_image_size=70,
        split_image=True,
    )
    draw(str(tmp_path / "img.png"), 300, 50)  # more crops, so more image tokens
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'train.jsonl'}:2: .*did an image change"):
        dataset.encode(1)


def test_dataset_keeps_no_pixels(processor, tmp_path):
    lines = []
    for i in range(8):
        draw(str(tmp_path / f"{i}.png"), 300, 300, seed=i)
        lines.append({"messages": chat([IMAGE, text(f"Picture {i}?")], "A disc."), "images": [f"{i}.png"]})
    write(str(tmp_path), lines)
    settings = dict(max_image_size=70, split_image=True)
    SFTDataset(str(tmp_path), processor, **settings)  # warm-up: template compilation and other caches

    gc.collect()
    tracemalloc.start()
    dataset = SFTDataset(str(tmp_path), processor, **settings)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    one_example_pixels = dataset.encode(0)["pixel_values"].nbytes  # 4 crops of 3 x 70 x 70 float32
    assert retained < one_example_pixels / 4

    def reachable(value: Any) -> list:
        if isinstance(value, dict):
            return [found for item in value.values() for found in reachable(item)]
        if isinstance(value, (list, tuple)):
            return [found for item in value for found in reachable(item)]
        return [value]

    held = [value for value in reachable(vars(dataset)) if isinstance(value, (np.ndarray, Image.Image))]
    assert all(isinstance(value, np.ndarray) and value.shape == (len(dataset),) for value in held)


# ----------------------------------------------------------------------------------- batches


def text_dataset(processor: AriaProcessor, folder: str, count: int, **kwargs: Any) -> SFTDataset:
    lines = [{"messages": chat(f"Question {i}:" + " more" * i, f"Answer {i}.")} for i in range(count)]
    return SFTDataset(write(folder, lines), processor, **kwargs)


def test_batches_are_a_pure_function_of_seed_and_step(processor, tmp_path):
    dataset = text_dataset(processor, str(tmp_path), 10)
    first, second = Batches(dataset, 3, seed=7), Batches(dataset, 3, seed=7)
    assert first.per_epoch == 3  # 10 // 3: one example dropped per epoch
    for step in (0, 4, 1, 7, 3):  # a fresh object, out of order: as after a resume
        a, b = first.batch(step), second.batch(step)
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "labels"}
        assert all(np.array_equal(a[key], b[key]) for key in a)
    assert np.array_equal(first.indices(3), np.random.default_rng([7, 1]).permutation(10)[:3])
    assert not np.array_equal(first.indices(0), first.indices(3))  # a new order each epoch
    assert not np.array_equal(first.indices(0), Batches(dataset, 3, seed=8).indices(0))
    assert np.array_equal(Batches(dataset, 3, shuffle=False).indices(4), [3, 4, 5])

    batch = first.batch(4)
    for row, index in enumerate(first.indices(4)):
        example = dataset.encode(int(index))
        size = len(example["input_ids"])
        assert np.array_equal(batch["input_ids"][row, :size], example["input_ids"])
        assert np.array_equal(batch["labels"][row, :size], example["labels"])

    with pytest.raises(ValueError, match="batch_size=11"):
        Batches(dataset, 11)


def test_each_example_once_per_epoch(processor, tmp_path):
    batches = Batches(text_dataset(processor, str(tmp_path), 12), 4, seed=3)
    epochs = [np.concatenate([batches.indices(epoch * 3 + step) for step in range(3)]) for epoch in range(3)]
    for order in epochs:
        assert np.array_equal(np.sort(order), np.arange(12))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_rows_are_padded_to_the_smallest_bucket(processor, tmp_path):
    assert default_length_buckets(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert default_length_buckets(100) == (16, 32, 64, 100)
    assert default_length_buckets(10) == (10,)

    dataset = text_dataset(processor, str(tmp_path), 23, max_length=100)
    assert 32 < dataset.lengths[1] <= 64 and 64 < dataset.lengths[21] <= 100
    batches = Batches(dataset, 2, shuffle=False)
    assert batches.batch(0)["input_ids"].shape == (2, 64)  # rows 0 and 1
    batch = batches.batch(10)  # rows 20 and 21
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, 100)
    for row, index in enumerate((20, 21)):
        size = int(dataset.lengths[index])
        assert (batch["input_ids"][row, size:] == processor.pad_token_id).all()
        assert (batch["labels"][row, size:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * size + [0] * (100 - size)
    assert all(batch[key].dtype == np.int32 for key in batch)

    custom = Batches(dataset, 2, shuffle=False, length_buckets=[200, 40])
    assert custom.batch(0)["input_ids"].shape == (2, 40) and custom.batch(10)["input_ids"].shape == (2, 200)
    with pytest.raises(ValueError, match="longest example"):
        Batches(dataset, 2, length_buckets=[64])


def test_crops_are_concatenated_in_row_order_then_padded(processor, tmp_path):
    folder = str(tmp_path)
    # (width, height) -> crops at 70 with split_image: 200x60 -> 3, 40x40 -> 2, 100x100 -> 4.
    rows = [["wide.png"], [], ["small1.png", "small2.png"], ["square.png"]]
    sizes = {"wide.png": (200, 60), "small1.png": (40, 40), "small2.png": (40, 40), "square.png": (100, 100)}
    for seed, (name, (width, height)) in enumerate(sizes.items()):
        draw(os.path.join(folder, name), width, height, seed=seed)
    lines = [
        {"messages": chat([IMAGE] * len(images) + [text("Describe.")], "Discs."), "images": images} for images in rows
    ]
    dataset = SFTDataset(write(folder, lines), processor, max_image_size=70, split_image=True)
    assert dataset.crop_counts.tolist() == [3, 0, 4, 4]
    batches = Batches(dataset, 2, shuffle=False)
    assert batches.crops_per_batch == 8

    for step, real in ((0, 3), (1, 8)):
        batch = batches.batch(step)
        assert batch["pixel_values"].shape == (8, 3, 70, 70) and batch["pixel_values"].dtype == np.float32
        assert batch["pixel_mask"].shape == (8, 70, 70) and batch["pixel_mask"].dtype == bool
        paths = [os.path.join(folder, name) for images in rows[2 * step : 2 * step + 2] for name in images]
        expected = processor(images=paths, max_image_size=70, split_image=True)
        assert np.array_equal(batch["pixel_values"][:real], expected["pixel_values"])
        assert np.array_equal(batch["pixel_mask"][:real], expected["pixel_mask"])
        assert not batch["pixel_values"][real:].any() and batch["pixel_mask"][real:].all()
        assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum() == real * 8


def test_text_only_dataset_has_no_pixel_keys(processor, tmp_path):
    dataset = text_dataset(processor, str(tmp_path), 4)
    assert dataset.encode(0)["pixel_values"] is None and dataset.encode(0)["pixel_mask"] is None
    assert set(Batches(dataset, 2).batch(0)) == {"input_ids", "attention_mask", "labels"}
